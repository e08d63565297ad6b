"""One command for a GPU: the figures issue 18 judges us by, measured on full-size SD1.5 and SDXL architectures with
random weights built from the shipped configs (trainer/assets/configs; no download).

    python -m benchmarks.gpu_check [--out DIR]      # one H100/H200: about 10 minutes
    python -m benchmarks.gpu_check --smoke --out DIR  # CPU, tiny models, seconds: keeps the script from rotting

Measures (docs/benchmarks.md, 'GPU check'): a bare UNet+LoRA training step in bf16 with SDPA for SD1.5 512 px batch
4 and SDXL 1024 px batch 1 (s/step, samples/s, the step's FLOPs counted with torch.utils.flop_counter on one
step, MFU against the GPU's bf16 peak from PEAK_BF16, peak allocated memory); the SDXL step with the
sdxl-lowvram settings (fp8 base, gradient checkpointing, AdamW 8-bit, rank 16, batch 1) under per-process
memory caps of 8, 12 and 16 GiB (fits or not, peak memory), each in its own process; our step through
trainer.train.recipe.train against the bare step in the same process (ratio); fused 3-LoRA generation against
the base model (benchmarks/generate_speed.py's ratio). Writes gpu_check.json and gpu_check.md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORASTUDIO_NO_BAR", "1")

ROOT = Path(__file__).resolve().parents[1]
#: dense bf16 peak FLOP/s by device name (first match wins; vendor data sheets)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))
CAPS_GIB = (8, 12, 16)
GOALS = {"ours_over_bare": 1.05, "sd15_mfu": 0.35, "sdxl_lowvram_fits_gib": 8, "fused_over_base": 1.03}


def peak_flops(device) -> float | None:
    import torch
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def build_unet(family: str, smoke: bool):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    if smoke:
        from tests.fixtures.tiny_models import build_tiny_pipeline
        return build_tiny_pipeline(family).unet
    from trainer.models.single_file import base_config
    cfg = {k: v for k, v in base_config(family, "unet").items() if not k.startswith("_")}
    return UNet2DConditionModel.from_config(cfg)


def inputs(unet, batch: int, res: int, device, dtype):
    import torch
    c = unet.config
    lat = res // 8
    kw = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                   "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device,
                                                            dtype=dtype)}
    return (torch.randn(batch, 4, lat, lat, device=device, dtype=dtype),
            torch.randn(batch, 77, c.cross_attention_dim, device=device, dtype=dtype), kw)


def bare_step_bench(family: str, res: int, batch: int, steps: int, smoke: bool, lowvram: bool = False) -> dict:
    """A bare UNet+LoRA step (rank 16 on attention) in bf16 with SDPA: s/step, FLOPs, MFU, peak memory."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode

    from trainer import config as C
    from trainer.lora.inject import inject_lora
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 kernels are slow
    unet = build_unet(family, smoke).to(device, dtype).requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    handles = inject_lora(unet, [], C.load_config(None, ["lora.rank=16", "lora.alpha=16"]).lora,
                          train_text_encoder=False)
    optim = "adamw"
    if lowvram:
        from trainer.models.fp8 import UNET_KEEP, store_fp8
        store_fp8(unet, dtype, keep=UNET_KEEP)
        unet.enable_gradient_checkpointing()
        unet.train()
    if lowvram and device.type == "cuda":
        import bitsandbytes as bnb
        opt, optim = bnb.optim.AdamW8bit(handles.unet_params, lr=1e-4), "adamw8bit"
    else:
        opt = torch.optim.AdamW(handles.unet_params, lr=1e-4)
    x, ctx, kw = inputs(unet, batch, res, device, dtype)

    def step():
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,), device=device)
        pred = unet(x + noise, t, ctx, **kw).sample
        torch.nn.functional.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (kernels, allocator)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    peak = peak_flops(device)
    return {"family": family, "resolution": res, "batch": batch, "device": _device_name(device), "optimizer": optim,
            "fp8_base": lowvram, "gradient_checkpointing": lowvram, "s_per_step": s, "samples_per_s": batch / s,
            "step_flops": flops, "mfu": flops / s / peak if peak else None,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def _device_name(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def capped(cap_gib: int, smoke: bool) -> dict:
    """The sdxl-lowvram step with this process capped at cap_gib (run in a child process of its own)."""
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    try:
        r = bare_step_bench("sdxl", 256 if smoke else 1024, 1, 2, smoke, lowvram=True)
        return {"cap_gib": cap_gib, "fits": True, "peak_allocated_gib": r["peak_allocated_gib"],
                "s_per_step": r["s_per_step"]}
    except torch.OutOfMemoryError:
        return {"cap_gib": cap_gib, "fits": False, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


def ours_vs_bare(smoke: bool, tmp: Path) -> dict:
    """Our step through trainer.train (a folder of generated images) against the bare step, same process."""
    import argparse as ap

    import torch

    from diffusers import UNet2DConditionModel

    from benchmarks.train_speed import build_full_sd15, make_images, ours
    from trainer import config as C
    from trainer.lora.inject import inject_lora
    model = tmp / "sd15"
    if smoke:
        from tests.fixtures.tiny_models import save_tiny_pipeline
        save_tiny_pipeline(model, "sd1")
    else:
        build_full_sd15(model)
    res = 64 if smoke else 512
    make_images(tmp / "data", 4, res)
    args = ap.Namespace(resolution=res, steps=4 if smoke else 20, train_te=False, fp8_base=False, compile=False)
    cuda = torch.cuda.is_available() and not smoke
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    o, _, _ = ours(model, tmp / "data", tmp / "out", args, ("train.mixed_precision=bf16",) if cuda else ())
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device, dtype).requires_grad_(False)
    torch.manual_seed(0)
    handles = inject_lora(unet, [], C.load_config(None, ["lora.rank=16", "lora.alpha=16"]).lora,
                          train_text_encoder=False)
    opt = torch.optim.AdamW(handles.unet_params, lr=1e-4, weight_decay=0.01)
    x, ctx, kw = inputs(unet, 1, res, device, dtype)
    r = []
    for _ in range(args.steps):  # the bare loop: forward, backward, clipping, AdamW
        t0 = time.perf_counter()
        noise = torch.randn_like(x)
        pred = unet(x + noise, torch.randint(0, 1000, (1,), device=device), ctx, **kw).sample
        torch.nn.functional.mse_loss(pred.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(handles.unet_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        r.append(time.perf_counter() - t0)
    warm = max(1, args.steps // 4)
    a, b = statistics.median(o[warm - 1:]), statistics.median(r[warm:])
    return {"ours_s_per_step": a, "bare_s_per_step": b, "ratio": a / b,
            "note": f"SD1.5 {res} px batch 1, latents and text-encoder outputs cached"}


def generation(smoke: bool) -> dict:
    """benchmarks/generate_speed.py (3 fused LoRAs vs the base model); its printed figures."""
    import torch
    argv = ["--tiny", "--rounds", "1", "--steps", "1", "--size", "64"] if smoke else \
        ["--size", "512", "--steps", "20", "--rounds", "4",
         "--device", "cuda" if torch.cuda.is_available() else "cpu"]
    r = subprocess.run([sys.executable, "-m", "benchmarks.generate_speed", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if "fused" in ln or "base" in ln]
    return {"returncode": r.returncode, "lines": lines}


def markdown(res: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "n/a" if v is None else fmt.format(v)
    out = [f"# GPU check ({res['device']}, torch {res['torch']}{', smoke run: tiny models on CPU' if res['smoke'] else ''})",
           "", "| step | s/step | samples/s | step TFLOP | MFU | peak allocated GiB |", "|---|---|---|---|---|---|"]
    for r in res["steps"]:
        name = f"{r['family']} {r['resolution']} px batch {r['batch']}" + (" (sdxl-lowvram)" if r["fp8_base"] else "")
        out.append(f"| {name} | {f(r['s_per_step'])} | {f(r['samples_per_s'], '{:.2f}')} | "
                   f"{r['step_flops'] / 1e12:.3f} | {f(r['mfu'], '{:.1%}')} | {f(r['peak_allocated_gib'], '{:.2f}')} |")
    out += ["", "| memory cap | fits | peak allocated GiB |", "|---|---|---|"]
    for c in res["caps"]:
        out.append(f"| {c['cap_gib']} GiB | {c.get('fits', c.get('skipped'))} | "
                   f"{f(c.get('peak_allocated_gib'), '{:.2f}')} |")
    o = res["ours_vs_bare"]
    out += ["", f"our step / bare step: {o['ratio']:.3f} ({o['ours_s_per_step']:.3f} / {o['bare_s_per_step']:.3f} s) "
            f"{o['note']}", "", "generation (benchmarks/generate_speed.py):", ""]
    out += [f"    {ln}" for ln in res["generation"]["lines"]]
    out += ["", "goals (issue 18, item 7): " + ", ".join(f"{k} {v}" for k, v in GOALS.items())]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, seconds")
    ap.add_argument("--cap-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cap_child:
        print(json.dumps(capped(args.cap_child, args.smoke)))
        return 0
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.smoke
    res = {"smoke": args.smoke, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "goals": GOALS}
    n = 2 if args.smoke else 10
    res["steps"] = [bare_step_bench("sd1", 64 if args.smoke else 512, 4, n, args.smoke),
                    bare_step_bench("sdxl", 64 if args.smoke else 1024, 1, n, args.smoke)]
    caps = []
    for cap in CAPS_GIB:
        if not cuda:
            caps.append({"cap_gib": cap, "skipped": "no CUDA"})
            continue
        r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cap-child", str(cap)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        caps.append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                    {"cap_gib": cap, "fits": False, "error": r.stderr[-500:]})
    res["caps"] = caps
    with tempfile.TemporaryDirectory() as tmp:
        res["ours_vs_bare"] = ours_vs_bare(args.smoke, Path(tmp))
    res["generation"] = generation(args.smoke)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2), encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
