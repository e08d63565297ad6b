"""The headless trainer: python -m trainer --config outputs/<run>/config.toml [--set k=v] [--resume]."""

from __future__ import annotations

import argparse
import os
import signal
import sys


def build_parser() -> argparse.ArgumentParser:
    from trainer.config import help_table
    p = argparse.ArgumentParser(
        prog="python -m trainer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LoRA without a browser (the GUI runs exactly this).",
        epilog="config keys (use with --set section.key=value):\n" + help_table())
    add_train_args(p)
    return p


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="a preset or config TOML (e.g. presets/sd15-style.toml)")
    p.add_argument("--preset", help="name of a shipped or user preset (see `lorastudio presets list`)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.max_steps=500 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that has checkpoints")


def run_training(args, argv_for_log: list[str]) -> int:
    """Shared by `python -m trainer` and `lorastudio train`: SIGINT/SIGTERM save a checkpoint and exit 0."""
    from trainer.config import load_config
    from trainer.errors import UserError
    from trainer.train.events import ProgressBar
    from trainer.config.presets import resolve_preset

    stop = {"flag": False}

    def on_signal(signum, frame):
        if stop["flag"]:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        stop["flag"] = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step ...", file=sys.stderr)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        base = None
        if args.preset:
            base = load_config(resolve_preset(args.preset))
        cfg = load_config(args.config, args.set, base=base)
        from trainer.train.recipe import train as _train
        res = _train(cfg, on_event=ProgressBar(disable=True if not is_main else None), should_stop=lambda: stop["flag"],
                     resume=args.resume, overwrite=args.overwrite, command=" ".join(argv_for_log))
    except UserError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if res.status == "stopped" and is_main:
        from trainer.train.checkpoint import latest_checkpoint
        if latest_checkpoint(res.run_dir) is None:
            print("stopped before the first step; nothing to resume (start the run again)", file=sys.stderr)
        else:
            print(f"stopped at step {res.step}; resume with: python -m trainer --config "
                  f"{res.run_dir / 'config.toml'} --resume", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_training(args, ["python", "-m", "trainer", *argv])


if __name__ == "__main__":
    sys.exit(main())
