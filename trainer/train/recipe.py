"""The training recipe: train(config, on_event, should_stop) is the only way to train a LoRA.

Read it top to bottom: train() checks the data and opens the run folder and the event stream; _run() calls
each set-up step once (model, adapters, latents, text conditioning, optimizer, start point), then the step
loop (_loop), then the one final save (_save). Set-up builds a Session that does not change afterwards; the
loop moves a LoopState, which is what every checkpoint stores. Nothing is shared through closures.
"""

from __future__ import annotations

import math
import random
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from trainer import config as C
from trainer.lora.metadata import RunStats
from trainer.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.train import loss as L
from trainer.train.data import (LatentCache, TrainData, build_data, captions_are_static, load_mask, load_pixels,
                                  process_caption)
from trainer.common.cpu_alloc import give_back_freed, is_cpu, keep_cpu_buffers
from trainer.errors import UserError
from trainer.train.ema import Ema, nothing
from trainer.train.events import (Checkpoint, Event, JsonlSink, Log, Phase, RunEnded, RunStarted, Sample, Step,
                                  Validation, fan_out)
from trainer.train.validation import ValidationSet, fixed_timesteps


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
    """Caption embeddings (and SDXL's pooled embedding) with clip skip, in ``max_token_length // 75`` windows of
    77 tokens (trainer.common.prompt_encoding); cached, keyed by the caption text, when the text encoders are
    frozen."""

    def __init__(self, base, clip_skip: int, device, max_token_length: int = 75):
        from trainer.common.prompt_encoding import WINDOW_TOKENS, PromptEncoder
        self.base, self.clip_skip, self.device = base, clip_skip, device
        self.windows = max(1, max_token_length // WINDOW_TOKENS)
        self.encoder = PromptEncoder(base.family, base.tokenizers, clip_skip)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def encode(self, captions: list[str], text_encoders) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is not None:
            hits = [self.cache[c] for c in captions]
            pooled = torch.stack([h[1] for h in hits]) if hits[0][1] is not None else None
            return torch.stack([h[0] for h in hits]), pooled
        return self.encoder.encode_captions(captions, text_encoders, self.windows)

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
    is_main = accelerator.is_main_process
    run_dir = _prepare_run_dir(cfg, resume, overwrite, is_main)
    accelerator.wait_for_everyone()
    sink = JsonlSink(run_dir / "events.jsonl") if is_main else None
    emit = _Emitter(fan_out(sink, on_event if is_main else None))
    for w in warnings:
        emit(Log(level="warning", message=w))
    try:
        return _run(cfg, data, accelerator, run_dir, emit, should_stop, resume, command)
    except UserError as e:
        emit(RunEnded(status="failed", step=emit.last_step, error=str(e)))
        raise
    except BaseException as e:  # a crash still ends the event stream, so a GUI tailing it knows
        emit(RunEnded(status="failed", step=emit.last_step, error=f"{type(e).__name__}: {e}"))
        raise
    finally:
        if cfg.output.tensorboard:
            accelerator.end_training()
        if sink is not None:
            sink.close()


class _Emitter:
    """The run's event stream; remembers the last step reported, for the RunEnded of a failure."""

    def __init__(self, send: Callable[[Event], None]):
        self.send, self.last_step = send, 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, Step):
            self.last_step = event.step
        self.send(event)


@dataclass
class Session:
    """What set-up built and the loop and the saves read; fixed once the loop starts."""
    cfg: C.Config
    accelerator: object
    run_dir: Path
    emit: Callable[[Event], None]
    base: object                 # trainer.models.loading.BaseModel
    data: TrainData
    cache: LatentCache | None    # None: images are encoded in every step
    texts: "TextConditioner"
    unet: torch.nn.Module        # as accelerate prepared it (DDP-wrapped with several processes)
    text_encoders: list          # the loss runs these (prepared ones when they are trained)
    trained: dict                # name -> unwrapped module whose LoRA tensors a checkpoint holds
    optimizer: object
    scheduler: object
    params: list                 # every trained tensor, for clipping and the finiteness check
    stats: RunStats              # what the LoRA file's metadata says about the run
    config_toml: str
    validation: ValidationSet | None = None
    ema: Ema | None = None       # the saved weights are its average (train.ema_decay)

    def output_weights(self):
        """The weights the LoRA files hold in the live parameters: the EMA's when there is one."""
        return self.ema.applied() if self.ema is not None else nothing()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def batch_order(self, epoch: int) -> list[list[int]]:
        """This process's batches of an epoch: a pure function of (seed, epoch, rank)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        allb = self.data.batches(self.cfg.train.batch_size, self.cfg.train.seed, epoch)
        while len(allb) < world:  # tiny data sets: every process still gets a batch
            allb = allb + allb
        return allb[rank::world][:len(allb) // world]


@dataclass
class LoopState:
    """Where the loop is: the step and the position in the epoch's batch order (what a checkpoint stores)."""
    step: int
    epoch: int
    batch_idx: int
    batches: list[list[int]] = field(default_factory=list)
    validation: list[list[float]] = field(default_factory=list)   # [step, loss] so far; resumes continue it
    best_validation: float | None = None

    def position(self) -> dict:
        """What a checkpoint stores of the loop (besides the step)."""
        return {"epoch": self.epoch, "batch_idx": self.batch_idx, "validation": self.validation,
                "best_validation": self.best_validation}

    def next_batch(self, order: Callable[[int], list[list[int]]]) -> list[int]:
        if self.batch_idx >= len(self.batches):
            self.epoch, self.batch_idx = self.epoch + 1, 0
            self.batches = order(self.epoch)
        self.batch_idx += 1
        return self.batches[self.batch_idx - 1]


