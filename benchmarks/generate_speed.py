"""Multi-LoRA generation speed on an SD1.5-architecture model with random weights: fused/base, unfused/base, re-weight, load.

Everything runs in one process with the same seed, so each figure is a ratio against the base model measured in
the same run (interleaved rounds; min and median over rounds are printed). No download: the UNet, CLIP-L text
encoder and VAE are built from the real SD1.5 configs with random weights. Three random kohya-format LoRAs
(rank 16, attention+FF+proj on the UNet = 192 modules, attention+MLP on the text encoder = 72 modules) are
written by our own writer and read back by our reader.

    python benchmarks/generate_speed.py                  # 128x128, 4 steps: CPU-friendly
    python benchmarks/generate_speed.py --size 256 --steps 8 --device cuda
    python benchmarks/generate_speed.py --tiny           # the tiny test model: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.threads import add_threads_option, use_threads  # noqa: E402


def sd15_base_model(device: str, dtype, seed: int = 0):
    """An SD1.5-shaped BaseModel (real configs, random weights) built in memory."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models.loading import BaseModel
    from trainer.models.tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5)
    te = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14 text config
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 _class_name="PNDMScheduler")
    for m in (unet, te, vae):
        m.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:
            m.to(dtype)
    return BaseModel(family="sd1", prediction_type="epsilon", unet=unet, vae=vae, text_encoders=[te],
                     tokenizers=[clip_tokenizer()], noise_scheduler=DDPMScheduler.from_config(sched),
                     scheduler_config=sched, source="(random SD1.5 architecture)", name="sd15-random")


def tiny_base_model(device: str, dtype):
    from trainer.models.loading import BaseModel
    from tests.fixtures.tiny_models import build_tiny_pipeline
    import torch
    p = build_tiny_pipeline("sd1")
    for m in (p.unet, p.text_encoder, p.vae):
        m.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:
            m.to(dtype)
    return BaseModel(family="sd1", prediction_type="epsilon", unet=p.unet, vae=p.vae, text_encoders=[p.text_encoder],
                     tokenizers=[p.tokenizer], noise_scheduler=p.scheduler, scheduler_config=dict(p.scheduler.config),
                     source="(tiny)", name="tiny-sd1")


def write_random_loras(base, folder: Path, n: int, rank: int) -> list[Path]:
    """n kohya-format LoRA files for this model (our injector + writer), then the model is left as it was."""
    import torch
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    from trainer.config import LoraConfig
    from trainer.lora.inject import inject_lora
    from trainer.lora.io import save_lora

    cfg = LoraConfig(rank=rank, alpha=rank / 2, unet_targets="kohya", text_encoder_targets="attention_mlp")
    handles = inject_lora(base.unet, base.text_encoders, cfg, train_text_encoder=True)
    paths = []
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for i in range(n):
            for _, _, layer in handles.modules:
                for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    w.copy_(torch.randn(w.shape, generator=g).to(w) * 0.02)
            p = folder / f"bench_lora_{i}.safetensors"
            save_lora(p, base.unet, base.text_encoders, family=base.family, metadata={"ss_output_name": p.stem},
                      save_precision="fp16")
            paths.append(p)
    for m in [base.unet, *base.text_encoders]:
        recurse_remove_peft_layers(m)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in m.__dict__:
                delattr(m, attr)
        m.requires_grad_(False)
    return paths


