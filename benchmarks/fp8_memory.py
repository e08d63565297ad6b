"""fp8 base weights (train.fp8_base): memory of the full-size SD1.5 UNet with and without, on this CPU.

Each mode runs in its own process: build the full-size SD1.5 UNet with random weights in the compute dtype, (fp8
mode) store its Linear/Conv weights as float8 (trainer.models.fp8), add a rank-16 LoRA on the attention layers,
then run training steps (forward + backward + AdamW) at 256 px, batch 1. Reported per mode: the UNet's weight
bytes, the peak RSS while building (the full-precision model exists once, before conversion), and the peak RSS
of the training steps (the kernel's high-water mark is reset after set-up: /proc/self/clear_refs).

    python -m benchmarks.fp8_memory [--steps 2] [--resolution 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = {"bf16": ("bf16", False), "fp8 (bf16 compute)": ("bf16", True), "fp32": ("fp32", False),
         "fp8 (fp32 compute)": ("fp32", True)}


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def one(dtype_name: str, fp8: bool, steps: int, resolution: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.train_speed import SD15_UNET
    from trainer import config as C
    from trainer.lora.inject import inject_lora
    from trainer.models.fp8 import UNET_KEEP, store_fp8, weight_bytes
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    unet = UNet2DConditionModel(**SD15_UNET)
    torch.set_default_dtype(torch.float32)
    unet.requires_grad_(False)
    lcfg = C.load_config(None, ["lora.rank=16", "lora.alpha=16"]).lora
    handles = inject_lora(unet, [], lcfg, train_text_encoder=False)
    if fp8:
        store_fp8(unet, dtype, keep=UNET_KEEP)
    build_peak = _hwm_mib()
    lora_bytes = sum(p.numel() * p.element_size() for p in handles.unet_params)
    opt = torch.optim.AdamW(handles.unet_params, lr=1e-4)
    lat = resolution // 8
    x, ctx = torch.randn(1, 4, lat, lat, dtype=dtype), torch.randn(1, 77, 768, dtype=dtype)
    _reset_hwm()
    t0 = time.perf_counter()
    for _ in range(steps):
        noise = torch.randn_like(x)
        pred = unet(x + noise, torch.randint(0, 1000, (1,)), ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"unet_weight_bytes": weight_bytes(unet) - lora_bytes, "build_peak_rss_mib": round(build_peak),
            "train_peak_rss_mib": round(_hwm_mib()), "s_per_step": round((time.perf_counter() - t0) / steps, 2),
            "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        dt, fp8 = MODES[args.one]
        print(json.dumps(one(dt, fp8, args.steps, args.resolution)))
        return
    root = Path(__file__).resolve().parent.parent
    res = {}
    for mode in args.modes.split(","):
        r = subprocess.run([sys.executable, "-m", "benchmarks.fp8_memory", "--one", mode, "--steps", str(args.steps),
                            "--resolution", str(args.resolution)], cwd=root, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{mode}: failed\n{r.stderr[-2000:]}")
        res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"full-size SD1.5 UNet, LoRA rank 16 (attention), {args.resolution} px, batch 1, {args.steps} steps")
    print("| mode | UNet weights | ratio | peak RSS, building | peak RSS, training steps | s/step |")
    print("|---|---|---|---|---|---|")
    for mode, r in res.items():
        ref = res.get(MODES[mode][0]) or r
        print(f"| {mode} | {r['unet_weight_bytes'] / 2**20:.0f} MiB | "
              f"{r['unet_weight_bytes'] / ref['unet_weight_bytes']:.2f} | {r['build_peak_rss_mib']} MiB | "
              f"{r['train_peak_rss_mib']} MiB | {r['s_per_step']} |")


if __name__ == "__main__":
    main()
