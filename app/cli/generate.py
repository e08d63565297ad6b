"""`lorastudio generate`, `grid` and `inspect`: images with several LoRAs, comparison grids, and what a LoRA file is."""

from __future__ import annotations

import json
import random
import sys

from app.cli.flags import add_field_flag, range_text
from trainer.generate.settings import DTYPE_CHOICES, FAMILY_CHOICES, GENERATE_FIELDS, GRID_FIELDS
from trainer.generate.prompt_syntax import BREAK, ROUND_FACTOR

#: The flag of every generation setting (the settings' own names, except where the CLI has always said otherwise).
GENERATE_FLAGS = {name: "--" + name.replace("_", "-") for name in GENERATE_FIELDS} | {"guidance_scale": "--cfg"}
GRID_FLAGS = {name: "--" + name.replace("_", "-") for name in GRID_FIELDS}
#: Settings each command takes (grid makes one picture per cell: no --batch, its rows are --seeds).
_IMAGE_SETTINGS = ("negative", "steps", "guidance_scale", "width", "height", "sampler")


def _setting(p, name: str, **kw) -> None:
    fields, flags = (GENERATE_FIELDS, GENERATE_FLAGS) if name in GENERATE_FIELDS else (GRID_FIELDS, GRID_FLAGS)
    add_field_flag(p, fields[name], flags[name], dest=name, **kw)


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate images with a base model and any number of LoRAs",
                       description="Generate images with several LoRAs mixed by weight. LoRAs come from --lora "
                                   "FILE:WEIGHT (also FILE:TE:UNET) and from A1111 tags in the prompt "
                                   "(<lora:name:0.8>, names looked up in --lora-dir). Fused by default. Every "
                                   "setting and its range: docs/generate.md.")
    _model_args(g)
    _lora_args(g)
    _image_args(g)
    g.add_argument("--prompt", required=True, help="prompt; may contain <lora:name:weight> tags")
    _setting(g, "seed", default=-1, allowed=(-1,), note="-1 = random")
    _setting(g, "batch")
    g.add_argument("--out", default="output.png", help="PNG to write; with --batch N, <stem>-<seed>.png each")
    g.set_defaults(func=_generate)

    r = sub.add_parser("grid", help="a labelled comparison grid (LoRA weight x seed, checkpoint x weight, "
                                    "prompt x LoRA)",
                       description="One PNG with labelled rows and columns. Default: the first --lora at each of "
                                   "--weights (columns) for each of --seeds (rows). --checkpoints RUN_DIR: the "
                                   "run's saved LoRAs (rows) x --weights. --prompts: prompts (rows) x each --lora "
                                   "(columns, after a no-LoRA column). Other --lora values stay applied.")
    _model_args(r)
    _lora_args(r)
    _image_args(r)
    r.add_argument("--prompt", default="", help="prompt (weight x seed and checkpoint grids)")
    r.add_argument("--prompts", nargs="+", help="prompts for a prompt x LoRA grid")
    _setting(r, "weights", note="columns")
    _setting(r, "seeds", note="rows of a weight x seed grid; other grids use the first")
    _setting(r, "max_cells")
    r.add_argument("--checkpoints", metavar="RUN_DIR", help="a training run folder: compare its saved LoRAs")
    r.add_argument("--out", default="grid.png", help="PNG to write")
    r.set_defaults(func=_grid)

    i = sub.add_parser("inspect", help="what a LoRA file is: format, base family, rank, alpha, keys, metadata, "
                                       "hash")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=_inspect)

    k = sub.add_parser("settings", help="every generation setting: flag, GUI label, type, default, range",
                       description="The settings of `generate`, `grid` and the Generate tab, from the one "
                                   "description both front-ends use (docs/generate.md is this with --markdown).")
    k.add_argument("--markdown", action="store_true")
    k.set_defaults(func=_settings)


def _model_args(p) -> None:
    p.add_argument("--model", required=True, help="base model: diffusers folder, hub id or single-file checkpoint")
    p.add_argument("--family", default=FAMILY_CHOICES[0], choices=FAMILY_CHOICES, help="model family")
    p.add_argument("--vae", default="", help="optional VAE replacing the model's own")
    _setting(p, "clip_skip")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default=DTYPE_CHOICES[0], choices=DTYPE_CHOICES,
                   help="model dtype (auto: fp16 on GPU, fp32 on CPU)")


