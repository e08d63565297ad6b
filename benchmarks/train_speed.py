"""Training speed: our steady-state step time over a raw UNet+LoRA step, in the same process.

Builds a full-size SD1.5-architecture pipeline with random weights (no download), saves it as a diffusers
folder, trains through trainer.train() at 256 px, batch 1, rank 16 with latents and text-encoder outputs
cached, then times a bare loop (UNet forward + backward + AdamW on the same LoRA) on the same process.

    python benchmarks/train_speed.py [--steps 12] [--resolution 256] [--keep DIR] [--train-te] [--validation]
                                     [--fp8-base] [--compile]

Prints: ours s/step, raw s/step, ratio (goal <= 1.05), time to first step, the peak RSS of our run (read before
the raw loop starts), and the memory after each set-up phase (RSS now / high-water mark, from /proc/self/status),
so what holds the peak can be seen. --fp8-base runs ours with train.fp8_base and the raw loop over the same fp8
weights; --compile runs ours with train.compile (the raw loop stays eager). Each mode is one process: run the
script once per mode to compare peaks.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORASTUDIO_NO_BAR", "1")

import torch  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)


def build_full_sd15(path: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models.tokenizers import clip_tokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      hidden_act="quick_gelu", projection_dim=768))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path, safe_serialization=True)


def make_images(folder: Path, n: int, res: int) -> None:
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (res, res), (200, 180 - i * 10, 160))
        ImageDraw.Draw(img).ellipse([20 + i * 5, 30, 150, 160 + i * 5], fill=(40 * i % 255, 90, 200))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zxq style, picture {i}")


def _mem_mib() -> tuple[float, float]:
    """(RSS now, RSS high-water mark) of this process in MiB (Linux)."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line[:5]] = int(line.split()[1]) / 1024
    return vals.get("VmRSS", float("nan")), vals.get("VmHWM", float("nan"))


def ours(model: Path, data: Path, out: Path, args, extra: tuple = (),
         phases: list | None = None) -> tuple[list[float], float, list[float]]:
    from trainer import config as C
    from trainer.train.recipe import train
    modes = (["train.fp8_base=true"] if args.fp8_base else []) + (["train.compile=true"] if args.compile else [])
    cfg = C.load_config(None, [*extra, *modes, 
        f"model.base={model}", f"data.dir={data}", f"data.resolution={args.resolution}",
        f"data.min_bucket_px={args.resolution}", "lora.rank=16", "lora.alpha=16",
        f"lora.train_text_encoder={'true' if args.train_te else 'false'}", f"train.max_steps={args.steps}",
        "train.batch_size=1", "train.learning_rate=1e-4", f"output.dir={out}", "output.name=bench"])
    times: list[float] = []
    validations: list[float] = []  # seconds from a step's event to its validation's event
    first = {}
    t0 = time.perf_counter()

    def on_event(e):
        if phases is not None and (e.type in ("log", "phase") and (e.type == "log" or e.done in (0, e.total))
                                   or e.type == "step" and (e.step <= 2 or e.step == args.steps)
                                   or e.type == "run_ended"):
            what = (e.message if e.type == "log" else e.name if e.type == "phase"
                    else f"run ended ({e.status}, final save included)" if e.type == "run_ended" else f"step {e.step}")
            phases.append((time.perf_counter() - t0, what[:60], *_mem_mib()))
            print("  %7.1f s  %s  %6.0f MiB  %6.0f MiB" % phases[-1], flush=True)
        if e.type == "step":
            first.setdefault("t", time.perf_counter() - t0)
            times.append(e.time)
        elif e.type == "validation" and e.step < args.steps:
            validations.append(e.time - times[-1])
    train(cfg, on_event=on_event, overwrite=True)
    return [b - a for a, b in zip(times, times[1:])], first["t"], validations