def _run(cfg, data: TrainData, accelerator, run_dir: Path, emit, should_stop, resume: bool, command: str):
    t_start = time.time()
    # During set-up only a single process may stop early (several would have to agree first).
    def stop_requested() -> bool:
        return accelerator.num_processes == 1 and should_stop()

    config_toml = _write_config(cfg, run_dir) if accelerator.is_main_process else ""
    base = _load_model(cfg, accelerator, emit)
    if stop_requested():
        return _stopped_before_training(run_dir, emit)
    handles = _add_adapters(cfg, base)
    cache, complete = _encode_images(cfg, data, base, accelerator, emit, stop_requested)
    validation, val_complete = _validation_set(cfg, data, base, accelerator, emit, stop_requested)
    if not (complete and val_complete):
        return _stopped_before_training(run_dir, emit)
    _release_cached_away(cfg, base, cache, validation, None, emit)
    texts = _text_conditioning(cfg, data, base, accelerator.device, validation)
    _release_cached_away(cfg, base, cache, validation, texts, emit)
    if is_cpu(accelerator.device):
        # from here on, not before: oneDNN's per-call weight reorders in the steps otherwise page-fault on fresh
        # mmaps; loading and caching, whose large blocks are short-lived and mostly freed for good, keep glibc's
        # own settings, so what they free goes back to the OS (see cpu_alloc)
        keep_cpu_buffers()
    optimizer, scheduler = _optimization(cfg, handles)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ema = Ema(params, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay > 0 else None
    trained = {"unet": base.unet}
    if cfg.lora.train_text_encoder:
        trained |= {f"text_encoder_{i}": te for i, te in enumerate(base.text_encoders)}
    state = _start_state(cfg, run_dir, resume, trained, optimizer, scheduler, ema, emit)
    # Checkpoints hold the unwrapped modules' LoRA tensors; DDP wrapping (several processes) comes after.
    wrapped = accelerator.prepare(*trained.values(), optimizer)
    unet, te_wrapped, optimizer = wrapped[0], list(wrapped[1:-1]), wrapped[-1]
    if cfg.output.tensorboard and accelerator.is_main_process:
        accelerator.init_trackers(cfg.output.name)
    stats = RunStats.from_data(data.stats(), family=base.family, prediction_type=base.prediction_type,
                               base_model_name=base.name, config_toml=config_toml, started_at=t_start,
                               session_id=secrets.randbelow(2**31))
    s = Session(cfg=cfg, accelerator=accelerator, run_dir=run_dir, emit=emit, base=base, data=data, cache=cache,
                texts=texts, unet=unet, text_encoders=te_wrapped if cfg.lora.train_text_encoder else base.text_encoders,
                trained=trained, optimizer=optimizer, scheduler=scheduler, params=params, stats=stats,
                config_toml=config_toml, validation=validation, ema=ema)
    state.batches = s.batch_order(state.epoch)
    emit(RunStarted(run_dir=str(run_dir), max_steps=cfg.train.max_steps, start_step=state.step, resumed=resume,
                    num_images=len(data.train_examples), family=base.family, command=command))

    if not _loop(s, state, should_stop):
        _save(s, state, final=False)  # a stopped run keeps everything: it resumes from this checkpoint
        emit(RunEnded(status="stopped", step=state.step))
        return TrainResult("stopped", state.step, run_dir, None)
    if validation is not None:
        _validate(s, state)  # the curve's last point is the final weights'
    lora_path = _save(s, state, final=True)
    if _sampling_on(cfg):
        _samples(s, state.step)
    emit(RunEnded(status="completed", step=state.step, lora_path=str(lora_path)))
    return TrainResult("completed", state.step, run_dir, lora_path)


def _loop(s: Session, state: LoopState, should_stop: Callable[[], bool]) -> bool:
    """Train from state.step to max_steps; False when a stop was asked for (nothing saved yet)."""
    cfg, tr, acc = s.cfg, s.cfg.train, s.accelerator
    world, rank = acc.num_processes, acc.process_index
    losses = _LossLog(s)
    while state.step < tr.max_steps:
        # A stop seen by any process stops all of them at the same step (several processes: at a loss read).
        if (world == 1 or not losses.pending) and _any_process(acc, should_stop()):
            losses.flush()  # the steps done are reported before the stop's save
            return False
        # Randomness per step is a pure function of (seed, step, rank): a resumed run replays it exactly.
        seed = (tr.seed * 1_000_003 + state.step * world + rank) % (2**63)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        epochs_before = _epochs_done(state)  # samples every N epochs come at the step that ends an epoch
        # Gradient accumulation: several batches, one optimizer step; accelerate syncs gradients on the last.
        loss_sum = torch.zeros((), device=acc.device)
        for _ in range(tr.gradient_accumulation_steps):
            idx = state.next_batch(s.batch_order)
            with acc.accumulate(s.unet):
                loss = _batch_loss(s, idx, rng)
                acc.backward(loss)
                if acc.sync_gradients and tr.max_grad_norm > 0:
                    acc.clip_grad_norm_(s.params, tr.max_grad_norm)
                s.optimizer.step()  # a no-op until the last accumulated batch
                s.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        # The schedule moves once per optimizer step, not per accumulated batch; so does the EMA.
        s.scheduler.step()
        if s.ema is not None:
            s.ema.update()
        state.step += 1
        # The loss stays on the device; it is read (one host sync, which also catches divergence) every
        # sync_every_steps steps, and before anything that saves or reports.
        losses.add(state, loss_sum)
        validate = (s.validation is not None and tr.validation_every_steps
                    and state.step % tr.validation_every_steps == 0)
        saves = tr.save_every_steps and state.step % tr.save_every_steps == 0
        if losses.due(state.step) or validate or saves or state.step >= tr.max_steps:
            losses.flush()
        # Periodic validation, checkpoints and samples; those of the last step come with the final save.
        if state.step < tr.max_steps:
            if s.validation is not None and tr.validation_every_steps and state.step % tr.validation_every_steps == 0:
                _validate(s, state)
            if tr.save_every_steps and state.step % tr.save_every_steps == 0:
                _save(s, state, final=False)
            if _samples_due(cfg.sample, state.step, epochs_before, _epochs_done(state)):
                _samples(s, state.step)
        losses.clock.restart()  # saving and sampling time is not step time
    return True


class _LossLog:
    """Step losses kept on the device and read in one host sync every ``sync_every_steps`` steps, then reported
    (the Step events feed the CLI bar, the GUI's plot and events.jsonl) and checked for divergence."""

    def __init__(self, s: "Session"):
        self.s, self.clock = s, _StepClock()
        every = s.cfg.train.sync_every_steps
        self.every = every or (1 if s.accelerator.device.type == "cpu" else 10)
        self.pending: list[tuple[int, int, float, float, torch.Tensor]] = []  # step, epoch, lr, s/step, loss

    def add(self, state: "LoopState", loss_sum: torch.Tensor) -> None:
        dt = self.clock.lap()
        self.pending.append((state.step, state.epoch, self.s.scheduler.get_last_lr()[0], dt, loss_sum))

    def due(self, step: int) -> bool:
        return len(self.pending) >= self.every

    def flush(self) -> None:
        if not self.pending:
            return
        s, tr = self.s, self.s.cfg.train
        stacked = torch.stack([p[4] for p in self.pending])[None]
        values = (s.accelerator.gather(stacked).mean(dim=0) / tr.gradient_accumulation_steps).tolist()
        pending, self.pending = self.pending, []
        for (step, epoch, lr, dt, _), loss in zip(pending, values):
            if not math.isfinite(loss):
                raise _diverged(s, step, f"loss became {loss}")
            s.emit(Step(step=step, max_steps=tr.max_steps, loss=loss, lr=lr, it_per_s=1.0 / dt if dt else 0.0,
                        eta_s=dt * (tr.max_steps - step), epoch=epoch))
            if s.cfg.output.tensorboard:
                s.accelerator.log({"loss": loss, "lr": lr}, step=step)


class _StepClock:
    """Seconds per step, smoothed (EMA 0.9) for the it/s and ETA figures."""

    def __init__(self):
        self.t = time.perf_counter()
        self.avg: float | None = None

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        self.avg = dt if self.avg is None else 0.9 * self.avg + 0.1 * dt
        return self.avg

    @property
    def rate(self) -> float:
        return 1.0 / self.avg if self.avg else 0.0

    def restart(self) -> None:
        self.t = time.perf_counter()


# --------------------------------------------------------------------------------------------- set-up steps

def _load_model(cfg: C.Config, accelerator, emit):
    """The frozen base model in the training dtype, on the device (SDXL's VAE stays fp32: it overflows in fp16)."""
    from trainer.models.loading import load_base_model
    emit(Phase(name="loading model", done=0, total=1))
    torch.manual_seed(cfg.train.seed)
    # with fp8_base the UNet's weights are stored as fp8 while they are read (no full-precision UNet in memory);
    # for now only under plain LoRA, the adapter type tested over pre-converted layers (DoRA's init reads the
    # unrounded base weight); the other types load in full precision and convert after injection, as before
    base = load_base_model(cfg.model, dtype=_weight_dtype(cfg), device=accelerator.device,
                           fp8_unet=cfg.train.fp8_base and cfg.lora.type == "lora")
    emit(Phase(name="loading model", done=1, total=1))
    for m in (base.unet, base.vae, *base.text_encoders):
        m.requires_grad_(False)
        m.eval()
    vae_dtype = torch.float32 if base.family == "sdxl" else _weight_dtype(cfg)
    if base.vae.dtype != vae_dtype:
        base.vae.to(dtype=vae_dtype)
    base.vae.to(accelerator.device)
    _set_attention(base.unet, cfg.train.attention)
    return base


def _add_adapters(cfg: C.Config, base):
    """LoRA (fp32) on the UNet and, when trained, the text encoders; the same init in every process and resume."""
    from trainer.lora.inject import inject_lora, untrainable_te_layers
    train_te = cfg.lora.train_text_encoder
    torch.manual_seed(cfg.train.seed)
    # text-encoder layers after the hidden state the model reads get no gradient: they are not injected
    handles = inject_lora(base.unet, base.text_encoders, cfg.lora, train_text_encoder=train_te,
                          skip_last_layers=untrainable_te_layers(base.family, cfg.model.clip_skip))
    if cfg.train.fp8_base:  # the frozen Linear/Conv weights under the adapters in fp8 (trainer/models/fp8.py)
        from trainer.models.fp8 import UNET_KEEP, store_fp8
        store_fp8(base.unet, _weight_dtype(cfg), keep=UNET_KEEP)
        for te in base.text_encoders if cfg.train.fp8_base_text_encoder else ():
            store_fp8(te, _weight_dtype(cfg))
    if cfg.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        base.unet.train()  # diffusers only checkpoints in training mode
        if train_te:
            for te in base.text_encoders:
                te.gradient_checkpointing_enable()
                te.train()
    if cfg.train.compile:
        _compile_blocks(base.unet)
    return handles


#: keyword arguments of ``torch.compile`` for train.compile (its defaults: the inductor backend); tests set a
#: cheaper backend here to check the traced path without compiling kernels
COMPILE_KWARGS: dict = {}


def _compile_blocks(unet) -> int:
    """Regional compilation: each of the UNet's repeated transformer blocks (diffusers' ``_repeated_blocks``,
    BasicTransformerBlock) is compiled in place with ``nn.Module.compile``, LoRA and fp8 layers inside, after
    gradient checkpointing is set. In place, so module names and state-dict keys (what checkpoints and the LoRA
    file hold) stay as they are: no ``_orig_mod.`` prefix. The blocks share one forward, so they compile once per
    shape, not once each. Returns the number of blocks compiled."""
    names = set(getattr(unet, "_repeated_blocks", None) or ("BasicTransformerBlock",))
    blocks = [m for m in unet.modules() if type(m).__name__ in names]
    for m in blocks:
        m.compile(**COMPILE_KWARGS)
    return len(blocks)


def _encode_images(cfg: C.Config, data: TrainData, base, accelerator, emit, stop_requested):
    """The latent cache (or a decode check of every image), dropping images that fail; (cache, complete)."""
    skipped: dict[int, str] = {}  # example index -> why it cannot be used
    skip = skipped.__setitem__

    def progress(done: int, total: int) -> bool:
        emit(Phase(name="caching latents", done=done, total=total))
        return not stop_requested()  # Stop while caching: nothing trained yet

    cache = None
    world = accelerator.num_processes
    if cfg.data.cache_latents:
        disk = None
        # Several processes share the work through the disk cache: each encodes its own share and writes it,
        # then reads the others'. So a run on N GPUs encodes every picture once, not N times.
        if cfg.data.cache_latents_to_disk or world > 1:
            disk = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.data.dir) / ".lorastudio_cache"
        cache = LatentCache(data, base.vae, device=accelerator.device, dtype=_weight_dtype(cfg), disk_dir=disk,
                            flip=cfg.data.flip)
        everything = list(range(len(data.examples)))
        mine = everything[accelerator.process_index::world]
        if not cache.build(mine, progress, skip, batch_size=cfg.data.cache_batch_size):
            return cache, False
        if world > 1:
            accelerator.wait_for_everyone()
            cache.build(everything, lambda d, t: True, skip, batch_size=cfg.data.cache_batch_size)
        encoded = accelerator.gather(torch.tensor([cache.encoded], device=accelerator.device)).tolist()
        emit(Log(message=f"latents: {sum(encoded)} encoded" + (f" by {world} processes ({' + '.join(map(str, encoded))})"
                                                              if world > 1 else "")
                 + f", {len(cache.mem) - sum(encoded)} read from the disk cache"))
    else:
        from datasets_tools.images import load_rgb
        for i, ex in enumerate(data.examples):  # still check every image decodes before step 1
            try:
                load_rgb(ex.path)
            except Exception as e:
                skip(i, str(e))
    for i, why in sorted(skipped.items()):
        emit(Log(level="warning", message=f"skipped {data.examples[i].path}: {why}"))
    if skipped:
        _drop_examples(cfg, data, cache, set(skipped))
    return cache, True