def timed(fn, device: str) -> float:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="image side in px")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved base / fused / unfused rounds")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    add_threads_option(ap)
    ap.add_argument("--tiny", action="store_true", help="use the tiny test model (smoke run)")
    args = ap.parse_args(argv)

    import torch

    from trainer.generate.engine import Generator, LoraSpec

    use_threads(args.threads)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    base = tiny_base_model(args.device, dtype) if args.tiny else sd15_base_model(args.device, dtype)
    n_unet = sum(p.numel() for p in base.unet.parameters()) / 1e6
    print(f"model: {base.name}, UNet {n_unet:.0f} M params, {args.device} {str(dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads, built in {time.perf_counter() - t0:.1f} s")
    gen_kw = dict(seed=1, steps=args.steps, guidance_scale=7.0, width=args.size, height=args.size)
    prompt = "a castle on a hill, oil painting"

    with tempfile.TemporaryDirectory() as tmp:
        files = write_random_loras(base, Path(tmp), 3, args.rank)
        size_mb = sum(f.stat().st_size for f in files) / len(files) / 2**20
        g = Generator(base)

        # load: read the file (fp16 -> fp32 internal form) and match it to the model's layers
        load_times = [timed(lambda f=f: g.load_lora(f), "cpu") for f in files]
        cached = timed(lambda: g.load_lora(files[0]), "cpu")
        n_mod = len(g.load_lora(files[0]).targets)
        print(f"LoRA files: {len(files)} x {size_mb:.1f} MiB, {n_mod} modules each, rank {args.rank}")

        specs = [LoraSpec(f, w) for f, w in zip(files, (0.8, 0.6, 0.4))]
        reweighted = [LoraSpec(f, w) for f, w in zip(files, (0.5, 0.7, 0.3))]
        g.generate(prompt, **gen_kw)  # warm-up (allocator, lazy imports, pipeline)
        first_fuse = timed(lambda: g.set_loras(specs), args.device)
        g.generate(prompt, **gen_kw)
        refuse = [timed(lambda s=s: g.set_loras(s), args.device) for s in (reweighted, specs, reweighted, specs)]
        first_unfused = timed(lambda: g.set_loras(specs, mode="unfused"), args.device)
        g.generate(prompt, **gen_kw)
        rescale = [timed(lambda s=s: g.set_loras(s, mode="unfused"), args.device)
                   for s in (reweighted, specs, reweighted, specs)]
        g.clear_loras()

        times: dict[str, list[float]] = {"base": [], "fused": [], "unfused": []}
        cpu: dict[str, list[float]] = {"base": [], "fused": [], "unfused": []}
        for r in range(args.rounds):  # the order alternates so drift in machine load cancels out
            for mode in ("base", "fused", "unfused")[::1 if r % 2 == 0 else -1]:
                if mode == "base":
                    g.clear_loras()
                else:
                    g.set_loras(specs, mode=mode)
                c0 = time.process_time()
                times[mode].append(timed(lambda: g.generate(prompt, **gen_kw), args.device))
                cpu[mode].append(time.process_time() - c0)
        g.clear_loras()

    def fmt(xs):
        return f"min {min(xs):.3f} s, median {statistics.median(xs):.3f} s"

    def report(title: str, t: dict[str, list[float]]) -> None:
        print(title)
        for mode in ("base", "fused", "unfused"):
            print(f"  {mode:<8} {fmt(t[mode])}")
        for mode in ("fused", "unfused"):
            r_min = min(t[mode]) / min(t["base"])
            r_med = statistics.median(t[mode]) / statistics.median(t["base"])
            paired = statistics.median(m / b for m, b in zip(t[mode], t["base"]))
            goal = "  (goal <= 1.03)" if mode == "fused" else ""
            print(f"  {mode}/base with 3 LoRAs: {r_min:.3f} min/min, {r_med:.3f} median/median, "
                  f"{paired:.3f} median of per-round ratios{goal}")

    print(f"\nimage {args.size}x{args.size}, {args.steps} steps, CFG (batch 2 UNet calls), {args.rounds} rounds")
    report("wall-clock time:", times)
    if not args.device.startswith("cuda"):
        # on a shared CPU the wall clock also measures other processes; this process's CPU seconds do not
        report("CPU time of this process (robust to other load on the machine):", cpu)
    print("\nswitching (3 LoRAs loaded, files not read again):")
    print(f"  first fuse (back up touched layers + merge): {first_fuse:.3f} s")
    print(f"  change weights, fused (restore + re-merge):  {fmt(refuse)}")
    print(f"  first unfused set (build peft adapters):     {first_unfused:.3f} s")
    print(f"  change weights, unfused (set scales):        {fmt(rescale)}")
    print(f"  load a LoRA file (read + match), per file:   {fmt(load_times)}; from the RAM cache: {cached * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
