"""`lorastudio train` and `lorastudio presets`: the headless trainer and preset management from a shell."""

from __future__ import annotations

import sys


def register(sub) -> None:
    from trainer.__main__ import add_train_args
    p = sub.add_parser("train", help="train a LoRA (same as python -m trainer)",
                       description="Train a LoRA from a preset/config with --set overrides. Ctrl-C saves a "
                                   "checkpoint; --resume continues. `python -m trainer --help` lists every key.")
    add_train_args(p)
    p.set_defaults(func=_train)

    pp = sub.add_parser("presets", help="list, show, validate, export or import presets")
    psub = pp.add_subparsers(dest="action", metavar="ACTION")
    psub.add_parser("list", help="shipped and user presets").set_defaults(func=_list)
    s = psub.add_parser("show", help="print a preset")
    s.add_argument("name")
    s.set_defaults(func=_show)
    v = psub.add_parser("validate", help="check preset files")
    v.add_argument("files", nargs="*", help="preset files (default: every shipped and user preset)")
    v.set_defaults(func=_validate)
    i = psub.add_parser("import", help="validate a preset file and save it as a user preset")
    i.add_argument("file")
    i.add_argument("--name", help="preset name (default: the file's stem)")
    i.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="a folder the preset's paths may point into, besides the current folder and your home "
                        "(repeat for several)")
    i.set_defaults(func=_import)
    f = psub.add_parser("from-lora", help="rebuild the preset that made a LoRA Studio LoRA")
    f.add_argument("lora")
    f.add_argument("--out", help="write to this file instead of stdout")
    f.set_defaults(func=_from_lora)
    k = psub.add_parser("keys", help="every config key with type, default, range and help")
    k.add_argument("--markdown", action="store_true")
    k.set_defaults(func=_keys)
    pp.set_defaults(func=lambda a: (pp.print_help(), 2)[1])


def _train(args) -> int:
    from trainer.__main__ import run_training
    return run_training(args, ["lorastudio", *sys.argv[1:]])


def _list(args) -> int:
    from trainer.config.presets import list_presets
    for p in list_presets():
        print(f"{p.name:<20} {p.source:<8} {p.summary}")
    return 0


def _show(args) -> int:
    from trainer.config.presets import resolve_preset
    print(resolve_preset(args.name).read_text(encoding="utf-8"), end="")
    return 0


def _validate(args) -> int:
    from pathlib import Path

    from trainer.config.presets import list_presets, read_preset_file, validate_preset_text
    files = [Path(f) for f in args.files] or [p.path for p in list_presets()]
    for f in files:
        validate_preset_text(read_preset_file(f), str(f))
        print(f"ok  {f}")
    return 0


def _import(args) -> int:
    from pathlib import Path

    from trainer.config.presets import import_preset
    roots = [Path.cwd(), Path.home(), *map(Path, args.allow_root)]
    name, path = import_preset(args.file, args.name or "", allowed_roots=roots)
    print(f"saved '{name}' -> {path}")
    return 0


def _from_lora(args) -> int:
    from trainer.config.presets import preset_from_lora
    text = preset_from_lora(args.lora)
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def _keys(args) -> int:
    from trainer.config import help_table
    print(help_table(markdown=args.markdown))
    return 0