def _drop_examples(cfg: C.Config, data: TrainData, cache: LatentCache | None, skipped: set[int]) -> None:
    keep = [i for i in range(len(data.examples)) if i not in skipped]
    if not any(not data.examples[i].is_reg for i in keep):
        raise UserError(f"data.dir: no usable image in {cfg.data.dir} (every image failed to decode)",
                        field="data.dir")
    remap = {old: new for new, old in enumerate(keep)}
    data.examples = [data.examples[i] for i in keep]
    if cache is not None:
        cache.keep(remap)


def _validation_set(cfg: C.Config, data: TrainData, base, accelerator, emit, stop_requested):
    """The held-out images with their latents, fixed timesteps and fixed noise; (set or None, complete)."""
    if not data.validation:
        return None, True
    vdata = TrainData(list(data.validation))
    tr = cfg.train
    timesteps = fixed_timesteps(tr.validation_timesteps, tr.min_timestep,
                                min(tr.max_timestep, base.noise_scheduler.config.num_train_timesteps))
    cache = None
    skipped: dict[int, str] = {}
    if cfg.data.cache_latents:
        cache = LatentCache(vdata, base.vae, device=accelerator.device, dtype=_weight_dtype(cfg), disk_dir=None,
                            flip=False)

        def progress(done: int, total: int) -> bool:
            emit(Phase(name="caching validation latents", done=done, total=total))
            return not stop_requested()

        if not cache.build(list(range(len(vdata.examples))), progress, skipped.__setitem__):
            return None, False
    for i, why in sorted(skipped.items()):
        emit(Log(level="warning", message=f"skipped validation image {vdata.examples[i].path}: {why}"))
    if skipped:
        keep = [i for i in range(len(vdata.examples)) if i not in skipped]
        if not keep:
            raise UserError("data.validation_dir: no validation image decodes", field="data.validation_dir")
        cache.keep({old: new for new, old in enumerate(keep)})
        vdata.examples = [vdata.examples[i] for i in keep]
    emit(Log(message=f"validation: {len(vdata.examples)} image(s) x {len(timesteps)} fixed timesteps"))
    return ValidationSet(vdata.examples, cache, timesteps, tr.seed), True