def raw(model: Path, args) -> list[float]:
    """The floor: the same UNet with the same LoRA, cached-latent-shaped inputs, forward/backward/AdamW only."""
    from diffusers import UNet2DConditionModel

    from trainer import config as C
    from trainer.lora.inject import inject_lora
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    torch.manual_seed(0)
    lcfg = C.load_config(None, ["lora.rank=16", "lora.alpha=16"]).lora
    handles = inject_lora(unet, [], lcfg, train_text_encoder=False)
    if args.fp8_base:  # the same frozen fp8 weights as ours (trainer/models/fp8.py), computing in fp32
        from trainer.models.fp8 import UNET_KEEP, store_fp8
        store_fp8(unet, torch.float32, keep=UNET_KEEP)
    opt = torch.optim.AdamW(handles.unet_params, lr=1e-4, weight_decay=0.01)
    lat = args.resolution // 8
    x = torch.randn(1, 4, lat, lat)
    ctx = torch.randn(1, 77, 768)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        t = torch.randint(0, 1000, (1,))
        noise = torch.randn_like(x)
        pred = unet(x + noise, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(handles.unet_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--keep", help="reuse/keep the generated model in this folder")
    ap.add_argument("--train-te", action="store_true", help="also train the text encoder (no TE-output cache)")
    ap.add_argument("--validation", action="store_true", help="also time the validation loss (one held-out picture)")
    ap.add_argument("--fp8-base", action="store_true", help="ours with train.fp8_base, the raw loop over fp8 weights")
    ap.add_argument("--compile", action="store_true", help="ours with train.compile (regional torch.compile)")
    ap.add_argument("--skip-raw", action="store_true", help="no raw loop (no ratio): our step time and memory only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lorastudio-bench-"))
    model = Path(args.keep) if args.keep else tmp / "sd15-random"
    if not (model / "model_index.json").exists():
        t = time.perf_counter()
        build_full_sd15(model)
        print(f"built full-size SD1.5-architecture model in {time.perf_counter() - t:.1f} s")
        try:  # the build's own peak is not our run's: reset the high-water mark (Linux)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    make_images(tmp / "data", 4, args.resolution)
    phases: list = []
    ours_dt, first, _ = ours(model, tmp / "data", tmp / "out", args, phases=phases)
    ours_peak = _mem_mib()[1]
    raw_dt = None if args.skip_raw else raw(model, args)
    warm = max(2, args.steps // 4)
    o = statistics.median(ours_dt[warm - 1:])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.resolution}px, batch 1, rank 16, "
          f"text encoder {'trained' if args.train_te else 'frozen (outputs cached)'}, latents cached"
          + (", train.fp8_base" if args.fp8_base else "") + (", train.compile" if args.compile else ""))
    if raw_dt is None:
        print(f"ours: {o:.3f} s/step (median of {len(ours_dt[warm - 1:])}; raw loop skipped)")
    else:
        r = statistics.median(raw_dt[warm:])
        print(f"ours: {o:.3f} s/step   raw UNet+LoRA step: {r:.3f} s/step   ratio: {o / r:.3f} (goal <= 1.05)")
    print(f"time to first step: {first:.1f} s   peak RSS of our run: {ours_peak:.0f} MiB "
          f"({ours_peak / 1024:.2f} GiB; the whole process, raw loop too: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    print("memory after each set-up phase of our run (s since start, RSS now, high-water mark):")
    for t, what, rss, hwm in phases:
        print(f"  {t:7.1f} s  {rss:6.0f} MiB  {hwm:6.0f} MiB  {what}")
    if args.validation:
        make_images(tmp / "val", 1, args.resolution)
        _, _, val = ours(model, tmp / "data", tmp / "out-val", args,
                         (f"data.validation_dir={tmp / 'val'}", f"train.validation_every_steps={max(1, args.steps // 3)}"))
        v = statistics.median(val)
        print(f"validation: {v:.3f} s per evaluation (1 picture x 4 timesteps) = {v / o:.2f} steps; "
              f"every 100 steps it adds {100 * v / (100 * o):.1f}% (goal <= 5%)")


if __name__ == "__main__":
    main()
