"""`lorastudio masks`: training masks for a dataset folder, drawn by a text prompt (CLIPSeg) or taken from the
pictures' alpha channel, written where ``data.mask_dir`` reads them (DIR/masks/<stem>.png).

The numeric options come from ``datasets_tools.mask_maker.MASK_OPTIONS`` as ``FieldInfo`` (``MASK_FIELDS``), so
the flags here and the Dataset tab's sliders have the same defaults and ranges, checked by the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from app.cli.flags import add_field_flag
from datasets_tools.mask_maker import DEVICES, MASK_DIR_NAME, MASK_OPTIONS
from trainer.config.schema import FieldInfo


def _field(o) -> FieldInfo:
    return FieldInfo("masks", o.name, o.type, o.default, o.help, None, o.min, o.max, False, False, None, o.label)


#: The mask options as settings: what add_field_flag and the GUI's sliders are made from.
MASK_FIELDS: dict[str, FieldInfo] = {o.name: _field(o) for o in MASK_OPTIONS}


def options_table() -> str:
    """The options as a markdown table (docs/masks.md holds it; a test keeps the two equal)."""
    from app.cli.flags import flag_name, range_text
    rows = ["| option | flag | GUI control | default | range | what it does |", "|---|---|---|---|---|---|"]
    for fi in MASK_FIELDS.values():
        default = "off" if fi.type is bool else f"`{fi.default:g}`"
        rows.append(f"| `{fi.name}` | `{flag_name(fi)}` | {fi.label} | {default} | {range_text(fi) or '-'} | "
                    f"{fi.help} |")
    return "\n".join(rows) + "\n"


def register(sub) -> None:
    p = sub.add_parser("masks", help="make training masks (data.mask_dir) from a text prompt (CLIPSeg) or the "
                                     "alpha channel",
                       description="Write DIR/masks/<stem>.png for every picture under DIR: white = train, black = "
                                   "ignore, at the picture's size. Existing masks are kept unless --overwrite. "
                                   "Train with data.mask_dir = DIR/masks.")
    p.add_argument("dir", help="dataset folder (searched recursively, as the trainer does)")
    src = p.add_argument_group("what to mask (one of)")
    src.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="what to train on, e.g. 'the character' (repeatable: a pixel is white if any prompt "
                          "finds it)")
    src.add_argument("--from-alpha", action="store_true",
                     help="use each picture's alpha channel (pictures without transparency are skipped)")
    p.add_argument("--model", help="CLIPSeg model: a local folder or hub id (e.g. CIDAS/clipseg-rd64-refined)")
    p.add_argument("--device", default=DEVICES[0], choices=DEVICES, help="where CLIPSeg runs")
    g = p.add_argument_group("shaping (in this order: threshold, grow, blur, invert)")
    add_field_flag(g, MASK_FIELDS["threshold"], default=None,
                   note=f"default {MASK_FIELDS['threshold'].default:g} with --prompt; with --from-alpha the "
                        "alpha's grey values are kept unless this is given")
    for name in ("grow", "blur", "invert"):
        add_field_flag(g, MASK_FIELDS[name])
    add_field_flag(p, MASK_FIELDS["batch_size"], "--batch-size")
    p.add_argument("--out", metavar="DIR", help=f"mask folder (default: DIR/{MASK_DIR_NAME})")
    p.add_argument("--overwrite", action="store_true", help="replace existing masks")
    p.add_argument("--preview", metavar="PNG", help="also draw a contact sheet of the pictures with their masks "
                   "over them here (what a mask leaves out tinted blue, the trainer's crop box in yellow)")
    p.set_defaults(func=_masks)


def _masks(args) -> int:
    from datasets_tools.mask_maker import ClipSegMasker, make_masks, mask_contact_sheet, mask_plan
    from datasets_tools.folder import check_folder

    root = check_folder(args.dir).resolve()
    out = Path(args.out).expanduser() if args.out else root / MASK_DIR_NAME
    masker = None
    if not args.from_alpha and [p for p in args.prompt if p.strip()]:
        todo, _ = mask_plan(root, out, overwrite=args.overwrite)
        if todo:  # load the model only when there is something to do (and say which)
            masker = ClipSegMasker(args.model, device=args.device)
            print(f"making {len(todo)} mask(s) with {masker.describe()}", file=sys.stderr)
    run = make_masks(root, prompts=args.prompt, model=args.model, from_alpha=args.from_alpha, mask_dir=out,
                     threshold=args.threshold, grow=args.grow, blur=args.blur, invert=args.invert,
                     overwrite=args.overwrite, batch_size=args.batch_size, device=args.device, masker=masker)
    for problem in run.skipped:
        print(f"skipped: {problem.message}", file=sys.stderr)
    print(run.summary() + (" (use --overwrite to replace them)" if run.kept and not run.written else ""))
    if args.preview:
        print(f"preview: {mask_contact_sheet(root, Path(args.preview).expanduser(), mask_dir=out)}")
    print(f"train with: --set data.mask_dir={out}")
    return 0