def _text_conditioning(cfg: C.Config, data: TrainData, base, device, validation=None) -> "TextConditioner":
    """Prompt embeddings; computed once for every caption when the text encoders are frozen and captions fixed."""
    texts = TextConditioner(base, cfg.model.clip_skip, device, cfg.data.max_token_length)
    if not cfg.lora.train_text_encoder and captions_are_static(cfg):
        caps = [e.caption for e in data.examples] + ([""] if cfg.data.caption_dropout > 0 else [])
        caps += [e.caption for e in (validation.examples if validation is not None else [])]
        with torch.autocast(device.type, enabled=False):
            texts.build_cache(caps, base.text_encoders)
        for te in base.text_encoders:  # no longer needed on the device; sampling moves them back
            te.to("cpu")
    return texts


def _release_cached_away(cfg: C.Config, base, cache, validation, texts, emit) -> None:
    """What the caches made unnecessary leaves the device: the VAE once every latent is cached, the frozen text
    encoders once every caption's embedding is. On a CPU, where leaving the device frees nothing, they are
    dropped (sampling keeps both: it needs them). Called once the latents are cached (``texts`` None: the VAE
    only, so it is gone before the text encoders run) and again once the captions are."""
    if _sampling_on(cfg) and cfg.sample.prompts:
        return
    vae_done = cache is not None and not isinstance(base.vae, SimpleNamespace)
    tes_done = texts is not None and texts.cache is not None and not cfg.lora.train_text_encoder
    if vae_done:
        base.vae.to("cpu")
    if base.unet.device.type != "cpu":
        return  # on a GPU they wait in host memory
    dropped = []
    if vae_done:
        # the latents' scaling is all the loss still reads of the VAE
        base.vae = SimpleNamespace(config=base.vae.config, dtype=base.vae.dtype)
        for c in (cache, validation.cache if validation is not None else None):
            if c is not None:
                c.vae = None
        dropped.append("the VAE")
    if tes_done and base.text_encoders:
        base.text_encoders = []
        dropped.append("the text encoder(s)")
    if dropped:
        import gc
        gc.collect()
        give_back_freed()  # the heap keeps freed blocks for reuse (cpu_alloc); these are gone for good
        for what in dropped:
            emit(Log(message=f"{what} freed: {'its' if what == 'the VAE' else 'their'} outputs are cached"))


