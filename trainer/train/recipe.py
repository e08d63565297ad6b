"""The training loop: train(config, on_event, should_stop) is the only way to train a LoRA."""

from __future__ import annotations

import math
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from trainer import config as C
from trainer.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.train.data import LatentCache, TrainData, build_data, captions_are_static, load_pixels, process_caption
from trainer.common.cpu_alloc import is_cpu, keep_cpu_buffers
from trainer.errors import UserError
from trainer.train.events import (Checkpoint, Event, JsonlSink, Log, Phase, RunEnded, RunStarted, Sample, Step, fan_out)


@dataclass
class TrainResult:
    status: str            # completed | stopped
    step: int
    run_dir: Path
    lora_path: Path | None


# ------------------------------------------------------------------------------------------- set-up helpers

def _make_accelerator(cfg: C.Config):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    mp = cfg.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine",
                        field="train.mixed_precision")
    # accelerate keeps process-wide singletons; a second in-process run (GUI demo, tests) with other precision or
    # accumulation needs them fresh. The distributed PartialState is kept.
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="tensorboard" if cfg.output.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir / "logs")),
    )


def _prepare_run_dir(cfg: C.Config, resume: bool, overwrite: bool, is_main: bool) -> Path:
    run_dir = cfg.run_dir
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output.dir: cannot write to {run_dir}: {e.strerror or e}", field="output.dir",
                            path=str(run_dir)) from None
        if not resume and list_checkpoints(run_dir):
            if not overwrite:
                raise UserError(f"output: {run_dir} already holds a run with checkpoints; continue it with "
                                "--resume, start over with --overwrite, or choose another output.name",
                                field="output.name")
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if not resume:
            (run_dir / "events.jsonl").unlink(missing_ok=True)
    return run_dir


def _write_config(cfg: C.Config, run_dir: Path) -> str:
    text = C.config_to_toml(cfg, header=f"Resolved LoRA Studio config of run '{cfg.output.name}'.\n"
                                        f"Replay: python -m trainer --config {run_dir / 'config.toml'}")
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(run_dir / "config.toml")
    return text


def _weight_dtype(cfg: C.Config) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]


