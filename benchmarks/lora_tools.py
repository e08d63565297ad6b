"""Time of `lorastudio lora resize`, `merge` and `extract` on the full-size SD1.5 architecture.

    python benchmarks/lora_tools.py [--rank 32] [--threads N] [--keep DIR] [--no-extract]

Builds the SD1.5 UNet and CLIP-L text encoder from the shipped configs with random weights (no downloads), writes
two random LoRAs of rank 32 (kohya targets: attention, proj, ff; every text-encoder projection) with the tools'
own writer, then times, in the same process:
  1. baseline: read_lora of one file (what any tool must do first);
  2. resize to rank 16; 3. merge of both at rank 32 (SVD) and 4. with --concat;
  5. extract at rank 32 (3x3 convs too) from base + LoRA A baked in, against the base (models in memory, so the
     time is the tool's, not the loader's), and as a baseline forming every layer's difference without an SVD.
Every tool streams module by module: one delta at a time, never all of them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchmarks.threads import add_threads_option, use_threads  # noqa: E402


def build_sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models.single_file import base_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(base_config("sd1", "unet"))
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in base_config("sd1", "text_encoder").items()
                                         if not k.startswith("_")}))
    return SimpleNamespace(unet=unet.eval(), text_encoders=[te.eval()], family="sd1", prediction_type="epsilon",
                           name="sd15-random")


def random_lora(model, path: Path, rank: int, seed: int) -> Path:
    from trainer.lora.io import LoraModule
    from trainer.lora.tools.extract import target_layers
    from trainer.lora.tools.write import write_lora

    g = torch.Generator().manual_seed(seed)
    roots = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
    modules = {}
    for key, component, live, _ in target_layers(model, convs=False):
        w = roots[component].get_submodule(live).weight
        down = torch.randn((rank, *w.shape[1:]), generator=g) / w[0].numel() ** 0.5
        up = torch.randn((w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])), generator=g) * 0.01
        modules[key] = LoraModule(down, up, float(rank))
    write_lora(path, modules, family="sd1", metadata={"ss_base_model_version": "sd_v1"}, overwrite=True)
    return path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bake(model, lora_path: Path):
    """A copy of the model with the LoRA's deltas added: the 'fine-tuned' model for extract."""
    import copy

    from trainer.lora.io import match_modules, read_lora

    tuned = copy.deepcopy(model)
    tuned.name = "sd15-tuned"
    lf = read_lora(lora_path)
    with torch.no_grad():
        for key, layer in match_modules(lf, tuned.unet, tuned.text_encoders, family="sd1").items():
            layer.weight += lf.modules[key].delta(shape=layer.weight.shape)
    return tuned


def differences_only(tuned, base, convs: bool) -> int:
    from trainer.lora.tools.extract import target_layers
    n = 0
    with torch.no_grad():
        for _, component, live, _ in target_layers(base, convs=convs):
            root_t = tuned.unet if component == "unet" else tuned.text_encoders[0]
            root_b = base.unet if component == "unet" else base.text_encoders[0]
            d = root_t.get_submodule(live).weight.float() - root_b.get_submodule(live).weight.float()
            n += int(d.norm() > 0)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    add_threads_option(ap)
    ap.add_argument("--keep", help="write the files here instead of a temporary folder")
    ap.add_argument("--no-extract", action="store_true", help="skip extract (it holds two SD1.5 models in RAM)")
    args = ap.parse_args(argv)
    use_threads(args.threads)

    from trainer.lora.io import read_lora
    from trainer.lora.tools.extract import extract_from_models
    from trainer.lora.tools.merge import merge_loras
    from trainer.lora.tools.resize import resize_lora

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lora_tools_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t_build, model = timed(build_sd15)
    a = random_lora(model, work / "a.safetensors", args.rank, 1)
    b = random_lora(model, work / "b.safetensors", args.rank, 2)
    n_modules = len(read_lora(a).modules)
    print(f"SD1.5 UNet + CLIP-L built in {t_build:.1f} s; two rank-{args.rank} LoRAs of {n_modules} modules, "
          f"{a.stat().st_size / 2**20:.1f} MiB each (torch threads: {torch.get_num_threads()})")

    rows = []
    t_read, _ = timed(lambda: read_lora(a))
    rows.append(("read_lora (baseline)", t_read, None))
    t, r = timed(lambda: resize_lora(a, work / "resized.safetensors", rank=args.rank // 2, overwrite=True))
    rows.append((f"resize {args.rank} -> {args.rank // 2}", t, t / t_read))
    t, r = timed(lambda: merge_loras([(a, 0.7), (b, 0.5)], work / "merged.safetensors", rank=args.rank,
                                     overwrite=True))
    rows.append((f"merge 2 x {args.rank} -> {args.rank} (SVD)", t, t / (2 * t_read)))
    t, r = timed(lambda: merge_loras([(a, 0.7), (b, 0.5)], work / "concat.safetensors", concat=True,
                                     overwrite=True))
    rows.append(("merge --concat", t, t / (2 * t_read)))
    if not args.no_extract:
        tuned = bake(model, a)
        t_diff, n = timed(lambda: differences_only(tuned, model, convs=True))
        rows.append((f"extract baseline: form every difference ({n} non-zero)", t_diff, None))
        t, r = timed(lambda: extract_from_models(tuned, model, work / "extracted.safetensors", rank=args.rank,
                                                 overwrite=True))
        rows.append((f"extract at rank {args.rank} ({len(r.modules)} modules, {len(r.left_out)} left out)", t,
                     t / t_diff))
        print(f"extract kept {r.kept:.4%} of the baked delta's Frobenius norm")

    width = max(len(x[0]) for x in rows)
    print(f"\n{'step':<{width}}  seconds  x baseline")
    for name, sec, ratio in rows:
        print(f"{name:<{width}}  {sec:7.2f}  {'' if ratio is None else f'{ratio:8.1f}'}")
    if not args.keep:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