def _optimization(cfg: C.Config, handles):
    """The optimizer (a separate lr for the text encoders) and the lr schedule."""
    from trainer.train.optim import make_optimizer, make_scheduler
    tr = cfg.train
    te_lr = tr.text_encoder_lr if tr.text_encoder_lr >= 0 else tr.learning_rate
    groups = [{"params": handles.unet_params, "lr": tr.learning_rate}]
    if cfg.lora.train_text_encoder:
        groups += [{"params": ps, "lr": te_lr} for ps in handles.text_encoder_params if ps]
    optimizer = make_optimizer(tr.optimizer, groups, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    scheduler = make_scheduler(optimizer, tr.lr_scheduler, warmup_steps=tr.lr_warmup_steps,
                               total_steps=tr.max_steps, num_cycles=tr.lr_num_cycles)
    return optimizer, scheduler


def _start_state(cfg: C.Config, run_dir: Path, resume: bool, trained: dict, optimizer, scheduler, ema,
                 emit) -> LoopState:
    """Step 0, or the newest checkpoint's step and data position (its LoRA, optimizer, schedule, EMA loaded)."""
    if not resume:
        return LoopState(step=0, epoch=0, batch_idx=0)
    ck = latest_checkpoint(run_dir)
    if ck is None:
        raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume",
                        path=str(run_dir))
    old_toml = (ck / "config.toml").read_text(encoding="utf-8") if (ck / "config.toml").exists() else ""
    changed = _changed_keys(old_toml, cfg)
    if changed:
        emit(Log(level="warning", message="resuming with changed settings: " + "; ".join(changed)))
    state = load_checkpoint(ck, modules=trained, optimizer=optimizer, scheduler=scheduler)
    if ema is not None:
        if "ema" not in state["extra"]:
            raise UserError(f"--resume: {ck} was saved without EMA; resume with train.ema_decay = 0 or start over",
                            field="train.ema_decay")
        ema.load_state_tensors(state["extra"]["ema"])
    emit(Log(message=f"resumed from {ck} at step {state['step']}"))
    pos = state["data"]
    return LoopState(step=state["step"], epoch=pos["epoch"], batch_idx=pos["batch_idx"],
                     validation=pos.get("validation", []), best_validation=pos.get("best_validation"))


