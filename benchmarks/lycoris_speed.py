"""LoHa/LoKr/DoRA speed against LoRA of the same rank: fused generation with 3 files, and one training step.

Everything runs in one process on an SD1.5-architecture model with random weights (no download), so each figure is
a ratio measured in the same run (interleaved rounds, the median printed):

* generation: the time to apply 3 LoRA / LoHa / LoKr files fused (weights patched) and to make one image with
  them, against the base model's image time (issue goal: 3 LoHa/LoKr cost no more than 3 LoRAs);
* training: one optimizer step (UNet forward + backward + AdamW) with a LoRA, LoHa, LoKr or DoRA adapter of the
  same rank on the UNet, one type after the other (issue goal: LoHa/LoKr at most 1.3x LoRA); LoHa and LoKr also with
  peft's own forward (the full delta rebuilt each step, what trainer.lora.lycoris_fast replaces).

    python benchmarks/lycoris_speed.py                    # SD1.5 shapes, 64 px latents / 2 steps: CPU-friendly
    python benchmarks/lycoris_speed.py --size 256 --device cuda
    python benchmarks/lycoris_speed.py --tiny             # the tiny test model: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.generate_speed import sd15_base_model, timed, tiny_base_model  # noqa: E402
from benchmarks.threads import add_threads_option, use_threads  # noqa: E402

KINDS = ("lora", "loha", "lokr", "dora")
PEFT = "-peft"
#: training rows: each type with our forward, and LoHa/LoKr with peft's own (the figure before trainer.lora.lycoris_fast)
TRAIN_KINDS = KINDS + (f"loha{PEFT}", f"lokr{PEFT}")


def _model(args, device, seed=0):
    import torch
    return tiny_base_model(device, torch.float32) if args.tiny else sd15_base_model(device, torch.float32, seed)


def _cfg(kind: str, rank: int, conv_rank: int = 0):
    from trainer.config import LoraConfig
    return LoraConfig(type=kind, rank=rank, alpha=rank / 2, unet_targets="kohya", text_encoder_targets="attention_mlp",
                      conv_rank=conv_rank, conv_alpha=conv_rank / 2)


def write_files(args, device, folder: Path, kind: str, n: int) -> list[Path]:
    """n files of ``kind`` written by our injector + writer on a fresh copy of the model (same random base)."""
    import torch

    from trainer.lora.inject import inject_lora
    from trainer.lora.io import save_lora

    import gc
    base = _model(args, device)
    handles = inject_lora(base.unet, base.text_encoders, _cfg(kind, args.rank), train_text_encoder=True)
    g = torch.Generator().manual_seed(1234)
    init = [p.detach().clone() for p in handles.all_params]
    paths = []
    with torch.no_grad():
        for i in range(n):
            for p, p0 in zip(handles.all_params, init):
                p.copy_(p0 + torch.randn(p.shape, generator=g).to(p) * 0.02)
            path = folder / f"bench_{kind}_{i}.safetensors"
            save_lora(path, base.unet, base.text_encoders, family="sd1", metadata={}, save_precision="fp16")
            paths.append(path)
    del base, handles, init
    gc.collect()
    return paths


def generation(args, device) -> dict[str, dict[str, float]]:
    from trainer.generate.engine import Generator, LoraSpec

    base = _model(args, device)
    gen = Generator(base)
    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        files = {k: write_files(args, device, Path(d), k, 3) for k in ("lora", "loha", "lokr")}
        for k in files:  # read once (the RAM cache), as the Generate tab does after the first image
            gen.set_loras([LoraSpec(str(p), 0.7) for p in files[k]])
        gen.clear_loras()

        def image():
            gen.generate("a cat", seed=1, steps=args.steps, width=args.size, height=args.size, guidance_scale=5.0)

        for _ in range(args.rounds):
            gen.clear_loras()
            out.setdefault("base", {}).setdefault("image", []).append(timed(image, device))
            for k, paths in files.items():
                for w in (0.7, 0.8):  # a new weight re-merges
                    t = timed(lambda: gen.set_loras([LoraSpec(str(p), w) for p in paths]), device)
                out.setdefault(k, {}).setdefault("apply", []).append(t)
                out[k].setdefault("image", []).append(timed(image, device))
        gen.release()
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in out.items()}


def training(args, device) -> dict[str, float]:
    import torch

    from trainer.lora.inject import inject_lora

    import gc
    res = {}
    for name in args.train_kinds:  # one model at a time (four SD1.5 UNets with optimizer state do not fit a small machine)
        kind, peft_forward = name.removesuffix(PEFT), name.endswith(PEFT)
        base = _model(args, device)
        torch.manual_seed(0)
        h = inject_lora(base.unet, base.text_encoders, _cfg(kind, args.rank, args.conv_rank), train_text_encoder=False)
        if peft_forward:  # peft's own forward: the full delta weight rebuilt and applied as an extra matmul
            for _, _, layer in h.modules:
                layer.__dict__.pop("_get_delta_activations", None)
                layer.__dict__.pop("forward", None)
        unet, opt = base.unet, torch.optim.AdamW(h.all_params, lr=1e-4)
        lat = max(8, args.size // 8)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 4, lat, lat, generator=g).to(device)
        ehs = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=g).to(device)
        t = torch.tensor([500] * args.batch, device=device)

        def step():
            loss = unet(x, t, ehs).sample.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        res[name] = statistics.median(timed(step, device) for _ in range(args.rounds))
        base = h = unet = opt = None  # free this model before the next is built
        gc.collect()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image side in px (latents are size/8)")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps per image")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="training batch")
    ap.add_argument("--conv-rank", type=int, default=0, help="training: also adapt the 3x3 convs at this rank")
    ap.add_argument("--device", default="cpu")
    add_threads_option(ap)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", choices=("generation", "training"), default=None)
    ap.add_argument("--train-kinds", nargs="+", choices=TRAIN_KINDS, default=list(TRAIN_KINDS),
                    help=f"training rows ('{PEFT}': peft's own forward); lora first, it is the ratios' base")
    args = ap.parse_args(argv)
    use_threads(args.threads)
    what = "tiny test model" if args.tiny else "SD1.5 shapes, random weights"
    print(f"{what}, rank {args.rank}, {args.size} px, device {args.device}, {args.rounds} rounds (medians)")
    if args.only != "training":
        r = generation(args, args.device)
        b = r["base"]["image"]
        print(f"generation, 3 files fused, {args.steps} steps: base image {b:.3f}s")
        for k in ("lora", "loha", "lokr"):
            print(f"  3x {k:<5} apply {r[k]['apply']:.3f}s ({r[k]['apply'] / r['lora']['apply']:.2f}x LoRA)  "
                  f"image {r[k]['image']:.3f}s ({r[k]['image'] / b:.2f}x base, "
                  f"{r[k]['image'] / r['lora']['image']:.2f}x LoRA)")
    if args.only != "generation":
        r = training(args, args.device)
        print(f"training step (UNet, batch {args.batch}, conv rank {args.conv_rank}):")
        for k in args.train_kinds:
            print(f"  {k:<20} {r[k]:.3f}s  " + (f"{r[k] / r['lora']:.2f}x LoRA" if "lora" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
