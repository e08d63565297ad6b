"""`lorastudio lora resize | merge | extract` (and `bake`, from app.cli.lora_bake): tools on LoRA files."""

from __future__ import annotations

import argparse
from collections import Counter

from trainer.lora.tools import DYNAMIC_MODES, EXTRACT_THRESHOLD, PRECISIONS

_DYNAMIC_HELP = (f"choose each module's rank: MODE=VALUE with MODE one of {', '.join(DYNAMIC_MODES)} "
                 "(sv_fro=0.9 keeps 90%% of the Frobenius norm, sv_cumulative=0.9 90%% of the sum of singular "
                 "values, sv_ratio=20 every singular value at least the largest / 20); --rank then caps it")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="the LoRA file to write")
    p.add_argument("--precision", default=PRECISIONS[0], choices=PRECISIONS,
                   help=f"dtype of the written factors (default: {PRECISIONS[0]}; alpha is always float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def register(sub) -> None:
    p = sub.add_parser("lora", help="tools on LoRA files: resize, merge, extract (and bake into a model)",
                       description="Tools on LoRA files. Each output is a kohya-format .safetensors that is read "
                                   "back and checked before it gets its name, with metadata saying how it was made "
                                   "(docs/lora-format.md, 'LoRA tools').")
    lora_sub = p.add_subparsers(dest="lora_command", metavar="TOOL")
    p.set_defaults(func=lambda args: _help(p))

    r = lora_sub.add_parser("resize", help="change a LoRA's rank by SVD of each module's delta",
                            description="Write FILE at a lower rank: per module, the best delta of that rank "
                                        "(SVD). A rank at or above the module's own keeps its delta exactly; "
                                        "alpha/rank of each module stays the source's.")
    r.add_argument("file", help="the LoRA to resize (ours, kohya, LyCORIS LoCon, diffusers/PEFT)")
    r.add_argument("--rank", type=int, help="the new rank (with --dynamic: the largest)")
    r.add_argument("--dynamic", metavar="MODE=VALUE", help=_DYNAMIC_HELP)
    _common(r)
    r.set_defaults(func=_resize)

    m = lora_sub.add_parser("merge", help="merge LoRAs into one (SVD at a rank, or --concat: exact)",
                            description="Merge LoRAs, each at its weight, into one file: per module the SVD of "
                                        "the weighted sum of the deltas cut to --rank (exact at the summed rank), "
                                        "or with --concat the ranks stacked (always exact). Modules in only some "
                                        "of the files are kept.")
    m.add_argument("sources", nargs="+", metavar="FILE[:W]", help="LoRA files with their weight (default 1)")
    m.add_argument("--concat", action="store_true", help="stack the ranks instead of an SVD (exact, rank = sum)")
    m.add_argument("--rank", type=int, help="the merged rank (with --dynamic: the largest)")
    m.add_argument("--dynamic", metavar="MODE=VALUE", help=_DYNAMIC_HELP)
    _common(m)
    m.set_defaults(func=_merge)

    e = lora_sub.add_parser("extract", help="the LoRA that best approximates TUNED - BASE",
                            description="Extract a LoRA from a fine-tuned model: per UNet and text-encoder layer "
                                        "that a LoRA can patch, the rank-R SVD of the weight difference. Layers "
                                        "that differ by less than --threshold are left out.")
    e.add_argument("--tuned", required=True, help="the fine-tuned model: single file, diffusers folder or hub id")
    e.add_argument("--base", required=True, help="the model it was tuned from (same kinds)")
    e.add_argument("--rank", type=int, required=True, help="rank of the extracted modules")
    e.add_argument("--conv-rank", type=int, help="rank of the 3x3 convs (default: --rank; 0 leaves resnet and "
                                                 "sampler layers out)")
    e.add_argument("--threshold", type=float, default=EXTRACT_THRESHOLD,
                   help="leave out layers with ||TUNED - BASE|| / ||BASE|| below this "
                        f"(default: {EXTRACT_THRESHOLD:g})")
    e.add_argument("--dynamic", metavar="MODE=VALUE", help=_DYNAMIC_HELP)
    _common(e)
    e.set_defaults(func=_extract)

    try:
        from app.cli import lora_bake
    except ModuleNotFoundError as err:
        if err.name != "app.cli.lora_bake":
            raise
    else:
        lora_bake.register(lora_sub)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _progress(name: str):
    from trainer.train.events import Phase, ProgressBar
    bar = ProgressBar()
    return lambda done, total: bar(Phase(name=name, done=done, total=total))


def summary(result, path: str | None = None) -> str:
    """The whole file's line: where it went, modules, size, how many modules have each rank, the retained
    Frobenius share (also the Tools tab's result line; ``path`` replaces the path as written)."""
    w = result.written
    ranks = Counter(m.rank_out for m in result.modules)
    rank_text = ", ".join(f"rank {r}: {n}" for r, n in sorted(ranks.items(), reverse=True))
    left = f", {len(result.left_out)} layers left out (below the threshold)" if result.left_out else ""
    if getattr(result, "converted", None):
        left += f", {len(result.converted)} LoHa/LoKr modules written as plain LoRA"
    return (f"wrote {path or w.path} ({w.num_modules} modules, {w.size_text}; {rank_text}{left}); "
            f"the whole file keeps {result.kept:.2%} of the Frobenius norm")


def _report(result) -> None:
    """Per module the rank kept and the retained Frobenius share, then the whole file's."""
    for m in result.modules:
        print(f"  {m.key}: rank {m.rank_in} -> {m.rank_out}, keeps {m.kept:.2%}")
    print(summary(result))


def _resize(args) -> int:
    from trainer.lora.tools.resize import resize_lora
    from trainer.lora.tools.svd import parse_dynamic

    result = resize_lora(args.file, args.out, rank=args.rank, dynamic=parse_dynamic(args.dynamic),
                         save_precision=args.precision, overwrite=args.overwrite, progress=_progress("resize"))
    _report(result)
    return 0


def _merge(args) -> int:
    from trainer.lora.tools.merge import merge_loras, parse_source
    from trainer.lora.tools.svd import parse_dynamic

    result = merge_loras([parse_source(s) for s in args.sources], args.out, rank=args.rank,
                         dynamic=parse_dynamic(args.dynamic), concat=args.concat, save_precision=args.precision,
                         overwrite=args.overwrite, progress=_progress("merge"))
    _report(result)
    return 0


def _extract(args) -> int:
    from trainer.lora.tools.extract import extract_lora
    from trainer.lora.tools.svd import parse_dynamic

    result = extract_lora(args.tuned, args.base, args.out, rank=args.rank, conv_rank=args.conv_rank,
                          threshold=args.threshold, dynamic=parse_dynamic(args.dynamic),
                          save_precision=args.precision, overwrite=args.overwrite, progress=_progress("extract"))
    _report(result)
    return 0