def _stopped_before_training(run_dir: Path, emit) -> TrainResult:
    emit(RunEnded(status="stopped", step=0, error=""))
    emit(Log(message="stopped before the first step; nothing to save"))
    return TrainResult("stopped", 0, run_dir, None)


# ------------------------------------------------------------------------------------------- one step's loss

def _batch_loss(s: Session, idx: list[int], rng: random.Random) -> torch.Tensor:
    """The diffusion loss of one batch: noise the latents at random timesteps, predict, weigh, average."""
    cfg, tr, base, device = s.cfg, s.cfg.train, s.base, s.accelerator.device
    weight_dtype = _weight_dtype(cfg)
    exs = [s.data.examples[i] for i in idx]
    flips = [cfg.data.flip and rng.random() < 0.5 for _ in idx]
    latents = _latents(s, idx, flips).to(weight_dtype)
    captions = [process_caption(e.caption, cfg, rng) for e in exs]
    with torch.set_grad_enabled(cfg.lora.train_text_encoder):
        emb, pooled = s.texts.encode(captions, s.text_encoders)
    nsched = base.noise_scheduler
    noise = L.make_noise(latents, tr)
    t = L.sample_timesteps(latents.shape[0], tr, nsched.config.num_train_timesteps, device)
    noisy = L.noisy_input(nsched, latents, noise, t, tr)
    pred = _predict(s, noisy, t, emb, pooled, exs)
    v_pred = base.prediction_type == "v_prediction"
    target = nsched.get_velocity(latents, noise, t) if v_pred else noise
    c = L.huber_c(t, tr, nsched) if tr.loss_type in ("huber", "smooth_l1") else None
    weight = _mask_weights(s, idx, flips, tuple(latents.shape[-2:]), device)
    per = L.per_example(L.elementwise_loss(pred, target, tr, c), weight, cfg.data.mask_normalize)
    if weight is not None and cfg.data.inverted_mask_prior > 0:
        # ai-toolkit's inverted-mask prior: where the mask is off, the target is the base model's prediction
        outside = _mask_weights(s, idx, flips, tuple(latents.shape[-2:]), device, unmasked=0.0)
        prior = _base_prediction(s, noisy, t, captions, emb, pooled, exs)
        per = per + cfg.data.inverted_mask_prior * L.per_example(
            L.elementwise_loss(pred, prior, tr, c), 1.0 - outside, cfg.data.mask_normalize)
    tw = L.timestep_weights(nsched, t, tr, v_pred)
    if tw is not None:
        per = per * tw.to(per.device)
    w = torch.tensor([cfg.data.prior_loss_weight if e.is_reg else 1.0 for e in exs], device=per.device)
    return (per * w).mean()


def _latents(s: Session, idx: list[int], flips: list[bool], cache: "LatentCache | None" = None,
             examples: list | None = None) -> torch.Tensor:
    """Scaled VAE latents of the examples, from the cache or encoded now."""
    base, device = s.base, s.accelerator.device
    cache = s.cache if examples is None else cache
    examples = s.data.examples if examples is None else examples
    if cache is not None:
        lat = torch.stack([cache.get(i, f) for i, f in zip(idx, flips)]).to(device)
    else:
        with torch.no_grad():
            px = torch.stack([load_pixels(examples[i], f) for i, f in zip(idx, flips)]).to(device, base.vae.dtype)
            lat = base.vae.encode(px).latent_dist.mean.float()
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * base.vae.config.scaling_factor


@torch.no_grad()
def _base_prediction(s: Session, noisy: torch.Tensor, t: torch.Tensor, captions: list[str], emb, pooled,
                     exs) -> torch.Tensor:
    """What the base model alone predicts for the same input: every adapter off, in the UNet and in the text
    encoders. A trained text encoder's conditioning is encoded again without its adapters; frozen (or cached)
    conditioning is already the base's."""
    from trainer.lora.inject import adapters_off
    unet = s.accelerator.unwrap_model(s.unet)
    tes = [s.accelerator.unwrap_model(te) for te in s.text_encoders] if s.cfg.lora.train_text_encoder else []
    with adapters_off(unet, *tes):
        if tes:
            emb, pooled = s.texts.encode(captions, tes)
        return _predict(s, noisy, t, emb, pooled, exs, unet=unet).detach()