def _set_attention(unet, kind: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


class TextConditioner:
    """Prompt embeddings (and SDXL's pooled embedding) with clip skip; cached when the text encoders are frozen."""

    def __init__(self, base, clip_skip: int, device):
        self.base, self.clip_skip, self.device = base, clip_skip, device
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def _ids(self, tok, captions):
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    def encode(self, captions: list[str], text_encoders) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is not None:
            hits = [self.cache[c] for c in captions]
            pooled = torch.stack([h[1] for h in hits]) if hits[0][1] is not None else None
            return torch.stack([h[0] for h in hits]), pooled
        toks = self.base.tokenizers
        if self.base.family == "sdxl":
            # SDXL conditions on the penultimate layer of both encoders (clip skip moves both further back).
            layer = -(self.clip_skip + 1)
            o1 = text_encoders[0](self._ids(toks[0], captions), output_hidden_states=True)
            o2 = text_encoders[1](self._ids(toks[1], captions), output_hidden_states=True)
            return torch.cat([o1.hidden_states[layer], o2.hidden_states[layer]], dim=-1), o2.text_embeds
        te = text_encoders[0]
        out = te(self._ids(toks[0], captions), output_hidden_states=self.clip_skip > 1)
        if self.clip_skip == 1:
            return out.last_hidden_state, None
        # A1111's clip skip: an earlier layer, passed through the final layer norm.
        final_ln = getattr(te, "text_model", te).final_layer_norm
        return final_ln(out.hidden_states[-self.clip_skip]), None

    @torch.no_grad()
    def build_cache(self, captions: list[str], text_encoders) -> None:
        cache = {}
        uniq = sorted(set(captions))
        for i in range(0, len(uniq), 16):
            chunk = uniq[i:i + 16]
            emb, pooled = self.encode(chunk, text_encoders)
            for j, c in enumerate(chunk):
                cache[c] = (emb[j].detach(), pooled[j].detach() if pooled is not None else None)
        self.cache = cache


def _sdxl_time_ids(examples, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (arXiv:2307.01952, section 2.2)."""
    rows = [[e.size[1], e.size[0], e.crop_box[1], e.crop_box[0], e.bucket[1], e.bucket[0]] for e in examples]
    return torch.tensor(rows, device=device, dtype=dtype)


def _min_snr_weights(noise_scheduler, timesteps, gamma: float, v_pred: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., arXiv:2303.09556), as in diffusers' training examples."""
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_pred else clipped / snr


def _changed_keys(old_toml: str, cfg: C.Config) -> list[str]:
    import tomllib
    try:
        old = tomllib.loads(old_toml)
    except tomllib.TOMLDecodeError:
        return []
    new = C.config_to_dict(cfg)
    out = []
    for key, fi in C.FIELDS.items():
        ov = old.get(fi.section, {}).get(fi.name, fi.default)
        if ov != new[fi.section][fi.name]:
            out.append(f"{key} ({ov!r} -> {new[fi.section][fi.name]!r})")
    return out


# ------------------------------------------------------------------------------------------------- train

def train(cfg: C.Config, on_event: Callable[[Event], None] | None = None,
          should_stop: Callable[[], bool] | None = None, *, resume: bool = False, overwrite: bool = False,
          command: str = "") -> TrainResult:
    """Train a LoRA as configured. Emits events; returns when done or stopped; raises UserError on bad input."""
    C.validate_for_training(cfg)
    should_stop = should_stop or (lambda: False)
    warnings: list[str] = []
    data = build_data(cfg, warnings.append)  # bad data fails before anything is written

    accelerator = _make_accelerator(cfg)
    if is_cpu(accelerator.device):
        keep_cpu_buffers()  # oneDNN's per-call weight reorders otherwise page-fault on fresh mmaps
    is_main = accelerator.is_main_process
    run_dir = _prepare_run_dir(cfg, resume, overwrite, is_main)
    accelerator.wait_for_everyone()
    sink = JsonlSink(run_dir / "events.jsonl") if is_main else None
    fanned = fan_out(sink, on_event if is_main else None)
    last = {"step": 0}

    def emit(event: Event) -> None:
        if isinstance(event, Step):
            last["step"] = event.step
        fanned(event)

    for w in warnings:
        emit(Log(level="warning", message=w))
    try:
        return _train(cfg, data, accelerator, run_dir, emit, should_stop, resume, command)
    except UserError as e:
        emit(RunEnded(status="failed", step=last["step"], error=str(e)))
        raise
    except BaseException as e:  # a crash still ends the event stream, so a GUI tailing it knows
        emit(RunEnded(status="failed", step=last["step"], error=f"{type(e).__name__}: {e}"))
        raise
    finally:
        if cfg.output.tensorboard:
            accelerator.end_training()
        if sink is not None:
            sink.close()


class _StoppedDuringSetup(Exception):
    pass


def _train(cfg, data: TrainData, accelerator, run_dir: Path, emit, should_stop, resume: bool, command: str):
    try:
        return _train_inner(cfg, data, accelerator, run_dir, emit, should_stop, resume, command)
    except _StoppedDuringSetup:
        emit(RunEnded(status="stopped", step=0, error=""))
        emit(Log(message="stopped before the first step; nothing to save"))
        return TrainResult("stopped", 0, run_dir, None)


def _train_inner(cfg, data: TrainData, accelerator, run_dir: Path, emit, should_stop, resume: bool, command: str):
    from trainer.lora.inject import inject_lora, untrainable_te_layers
    from trainer.lora.io import build_metadata, save_diffusers_lora, save_lora
    from trainer.models.loading import load_base_model
    from trainer.train.optim import make_optimizer, make_scheduler

    t_start = time.time()
    is_main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = _weight_dtype(cfg)
    tr = cfg.train
    config_toml = _write_config(cfg, run_dir) if is_main else ""

    # ---- model: frozen base in the training dtype, LoRA in fp32
    emit(Phase(name="loading model", done=0, total=1))
    torch.manual_seed(tr.seed)
    base = load_base_model(cfg.model, dtype=weight_dtype, device=device)
    setup_progress_stop = accelerator.num_processes == 1 and should_stop()
    emit(Phase(name="loading model", done=1, total=1))
    if setup_progress_stop:
        raise _StoppedDuringSetup
    unet, vae, text_encoders = base.unet, base.vae, base.text_encoders
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
        m.eval()
    vae_dtype = torch.float32 if base.family == "sdxl" else weight_dtype  # SDXL's VAE overflows in fp16
    if vae.dtype != vae_dtype:
        vae.to(dtype=vae_dtype)
    vae.to(device)
    _set_attention(unet, tr.attention)
    train_te = cfg.lora.train_text_encoder
    torch.manual_seed(tr.seed)  # identical LoRA init in every process and every resume
    # text-encoder layers after the hidden state the model reads get no gradient: they are not injected
    handles = inject_lora(unet, text_encoders, cfg.lora, train_text_encoder=train_te,
                          skip_last_layers=untrainable_te_layers(base.family, cfg.model.clip_skip))
    if tr.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers only checkpoints in training mode
        if train_te:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
                te.train()

    # ---- caches: latents once, frozen text-encoder outputs once
    v_pred = base.prediction_type == "v_prediction"
    scaling = base.vae.config.scaling_factor
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    cache = None
    skipped: set[int] = set()

    def skip(i: int, why: str) -> None:
        skipped.add(i)
        emit(Log(level="warning", message=f"skipped {data.examples[i].path}: {why}"))

    def setup_progress(name: str, done: int, total: int) -> None:
        emit(Phase(name=name, done=done, total=total))
        if accelerator.num_processes == 1 and should_stop():  # Stop while caching: nothing trained yet
            raise _StoppedDuringSetup

    if cfg.data.cache_latents:
        disk = None
        if cfg.data.cache_latents_to_disk:
            disk = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.data.dir) / ".lorastudio_cache"
        cache = LatentCache(data, vae, device=device, dtype=weight_dtype, disk_dir=disk, flip=cfg.data.flip)
        with accelerator.main_process_first():
            cache.build(list(range(len(data.examples))),
                        lambda d, t: setup_progress("caching latents", d, t), skip)
    else:
        for i, ex in enumerate(data.examples):  # still check every image decodes before step 1
            try:
                from datasets_tools.images import load_rgb
                load_rgb(ex.path)
            except Exception as e:
                skip(i, str(e))
    if skipped:
        keep = [i for i in range(len(data.examples)) if i not in skipped]
        if not any(not data.examples[i].is_reg for i in keep):
            raise UserError(f"data.dir: no usable image in {cfg.data.dir} (every image failed to decode)",
                            field="data.dir")
        remap = {old: new for new, old in enumerate(keep)}
        data.examples = [data.examples[i] for i in keep]
        if cache is not None:
            cache.mem = {(remap[i], f): v for (i, f), v in cache.mem.items() if i in remap}
    texts = TextConditioner(base, cfg.model.clip_skip, device)
    if not train_te and captions_are_static(cfg):
        caps = [e.caption for e in data.examples] + ([""] if cfg.data.caption_dropout > 0 else [])
        with torch.autocast(device.type, enabled=False):
            texts.build_cache(caps, text_encoders)
        for te in text_encoders:  # no longer needed on the device; sampling moves them back
            te.to("cpu")
    if cache is not None and not (cfg.sample.every_steps and cfg.sample.prompts):
        vae.to("cpu")

    # ---- optimizer and schedule (a separate lr for the text encoders)
    te_lr = tr.text_encoder_lr if tr.text_encoder_lr >= 0 else tr.learning_rate
    groups = [{"params": handles.unet_params, "lr": tr.learning_rate}]
    if train_te:
        groups += [{"params": ps, "lr": te_lr} for ps in handles.text_encoder_params if ps]
    optimizer = make_optimizer(tr.optimizer, groups, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    scheduler = make_scheduler(optimizer, tr.lr_scheduler, warmup_steps=tr.lr_warmup_steps,
                               total_steps=tr.max_steps, num_cycles=tr.lr_num_cycles)
    trained = {"unet": unet} | ({f"text_encoder_{i}": te for i, te in enumerate(text_encoders)} if train_te else {})
    # Checkpoints hold the unwrapped modules' LoRA tensors; DDP wrapping (several processes) comes after.
    start_step, epoch, batch_idx = 0, 0, 0
    if resume:
        ck = latest_checkpoint(run_dir)
        if ck is None:
            raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume",
                            path=str(run_dir))
        old_toml = (ck / "config.toml").read_text(encoding="utf-8") if (ck / "config.toml").exists() else ""
        changed = _changed_keys(old_toml, cfg)
        if changed:
            emit(Log(level="warning", message="resuming with changed settings: " + "; ".join(changed)))
        state = load_checkpoint(ck, modules=trained, optimizer=optimizer, scheduler=scheduler)
        start_step = state["step"]
        epoch, batch_idx = state["data"]["epoch"], state["data"]["batch_idx"]
        emit(Log(message=f"resumed from {ck} at step {start_step}"))
    wrapped = accelerator.prepare(unet, *([trained[k] for k in trained if k != "unet"]), optimizer)
    unet_t, te_wrapped, optimizer = wrapped[0], list(wrapped[1:-1]), wrapped[-1]
    train_tes = te_wrapped if train_te else text_encoders
    if cfg.output.tensorboard and is_main:
        accelerator.init_trackers(cfg.output.name)

    world, rank = accelerator.num_processes, accelerator.process_index

    def epoch_batches(ep: int) -> list[list[int]]:
        allb = data.batches(tr.batch_size, tr.seed, ep)
        while len(allb) < world:  # tiny data sets: every process still gets a batch
            allb = allb + allb
        n = len(allb) // world
        return allb[rank::world][:n]

    batches = epoch_batches(epoch)
    stats = data.stats()
    session_id = secrets.randbelow(2**31)

    def unwrapped(m):
        return accelerator.unwrap_model(m)

    def save_lora_file(path: Path, step: int, finished: bool) -> Path:
        meta = build_metadata(
            cfg, family=base.family, prediction_type=base.prediction_type, base_model_name=base.name, steps=step,
            epoch=epoch, started_at=t_start, finished_at=time.time() if finished else 0.0, session_id=session_id,
            num_train_images=stats["num_train_images"], tag_frequency=stats["tag_frequency"],
            dataset_dirs=stats["dataset_dirs"], bucket_info=stats["bucket_info"], resolved_config_toml=config_toml,
            num_reg_images=stats["num_reg_images"], reg_dataset_dirs=stats["reg_dataset_dirs"])
        save_lora(path, unwrapped(unet_t), [unwrapped(t) for t in text_encoders], family=base.family,
                  metadata=meta, save_precision=cfg.output.save_precision)
        return path

    def diverged(step: int, what: str):
        last = latest_checkpoint(run_dir)
        keep = f"; the last good checkpoint is {last}" if last else ""
        return UserError(f"{what} at step {step}: training diverged; lower train.learning_rate (now "
                         f"{tr.learning_rate:g}){keep}", field="train.learning_rate")

    def check_finite(step: int) -> None:
        # Never save a checkpoint or LoRA with NaN/inf weights: the last good checkpoint stays the newest.
        if not all(torch.isfinite(p).all() for p in params):
            raise diverged(step, "LoRA weights became non-finite")

    def checkpoint(step: int) -> None:
        check_finite(step)
        if is_main:
            p = save_checkpoint(run_dir, step, modules={k: unwrapped(v) for k, v in trained.items()},
                                optimizer=optimizer, scheduler=scheduler,
                                data_pos={"epoch": epoch, "batch_idx": batch_idx}, config_toml=config_toml,
                                keep=tr.keep_checkpoints)
            lora = save_lora_file(run_dir / f"{cfg.output.name}-step{step:08d}.safetensors", step, False)
            emit(Checkpoint(step=step, path=str(p), lora_path=str(lora)))
        accelerator.wait_for_everyone()

    def samples(step: int) -> None:
        if is_main and cfg.sample.prompts:
            _save_samples(cfg, base, unwrapped(unet_t), text_encoders, run_dir, step, emit, device)
        accelerator.wait_for_everyone()

    def batch_loss(idx: list[int], rng: random.Random) -> torch.Tensor:
        exs = [data.examples[i] for i in idx]
        flips = [cfg.data.flip and rng.random() < 0.5 for _ in idx]
        if cache is not None:
            lat = torch.stack([cache.get(i, f) for i, f in zip(idx, flips)]).to(device)
        else:
            with torch.no_grad():
                px = torch.stack([load_pixels(e, f) for e, f in zip(exs, flips)]).to(device, vae.dtype)
                lat = vae.encode(px).latent_dist.mean.float()
        latents = ((lat - shift) * scaling).to(weight_dtype)
        captions = [process_caption(e.caption, cfg, rng) for e in exs]
        with torch.set_grad_enabled(train_te):
            emb, pooled = texts.encode(captions, train_tes)
        emb = emb.to(device, weight_dtype)
        noise = torch.randn_like(latents)
        if tr.noise_offset:
            # Offset noise (crosslabs.org/blog/diffusion-with-offset-noise): lets the model shift mean brightness.
            noise = noise + tr.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                          device=device, dtype=latents.dtype)
        nsched = base.noise_scheduler
        t = torch.randint(0, nsched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = nsched.add_noise(latents, noise, t)
        added = None
        if base.family == "sdxl":
            added = {"text_embeds": pooled.to(device, weight_dtype),
                     "time_ids": _sdxl_time_ids(exs, device, weight_dtype)}
        with accelerator.autocast():
            pred = unet_t(noisy, t, emb, added_cond_kwargs=added).sample
        target = nsched.get_velocity(latents, noise, t) if v_pred else noise
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if tr.min_snr_gamma > 0:
            per = per * _min_snr_weights(nsched, t, tr.min_snr_gamma, v_pred).to(per.device)
        w = torch.tensor([cfg.data.prior_loss_weight if e.is_reg else 1.0 for e in exs], device=per.device)
        return (per * w).mean()

    emit(RunStarted(run_dir=str(run_dir), max_steps=tr.max_steps, start_step=start_step, resumed=resume,
                    num_images=len(data.train_examples), family=base.family, command=command))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step = start_step
    ema_dt = None
    step_clock = time.perf_counter()
    while step < tr.max_steps:
        if _any_process(accelerator, should_stop()):
            checkpoint(step)
            emit(RunEnded(status="stopped", step=step))
            return TrainResult("stopped", step, run_dir, None)
        # Randomness per step is a pure function of (seed, step, rank): a resumed run replays it exactly.
        seed = (tr.seed * 1_000_003 + step * world + rank) % (2**63)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        loss_sum = torch.zeros((), device=device)
        for _ in range(tr.gradient_accumulation_steps):
            if batch_idx >= len(batches):
                epoch, batch_idx = epoch + 1, 0
                batches = epoch_batches(epoch)
            idx = batches[batch_idx]
            batch_idx += 1
            with accelerator.accumulate(unet_t):
                loss = batch_loss(idx, rng)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tr.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, tr.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        scheduler.step()
        step += 1
        loss_val = accelerator.gather(loss_sum[None]).mean().item() / tr.gradient_accumulation_steps
        if not math.isfinite(loss_val):
            raise diverged(step, f"loss became {loss_val}")
        now = time.perf_counter()
        dt, step_clock = now - step_clock, now
        ema_dt = dt if ema_dt is None else 0.9 * ema_dt + 0.1 * dt
        lr = scheduler.get_last_lr()[0]
        emit(Step(step=step, max_steps=tr.max_steps, loss=loss_val, lr=lr, it_per_s=1.0 / ema_dt if ema_dt else 0.0,
                  eta_s=ema_dt * (tr.max_steps - step), epoch=epoch))
        if cfg.output.tensorboard:
            accelerator.log({"loss": loss_val, "lr": lr}, step=step)
        periodic = step < tr.max_steps
        if periodic and tr.save_every_steps and step % tr.save_every_steps == 0:
            checkpoint(step)
        if cfg.sample.every_steps and step % cfg.sample.every_steps == 0 and step < tr.max_steps:
            samples(step)
        step_clock = time.perf_counter()  # saving and sampling time is not step time

    # ---- final save: the LoRA (kohya format, self-checked), optional diffusers file, a last checkpoint
    lora_path = run_dir / f"{cfg.output.name}.safetensors"
    check_finite(step)
    if is_main:
        save_lora_file(lora_path, step, True)
        if cfg.output.also_diffusers:
            save_diffusers_lora(run_dir / "diffusers", unwrapped(unet_t), [unwrapped(t) for t in text_encoders],
                                family=base.family)
    if is_main:  # a final checkpoint lets a finished run be extended with --resume and a larger max_steps
        save_checkpoint(run_dir, step, modules={k: unwrapped(v) for k, v in trained.items()}, optimizer=optimizer,
                        scheduler=scheduler, data_pos={"epoch": epoch, "batch_idx": batch_idx},
                        config_toml=config_toml, keep=tr.keep_checkpoints)
    if cfg.sample.every_steps:
        samples(step)
    accelerator.wait_for_everyone()
    emit(RunEnded(status="completed", step=step, lora_path=str(lora_path)))
    return TrainResult("completed", step, run_dir, lora_path)


def _any_process(accelerator, flag: bool) -> bool:
    """A stop seen by any process stops all of them at the same step."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


@torch.no_grad()
def _save_samples(cfg: C.Config, base, unet, text_encoders, run_dir: Path, step: int, emit, device) -> None:
    from trainer.generate.samplers import make_sampler, png_parameters, save_png
    s = cfg.sample
    out = run_dir / "samples"
    out.mkdir(exist_ok=True)
    for te in text_encoders:
        te.to(device)
    base.vae.to(device)
    was_training = unet.training
    unet.eval()
    pipe = base.make_pipeline(scheduler=make_sampler(s.sampler, base.scheduler_config))
    pipe.unet = unet
    pipe.set_progress_bar_config(disable=True)
    w = s.width or cfg.data.resolution
    h = s.height or cfg.data.resolution
    clip_skip = cfg.model.clip_skip - 1 or None
    for i, prompt in enumerate(s.prompts):
        g = torch.Generator(device="cpu").manual_seed(s.seed + i)
        with torch.autocast(device.type, enabled=cfg.train.mixed_precision != "no",
                            dtype=_weight_dtype(cfg) if cfg.train.mixed_precision != "no" else None):
            img = pipe(prompt, negative_prompt=s.negative_prompt or None, num_inference_steps=s.steps,
                       guidance_scale=s.guidance_scale, width=w, height=h, generator=g, clip_skip=clip_skip).images[0]
        path = out / f"step{step:08d}-{i:02d}.png"
        save_png(img, path, png_parameters(prompt, s.negative_prompt, steps=s.steps, sampler=s.sampler,
                                           cfg_scale=s.guidance_scale, seed=s.seed + i, width=w, height=h,
                                           model=base.name, extra={"LoRA step": step, "Run": cfg.output.name}))
        emit(Sample(step=step, path=str(path), prompt=prompt))
    if was_training:
        unet.train()
