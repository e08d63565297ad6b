"""`lorastudio lora bake`: LoRAs fused into a base model, written as one checkpoint file or a diffusers folder."""

from __future__ import annotations

import os
import sys

from trainer.generate.settings import DTYPE_CHOICES, FAMILY_CHOICES

#: the output dtypes: the generation dtypes without 'auto' (a file has one dtype)
BAKE_DTYPES = tuple(d for d in DTYPE_CHOICES if d != "auto")


def register(lora_sub) -> None:
    """Add ``bake`` to the sub-commands of ``lorastudio lora``."""
    b = lora_sub.add_parser(
        "bake", help="fuse LoRAs into a base model and write a checkpoint (A1111/ComfyUI layout) or diffusers folder",
        description="Fuse one or more LoRAs, each at its weight, into the base model's weights and write the result "
                    "as a single .safetensors checkpoint with the original (LDM/SGM) key names that A1111, ComfyUI "
                    "and LoRA Studio read, or with --diffusers as a diffusers folder. The file's metadata (or "
                    "lorastudio_bake.json in the folder) names the base and each LoRA with its hash and weights. "
                    "SD1.x, SD2.x and SDXL.")
    b.add_argument("--model", required=True, help="base model: diffusers folder, hub id or single-file checkpoint")
    b.add_argument("--family", default=FAMILY_CHOICES[0], choices=FAMILY_CHOICES,
                   help="model family (auto: detected from the files)")
    b.add_argument("--lora", action="append", default=[], required=True, metavar="FILE[:W]",
                   help="a LoRA file with its weight: FILE:0.8, FILE:TE:UNET, FILE:te=0.5:unet=1; repeat for several")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="FILE.safetensors", help="the single-file checkpoint to write")
    where.add_argument("--diffusers", metavar="DIR", help="write a diffusers folder instead of one file")
    b.add_argument("--dtype", default="fp16", choices=BAKE_DTYPES, help="dtype of the written weights "
                   "(default: fp16); the LoRA deltas are added in fp32 either way")
    b.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    b.add_argument("--allow-partial", action="store_true", help="bake LoRAs with keys that match no layer "
                                                               "(they are reported and skipped)")
    b.set_defaults(func=_bake)


def _bake(args) -> int:
    from trainer.lora.tools.bake import bake
    from trainer.train.events import Phase, ProgressBar

    # a bar only on a terminal: piped, each refresh would be a line of its own
    bar = ProgressBar(disable=os.environ.get("LORASTUDIO_NO_BAR") == "1" or not sys.stderr.isatty())
    result = bake(args.model, args.lora, args.diffusers or args.out, dtype=args.dtype,
                  diffusers=bool(args.diffusers), overwrite=args.overwrite, family=args.family,
                  allow_partial=args.allow_partial,
                  progress=lambda stage, done, total: bar(Phase(name=stage, done=done, total=total)))
    for line in summary_lines(result):
        print(line)
    return 0


def summary_lines(result, path: str | None = None) -> list[str]:
    """What was written, then one line per LoRA (also the Tools tab's result; ``path`` replaces the path)."""
    what = "diffusers folder" if result.diffusers else "checkpoint"
    lines = [f"wrote {what} {path or result.path} ({result.size_text}, {result.dtype}, {result.family}, "
             f"{result.prediction_type}) in {result.seconds:.1f} s"]
    for b in result.loras:
        weights = f"{b.unet_weight:g}" if b.te_weight == b.unet_weight else \
            f"te {b.te_weight:g} unet {b.unet_weight:g}"
        lines.append(f"  {b.path.name} at {weights}: {b.modules} modules fused (hash {b.addnet_hash[:12]})")
    return lines