def _mask_weights(s: Session, idx: list[int], flips: list[bool], size: tuple[int, int], device,
                  cache: "LatentCache | None" = None, examples: list | None = None,
                  unmasked: float | None = None) -> torch.Tensor | None:
    """Per-latent loss weights (B, 1, h, w) from the masks, or None when no example of the batch has one;
    the masked-out area weighs data.unmasked_weight (or ``unmasked``)."""
    cache = s.cache if examples is None else cache
    examples = s.data.examples if examples is None else examples
    if not any(examples[i].masked for i in idx):
        return None
    masks = []
    for i, f in zip(idx, flips):
        m = cache.get_mask(i, f) if cache is not None else None
        if m is None and cache is None:
            m = load_mask(examples[i], f, size)
        if m is None:  # no mask (or no transparency): the whole picture trains
            m = torch.ones(1, *size)
        masks.append(m)
    return L.mask_weight(torch.stack(masks).to(device), s.cfg.data.unmasked_weight if unmasked is None else unmasked)


def _predict(s: Session, noisy: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, pooled, exs,
             unet=None) -> torch.Tensor:
    """The UNet's prediction (SDXL adds its pooled text embedding and size/crop conditioning)."""
    device, weight_dtype = s.accelerator.device, _weight_dtype(s.cfg)
    added = None
    if s.base.family == "sdxl":
        added = {"text_embeds": pooled.to(device, weight_dtype), "time_ids": _sdxl_time_ids(exs, device, weight_dtype)}
    with s.accelerator.autocast():
        return (unet or s.unet)(noisy, t, emb.to(device, weight_dtype), added_cond_kwargs=added).sample


# ------------------------------------------------------------------------------------------------- saving

def _save(s: Session, state: LoopState, *, final: bool) -> Path:
    """A checkpoint (the resume point) and a LoRA file; the final one is named after the run (plus diffusers')."""
    from trainer.lora.io import save_diffusers_lora
    cfg, step = s.cfg, state.step
    # Never save NaN/inf weights: the last good checkpoint stays the newest.
    if not bool(torch.stack([torch.isfinite(p).all() for p in s.params]).all()):
        raise _diverged(s, step, "LoRA weights became non-finite")
    name = f"{cfg.output.name}.safetensors" if final else f"{cfg.output.name}-step{step:08d}.safetensors"
    lora_path = s.run_dir / name
    if s.is_main:
        unwrap = s.accelerator.unwrap_model
        # a final checkpoint too: a finished run can be extended with --resume and a larger max_steps
        ck = save_checkpoint(s.run_dir, step, modules={k: unwrap(v) for k, v in s.trained.items()},
                             optimizer=s.optimizer, scheduler=s.scheduler,
                             data_pos=state.position(), config_toml=s.config_toml, keep=cfg.train.keep_checkpoints,
                             extra={"ema": s.ema.state_tensors()} if s.ema is not None else None)
        s.stats.finished_at = time.time() if final else 0.0
        if final and s.ema is not None and cfg.train.ema_save_both:
            _write_lora(s, state, s.run_dir / f"{cfg.output.name}-raw.safetensors", ema=False)
        _write_lora(s, state, lora_path)
        if final and cfg.output.also_diffusers:
            with s.output_weights():
                save_diffusers_lora(s.run_dir / "diffusers", unwrap(s.unet), s.base.text_encoders,
                                    family=s.base.family)
        if not final:
            s.emit(Checkpoint(step=step, path=str(ck), lora_path=str(lora_path)))
    s.accelerator.wait_for_everyone()
    return lora_path


@torch.no_grad()
def _validation_loss(s: Session) -> float:
    """Mean loss over the validation images x fixed timesteps, with fixed noise (no SNR weighting)."""
    v, tr, nsched = s.validation, s.cfg.train, s.base.noise_scheduler
    device, weight_dtype = s.accelerator.device, _weight_dtype(s.cfg)
    t = v.timesteps.to(device)
    k = len(t)
    total = 0.0
    for j, ex in enumerate(v.examples):
        latents = _latents(s, [j], [False], cache=v.cache, examples=v.examples).to(weight_dtype).expand(k, -1, -1, -1)
        noise = v.noise(j, latents)
        emb, pooled = s.texts.encode([ex.caption] * k, s.text_encoders)
        pred = _predict(s, nsched.add_noise(latents, noise, t), t, emb, pooled, [ex] * k)
        target = nsched.get_velocity(latents, noise, t) if s.base.prediction_type == "v_prediction" else noise
        c = L.huber_c(t, tr, nsched) if tr.loss_type in ("huber", "smooth_l1") else None
        weight = _mask_weights(s, [j] * k, [False] * k, tuple(latents.shape[-2:]), device, cache=v.cache,
                               examples=v.examples)
        total += float(L.per_example(L.elementwise_loss(pred, target, tr, c), weight,
                                     s.cfg.data.mask_normalize).mean())
    return total / len(v.examples)