def _lora_args(p) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W]",
                   help="a LoRA file (or a name in --lora-dir) with its weight: FILE:0.8, FILE:TE:UNET, "
                        "FILE:te=0.5:unet=1; repeat for several")
    p.add_argument("--lora-dir", default="", help="folder where <lora:name> tags and bare --lora names are "
                                                  "looked up (by file name or ss_output_name)")
    p.add_argument("--no-fuse", action="store_true", help="keep LoRAs as separate peft adapters instead of "
                                                          "merging them into the weights")
    p.add_argument("--allow-partial", action="store_true", help="load LoRAs with keys that match no layer "
                                                                "(they are reported and skipped)")


def _image_args(p) -> None:
    for name in _IMAGE_SETTINGS:
        _setting(p, name)


def settings_table(markdown: bool = False) -> str:
    """Every generation setting with its flag, GUI label, type, default and range: ``lorastudio settings`` and
    docs/generate.md (a test keeps the file equal to this)."""
    rows = []
    for fields, flags, where in ((GENERATE_FIELDS, GENERATE_FLAGS, "generate"), (GRID_FIELDS, GRID_FLAGS, "grid")):
        for name, fi in fields.items():
            cmds = ("generate" if name in ("seed", "batch") else "generate, grid") if where == "generate" else "grid"
            default = f'"{fi.default}"' if fi.type is str else f"{fi.default:g}" if fi.type is float else fi.default
            rows.append((name, flags[name], fi.label, cmds, fi.type_name, default, range_text(fi), fi.help))
    if markdown:
        out = ["| setting | flag | GUI label | commands | type | default | range / choices | help |",
               "|---|---|---|---|---|---|---|---|"]
        out += [f"| `{n}` | `{f}` | {lab} | {c} | {t} | `{d}` | {r} | {h} |" for n, f, lab, c, t, d, r, h in rows]
        return "\n".join(out)
    return "\n".join(f"  {f:<14} {lab:<16} {t:<5} default {d:<10} {('[' + r + ']') if r else ''}\n      {h}"
                     for n, f, lab, c, t, d, r, h in rows)


# ---------------------------------------------------------------------------------------------- commands


def _check_out(path: str):
    from pathlib import Path

    from trainer.errors import UserError
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise UserError(f"--out {path}: the output must be a .png file", path=path)
    if p.is_dir():
        raise UserError(f"--out {path} is a folder; give a .png file name", path=path)
    return p


def _prepare(args, prompts: list[str]):
    """Everything that can be checked without the model first (weights, files, tags), then the model."""
    from trainer.errors import UserError
    from trainer.generate.engine import LoraSpec
    from trainer.generate.library import resolve_lora
    from trainer.lora.io import read_lora
    from trainer.generate.prompt_syntax import parse_prompt

    from pathlib import Path
    specs = [LoraSpec.parse(v) for v in args.lora]  # a weight that is not a number fails here
    lora_dir = Path(args.lora_dir) if args.lora_dir else None
    if lora_dir is not None and not lora_dir.is_dir():
        raise UserError(f"--lora-dir {lora_dir} is not a folder", path=str(lora_dir))
    for s in specs:  # missing or corrupt files fail before the (slow) model load; each file is read once
        p = resolve_lora(str(s.source), lora_dir)
        s.name = s.name or p.stem
        s.source = read_lora(p, allow_partial=args.allow_partial)
    for prompt in prompts:
        for tag in parse_prompt(prompt)[1]:
            try:
                resolve_lora(tag.name, lora_dir)
            except UserError as e:
                hint = "" if lora_dir is not None else " (give --lora-dir to look names up in a folder)"
                raise UserError(f"prompt tag {tag.text}: {e}{hint}") from None
    return specs, lora_dir


def _load_generator(args, lora_dir):
    import torch

    from trainer.config import ModelConfig
    from trainer.generate.engine import Generator
    from trainer.models.loading import load_base_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    cfg = ModelConfig(base=args.model, family=args.family, vae=args.vae, clip_skip=args.clip_skip)
    _quiet_loading()
    base = load_base_model(cfg, dtype=dtype, device=device)
    return Generator(base, lora_dir=lora_dir, allow_partial=args.allow_partial)


def _quiet_loading() -> None:
    """No per-shard 'Loading weights' bars: the command's output is its result lines (or one error line)."""
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl
        tl.disable_progress_bar()
        dl.disable_progress_bar()
    except Exception:  # only cosmetics
        pass


def _image_kwargs(args) -> dict:
    return dict(steps=args.steps, guidance_scale=args.guidance_scale, width=args.width, height=args.height,
                sampler=args.sampler, clip_skip=args.clip_skip)


