"""`lorastudio ui`: serve the web app (127.0.0.1 unless --listen; optional --auth; --demo makes the first-run demo)."""

from __future__ import annotations

import sys

from app.cli.flags import add_field_flag
from app.cli.serve import SERVE_FIELDS


def register(sub) -> None:
    p = sub.add_parser("ui", help="open the web app (Dataset, Train, Generate, Presets)",
                       description="Serve the LoRA Studio web app. It binds 127.0.0.1 (this machine only) unless "
                                   "--listen is given, and serves files only from its own folders under --root.")
    p.add_argument("--listen", action="store_true",
                   help="accept connections from other machines (binds 0.0.0.0); use --auth with it")
    add_field_flag(p, SERVE_FIELDS["port"])
    p.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    p.add_argument("--demo", action="store_true",
                   help="create the first-run demo (a tiny model and drawn pictures) and load it into the forms")
    from app.demo import DEMO_STYLE_HELP, DEMO_STYLES
    p.add_argument("--demo-style", choices=DEMO_STYLES, default=None, metavar="STYLE",
                   help="the style the demo's pictures are drawn in (with --demo): "
                        + "; ".join(f"{s} ({DEMO_STYLE_HELP[s]})" for s in DEMO_STYLES)
                        + f". Default: the style made last, else {DEMO_STYLES[0]}")
    p.add_argument("--root", default=".", metavar="DIR",
                   help="working folder: runs go to DIR/outputs, the demo to DIR/demo; relative paths in the "
                        "forms are relative to it (default: the current folder)")
    p.set_defaults(func=_ui)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    from trainer.errors import UserError
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth: expected USER:PASS (both non-empty)")
    return user, password


def _ui(args) -> int:
    from trainer.errors import UserError
    auth = parse_auth(args.auth)
    if args.demo_style is not None and not args.demo:
        raise UserError("--demo-style: use it with --demo")
    if args.listen and auth is None:
        print("warning: --listen without --auth: anyone who can reach this machine can use the app",
              file=sys.stderr)
    import signal

    def on_term(signum, frame):  # `kill` closes the app like Ctrl-C: a running trainer saves a checkpoint first
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    # gradio loads its IPython notebook magics whenever IPython is installed (0.4 s of a ~5 s start on a 2-core
    # machine); a server started from a shell has no notebook, so that import is skipped here
    sys.modules.setdefault("IPython", None)  # type: ignore[arg-type]
    from app.ui.app import launch  # gradio is imported here, not when the CLI starts
    try:
        launch(args.root, listen=args.listen, port=args.port, auth=auth, demo=args.demo,
               demo_style=args.demo_style)
    except OSError as e:
        why = "it is in use" if "empty port" in str(e) else (e.strerror or str(e))
        raise UserError(f"cannot serve on port {args.port}: {why}; try --port {args.port + 1}") from None
    return 0