def _validate(s: Session, state: LoopState) -> None:
    """One point of the validation curve (of the weights the files hold); keeps the best LoRA if asked."""
    was_training = s.unet.training
    s.unet.eval()  # no LoRA dropout: the same weights give the same number
    with s.output_weights():
        loss = _validation_loss(s)
    if was_training:
        s.unet.train()
    state.validation.append([state.step, loss])
    improved = state.best_validation is None or loss < state.best_validation
    if improved:
        state.best_validation = loss
    s.emit(Validation(step=state.step, loss=loss, best=state.best_validation))
    if s.cfg.output.tensorboard:
        s.accelerator.log({"validation_loss": loss}, step=state.step)
    if improved and s.cfg.train.keep_best and s.is_main:
        s.stats.finished_at = 0.0
        _write_lora(s, state, s.run_dir / f"{s.cfg.output.name}-best.safetensors")
    s.accelerator.wait_for_everyone()


def _write_lora(s: Session, state: LoopState, path: Path, *, ema: bool = True) -> None:
    """The one place a LoRA file is written (self-checked, metadata from the run's RunStats); the EMA's weights
    unless ema=False."""
    from trainer.lora.io import build_metadata, save_lora
    s.stats.step, s.stats.epoch, s.stats.validation_curve = state.step, state.epoch, state.validation
    with s.output_weights() if ema else nothing():
        save_lora(path, s.accelerator.unwrap_model(s.unet), s.base.text_encoders, family=s.base.family,
                  metadata=build_metadata(s.cfg, s.stats), save_precision=s.cfg.output.save_precision)


def _diverged(s: Session, step: int, what: str) -> UserError:
    last = latest_checkpoint(s.run_dir)
    keep = f"; the last good checkpoint is {last}" if last else ""
    return UserError(f"{what} at step {step}: training diverged; lower train.learning_rate (now "
                     f"{s.cfg.train.learning_rate:g}){keep}", field="train.learning_rate")


def _sampling_on(cfg: C.Config) -> bool:
    return bool(cfg.sample.every_steps or cfg.sample.every_epochs)


def _epochs_done(state: LoopState) -> int:
    """Epochs finished: the current one counts once its last batch has been used."""
    return state.epoch + (1 if state.batch_idx >= len(state.batches) else 0)


def _samples_due(sample, step: int, epochs_before: int, epochs_after: int) -> bool:
    """Samples after this step: every sample.every_steps steps, and when the step finished a multiple of
    sample.every_epochs epochs (once, even when both fall on the same step)."""
    by_steps = bool(sample.every_steps) and step % sample.every_steps == 0
    n = sample.every_epochs
    by_epochs = bool(n) and epochs_after // n > epochs_before // n
    return by_steps or by_epochs


def _samples(s: Session, step: int) -> None:
    if s.is_main and s.cfg.sample.prompts:
        _save_samples(s.cfg, s.base, s.accelerator.unwrap_model(s.unet), s.base.text_encoders, s.run_dir, step,
                      s.emit, s.accelerator.device)
    s.accelerator.wait_for_everyone()


def _any_process(accelerator, flag: bool) -> bool:
    """A stop seen by any process stops all of them at the same step."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


@torch.no_grad()
def _save_samples(cfg: C.Config, base, unet, text_encoders, run_dir: Path, step: int, emit, device) -> None:
    """One PNG per sample.prompts line (its kohya options over the [sample] settings), prompts encoded as the
    generator encodes them (A1111 weights, BREAK, as many 77-token windows as a prompt needs)."""
    from trainer.common.prompt_encoding import PromptEncoder
    from trainer.generate.prompt_syntax import parse_attention, parse_sample_prompts, strip_lora_tags
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
    encoder = PromptEncoder(base.family, base.tokenizers, cfg.model.clip_skip)
    zero_empty_negative = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    mixed = cfg.train.mixed_precision != "no"
    for i, sp in enumerate(parse_sample_prompts(s.prompts)):
        w, h = sp.width or s.width or cfg.data.resolution, sp.height or s.height or cfg.data.resolution
        steps = sp.steps or s.steps
        cfg_scale = s.guidance_scale if sp.guidance_scale is None else sp.guidance_scale
        seed = s.seed + i if sp.seed is None else sp.seed
        sampler = sp.sampler or s.sampler
        negative = s.negative_prompt if sp.negative is None else sp.negative
        pipe.scheduler = make_sampler(sampler, base.scheduler_config)
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.autocast(device.type, enabled=mixed, dtype=_weight_dtype(cfg) if mixed else None):
            embeds = encoder.pipeline_embeddings(parse_attention(strip_lora_tags(sp.prompt)),
                                                 parse_attention(strip_lora_tags(negative)), text_encoders,
                                                 zero_empty_negative=zero_empty_negative)
            img = pipe(**embeds, num_inference_steps=steps, guidance_scale=cfg_scale, width=w, height=h,
                       generator=g).images[0]
        path = out / f"step{step:08d}-{i:02d}.png"
        extra = {"Clip skip": cfg.model.clip_skip} if cfg.model.clip_skip > 1 else {}
        save_png(img, path, png_parameters(sp.prompt, negative, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                                           seed=seed, width=w, height=h, model=base.name,
                                           extra=extra | {"LoRA step": step, "Run": cfg.output.name}))
        emit(Sample(step=step, path=str(path), prompt=sp.prompt))
    if was_training:
        unet.train()