def _generate(args) -> int:
    from trainer.generate.engine import save_image

    out = _check_out(args.out)  # the settings were checked while the flags were read (app.cli.flags)
    specs, lora_dir = _prepare(args, [args.prompt])
    seed = random.randrange(2**31) if args.seed == -1 else args.seed
    gen = _load_generator(args, lora_dir)
    gen.set_loras(specs, mode="unfused" if args.no_fuse else "fused")
    images = gen.generate(args.prompt, args.negative, seed=seed, batch_size=args.batch, **_image_kwargs(args))
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{seed + i}{out.suffix}")
                                           for i in range(len(images))]
    for img, p in zip(images, paths):
        save_image(img, p)
        print(f"wrote {p}")
    return 0


def _grid(args) -> int:
    from trainer.errors import UserError
    from trainer.generate.engine import save_image
    from trainer.generate.library import list_lora_saves
    from trainer.generate.settings import check, check_grid_size, parse_numbers

    out = _check_out(args.out)
    weights = parse_numbers(args.weights, "--weights")
    seeds = [check("seed", s, "--seeds") for s in parse_numbers(args.seeds, "--seeds", int)]
    prompts = args.prompts or []
    if args.checkpoints and prompts:
        raise UserError("grid: use either --checkpoints or --prompts, not both")
    if not prompts and not args.prompt:
        raise UserError("grid: give --prompt (or --prompts for a prompt x LoRA grid)")
    files = list_lora_saves(args.checkpoints) if args.checkpoints else []
    specs, lora_dir = _prepare(args, prompts or [args.prompt])
    if not args.checkpoints and not prompts and not specs:
        raise UserError("grid: give --lora NAME for a weight x seed grid (or --checkpoints / --prompts)")
    if prompts and not specs:
        raise UserError("grid: a prompt x LoRA grid needs at least one --lora")
    cells = (len(files) or len(prompts) or len(seeds)) * (len(weights) if not prompts else len(specs) + 1)
    check_grid_size(cells, args.max_cells)
    gen = _load_generator(args, lora_dir)
    mode = "unfused" if args.no_fuse else "fused"
    kw = _image_kwargs(args)
    if args.checkpoints:
        gen.set_loras(specs, mode=mode)
        result = gen.grid_checkpoint_weight(files, weights, args.prompt, args.negative, seed=seeds[0], **kw)
    elif prompts:
        gen.set_loras([], mode=mode)
        result = gen.grid_prompt_lora(prompts, specs, args.negative, seed=seeds[0], **kw)
    else:
        gen.set_loras(specs[1:], mode=mode)
        result = gen.grid_weight_seed(specs[0], weights, seeds, args.prompt, args.negative, **kw)
    save_image(result.image, out)
    print(f"wrote {out} ({len(result.row_labels)} rows x {len(result.col_labels)} columns)")
    return 0


def settings_doc() -> str:
    """docs/generate.md, whole: an introduction and the settings table (``lorastudio settings --markdown``)."""
    return "\n".join([
        "# Generation settings",
        "",
        "Every setting of `lorastudio generate`, `lorastudio grid` and the web app's Generate tab, with its "
        "command-line flag, the label the GUI shows and its range. Both front-ends build their flags and "
        "controls from one description (`trainer/generate/settings.py`, limits in `trainer/generate/limits.py`), "
        "so a value the shell refuses the browser refuses too.",
        "",
        "Generated by `lorastudio settings --markdown`; a test (`tests/app/cli/test_docs.py`) fails when this "
        "file falls behind.",
        "",
        settings_table(markdown=True),
        "",
        f"On the command line `--seed` defaults to -1, a random seed. `--family` is one of "
        f"{', '.join(FAMILY_CHOICES)}; `--dtype` one of {', '.join(DTYPE_CHOICES)}. The model and LoRA flags "
        "(`--model`, `--vae`, `--device`, `--lora`, `--lora-dir`, `--no-fuse`, `--allow-partial`) are described "
        "by `lorastudio generate --help`.",
        "",
        "Prompts use A1111's syntax: `<lora:name:weight>` tags (applied on top of `--lora`; ignored in a negative "
        "prompt), "
        f"attention weights `(word)` x{ROUND_FACTOR:g}, `[word]` /{ROUND_FACTOR:g}, `(word:1.3)` (nesting "
        f"multiplies; `\\(` is a literal bracket) and `{BREAK}`, which starts a new 75-token window. A prompt "
        "longer than 75 tokens is encoded in as many windows as it needs, as A1111 does (README, 'Long captions "
        "and prompts').",
        "",
    ])


def _settings(args) -> int:
    print(settings_doc() if args.markdown else settings_table(), end="\n" if not args.markdown else "")
    return 0


def _inspect(args) -> int:
    from trainer.generate.inspection import format_inspection, inspect_lora
    info = inspect_lora(args.file)
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        print()
    else:
        print(format_inspection(info))
    return 0
