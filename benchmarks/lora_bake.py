"""`lorastudio lora bake` on the full-size SD1.5 or SDXL architecture: seconds, the ratio against only saving, peak RSS.

Nothing is downloaded: the UNet, text encoder(s) and VAE are built from the real configs with random weights
(SD1.5: benchmarks/generate_speed.py, in fp32; SDXL: the shipped configs in trainer/assets/configs/sdxl, made
directly in fp16 so that preparing it needs about the checkpoint's size in RAM), saved as an fp16 single-file
checkpoint, and a random rank-32 kohya LoRA (UNet attention+FF+proj, every text encoder's attention+MLP) is
written by our own writer. The bake itself then runs in a fresh process, as a user's would: the single file is
streamed tensor by tensor into an fp16 checkpoint with the LoRA fused (``--via-model``: the checkpoint is loaded
as a model, fused and written, the way a diffusers-folder base is baked). In that same process the same model is
loaded again and only written with ``save_single_file``; the bake's time is reported as seconds and as a ratio
against that save. Peak RSS (``resource.getrusage``, and /proc's VmHWM) of the bake process, measured before the
save-only run, is compared with the checkpoint's size.

    python benchmarks/lora_bake.py              # SD1.5 size, CPU
    python benchmarks/lora_bake.py --family sdxl --work /tmp/bake_sdxl   # SDXL: a 6.5 GiB checkpoint, ~8 GiB RAM
    python benchmarks/lora_bake.py --via-model  # the bake through the loaded model instead of streaming
    python benchmarks/lora_bake.py --tiny       # the tiny test model: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB).

    Linux carries ru_maxrss over fork and exec, so the process that starts the measurement must itself stay
    small: ``main`` imports no torch and leaves the model building to a process of its own.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _hwm_gib() -> float | None:
    """The same peak from /proc (VmHWM, which exec does reset), as a cross-check; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def sdxl_base_model(dtype, seed: int = 0):
    """An SDXL-shaped BaseModel from the shipped configs with random weights made directly in ``dtype``.

    The modules are built on the meta device and each weight is drawn once in ``dtype`` (``randn / sqrt(fan_in)``
    for matrices and kernels, ones for norm scales, zeros for biases), so no fp32 copy of the 3.5 billion
    parameters is ever held.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.loading import BaseModel
    from trainer.models.single_file import base_config
    from trainer.models.tokenizers import clip_tokenizer

    def clip_config(component):
        return CLIPTextConfig(**{k: v for k, v in base_config("sdxl", component).items() if not k.startswith("_")})

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(base_config("sdxl", "unet"))
        vae = AutoencoderKL.from_config(base_config("sdxl", "vae"))
        te1 = CLIPTextModel(clip_config("text_encoder"))
        te2 = CLIPTextModelWithProjection(clip_config("text_encoder_2"))
    g = torch.Generator().manual_seed(seed)
    for m in (unet, vae, te1, te2):
        sd = {}
        for k, v in m.state_dict().items():
            if v.device.type != "meta":  # a buffer (position ids): kept as built
                sd[k] = v
            elif v.dim() >= 2:
                w = torch.randn(v.shape, generator=g, dtype=dtype)
                sd[k] = w.mul_(v[0].numel() ** -0.5)
            else:
                sd[k] = (torch.zeros if k.endswith("bias") else torch.ones)(v.shape, dtype=dtype)
        m.load_state_dict(sd, strict=True, assign=True)
        m.eval().requires_grad_(False)
    sched = {k: v for k, v in base_config("sdxl", "scheduler").items() if k != "_diffusers_version"}
    return BaseModel(family="sdxl", prediction_type=sched.get("prediction_type", "epsilon"), unet=unet, vae=vae,
                     text_encoders=[te1, te2], tokenizers=[clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")],
                     noise_scheduler=DDPMScheduler.from_config(sched), scheduler_config=sched,
                     source="(random SDXL architecture)", name="sdxl-random")


def prepare(folder: Path, tiny: bool, rank: int, family: str = "sd1") -> tuple[Path, Path]:
    """The base checkpoint (fp16) and one random LoRA for it."""
    import torch

    from benchmarks.generate_speed import sd15_base_model, tiny_base_model, write_random_loras
    from trainer.models.ldm_export import save_single_file

    t = time.perf_counter()
    if tiny:
        base = tiny_base_model("cpu", torch.float32)
    elif family == "sdxl":
        base = sdxl_base_model(torch.float16)
    else:
        base = sd15_base_model("cpu", torch.float32)
    lora = write_random_loras(base, folder, 1, rank)[0]
    ckpt = save_single_file(base.make_pipeline(), folder / "base.safetensors", dtype=torch.float16)
    print(f"prepared {base.name}: checkpoint {ckpt.stat().st_size / 2**30:.2f} GiB, LoRA rank {rank} "
          f"{lora.stat().st_size / 2**20:.1f} MiB, in {time.perf_counter() - t:.0f} s")
    return ckpt, lora


def child(folder: Path, rounds: int, threads: int = 0, via_model: bool = False, save: bool = True) -> dict:
    """The measurement, in a process that holds nothing else."""
    import torch
    if threads:
        torch.set_num_threads(threads)

    from trainer.config import ModelConfig
    from trainer.lora.tools.bake import bake
    from trainer.models.ldm_export import save_single_file
    from trainer.models.loading import load_base_model

    ckpt, lora = folder / "base.safetensors", next(folder.glob("bench_lora_*.safetensors"))
    rss_start = _rss_gib()
    bakes, bake_cpu, stages = [], [], []
    for r in range(rounds):
        marks: dict[str, float] = {}
        t0, c0 = time.perf_counter(), time.process_time()

        def progress(stage, done, total):
            marks.setdefault(stage, time.perf_counter())

        result = bake(ckpt, [f"{lora}:0.8"], folder / "baked.safetensors", overwrite=True, progress=progress,
                      stream=not via_model)
        end = time.perf_counter()
        bakes.append(end - t0)
        bake_cpu.append(time.process_time() - c0)
        # streamed: loading the layout, then reading + fusing + writing each tensor ("writing")
        names = {"loading base model": "load", "fusing": "fuse", "writing": "write"}
        order = sorted(marks.items(), key=lambda kv: kv[1])
        stages.append({names.get(k, k): (order[i + 1][1] if i + 1 < len(order) else end) - t
                       for i, (k, t) in enumerate(order)})
    rss_bake, hwm_bake = _rss_gib(), _hwm_gib()
    modules = result.loras[0].modules

    out = {"bake_s": min(bakes), "bake_cpu_s": min(bake_cpu), "stages": min(stages, key=lambda s: sum(s.values())),
           "rss_start_gib": rss_start, "rss_bake_gib": rss_bake, "hwm_bake_gib": hwm_bake, "modules": modules,
           "ckpt_gib": ckpt.stat().st_size / 2**30, "out_gib": result.size / 2**30,
           "threads": torch.get_num_threads()}
    if not save:
        return out
    saves, save_cpu = [], []
    model = load_base_model(ModelConfig(base=str(ckpt)), dtype=torch.float16, device="cpu")
    pipe = model.make_pipeline()
    for r in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        save_single_file(pipe, folder / "saved.safetensors", dtype=torch.float16)
        saves.append(time.perf_counter() - t0)
        save_cpu.append(time.process_time() - c0)
    return {**out, "save_s": min(saves), "save_cpu_s": min(save_cpu)}


def _work_dir(work: str | None) -> str | None:
    if work is None:
        return None
    Path(work).mkdir(parents=True, exist_ok=True)
    return work


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="bakes and saves each (the fastest of each is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads of the bake (0 = torch's default; "
                    "on a busy 2-core machine 1 avoids threads spinning on small matmuls)")
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                    help="the architecture: SD1.5 (2.0 GiB checkpoint) or SDXL (6.5 GiB; needs about 8 GiB of RAM)")
    ap.add_argument("--work", metavar="DIR", help="write the checkpoints here (emptied of them at the end) instead "
                    "of a temporary folder; SDXL needs about 20 GiB of disk")
    ap.add_argument("--via-model", action="store_true", help="bake through the loaded model, as a diffusers-folder "
                    "base is baked, instead of streaming the single file tensor by tensor")
    ap.add_argument("--no-save", action="store_true", help=argparse.SUPPRESS)  # child only: no save-only baseline
    ap.add_argument("--tiny", action="store_true", help="use the tiny test model (smoke run)")
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare), args.tiny, args.rank, args.family)
        return 0
    if args.child:
        print(json.dumps(child(Path(args.child), args.rounds, args.threads, args.via_model, not args.no_save)))
        return 0

    env = dict(os.environ, LORASTUDIO_NO_BAR="1")
    with tempfile.TemporaryDirectory(dir=_work_dir(args.work)) as tmp:
        prep = [sys.executable, __file__, "--prepare", tmp, "--rank", str(args.rank), "--family", args.family,
                *(["--tiny"] if args.tiny else [])]
        if subprocess.run(prep, cwd=ROOT, env=env).returncode != 0:
            return 1
        run = subprocess.run([sys.executable, __file__, "--child", tmp, "--rounds", str(args.rounds),
                              "--threads", str(args.threads), *(["--via-model"] if args.via_model else [])],
                             cwd=ROOT, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            print(run.stderr, file=sys.stderr)
            return run.returncode
        r = json.loads(run.stdout.strip().splitlines()[-1])
    s = r["stages"]
    how = "through the loaded model" if args.via_model else "streamed"
    print(f"bake {how} (load + fuse {r['modules']} modules + write fp16), {r['threads']} threads: "
          f"{r['bake_s']:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in s.items())})")
    print(f"save_single_file of the same model, same process: {r['save_s']:.1f} s")
    print(f"bake / save: {r['bake_s'] / r['save_s']:.2f}; (fuse + write) / save: "
          f"{(s.get('fuse', 0) + s['write']) / r['save_s']:.2f}")
    # on a shared machine the wall clock also counts other processes; this process's CPU seconds do not
    print(f"CPU seconds of this process: bake {r['bake_cpu_s']:.1f} s, save {r['save_cpu_s']:.1f} s, "
          f"ratio {r['bake_cpu_s'] / r['save_cpu_s']:.2f}")
    hwm = f", VmHWM {r['hwm_bake_gib']:.2f} GiB" if r["hwm_bake_gib"] is not None else ""
    print(f"peak RSS of the bake process: {r['rss_bake_gib']:.2f} GiB (getrusage{hwm}; {r['rss_start_gib']:.2f} GiB "
          f"after imports); checkpoint {r['ckpt_gib']:.2f} GiB, so peak - checkpoint = "
          f"{r['rss_bake_gib'] - r['ckpt_gib']:+.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
