"""The `lorastudio` command: one sub-command per job; bad input is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from trainer.errors import UserError

# Each module registers its sub-commands with register(subparsers); set_defaults(func=...) runs them.
_COMMAND_MODULES = ["app.cli.train", "app.cli.dataset", "app.cli.generate", "app.cli.ui", "app.cli.lora",
                    "app.cli.masks"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorastudio", description="LoRA Studio: caption, bucket, train and mix "
                                     "Stable Diffusion LoRAs (SD1.5, SD2.x, SDXL).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that front-end is not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    try:
        # Inside the try: flags made from settings (app.cli.flags) check their values while parsing and
        # raise a one-line UserError naming the flag.
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


