"""Command-line flags made from a setting's FieldInfo, so a flag's type, default, range and choices are the
setting's own and the shell refuses exactly what the GUI refuses.

The value is parsed and range-checked (``parse_value`` + ``check_value``) while the command line is read; a
bad value is a one-line ``UserError`` that names the flag (``--batch: 17 is above the maximum 16``), raised
out of ``parse_args`` and printed by ``app.cli.main`` like any other. No front-end writes a limit by hand.
"""

from __future__ import annotations

import argparse

from trainer.config.schema import FieldInfo, check_value, parse_value
from trainer.errors import UserError

_UNSET = object()


def flag_name(fi: FieldInfo) -> str:
    """The flag a field gets unless told otherwise: ``clip_skip`` -> ``--clip-skip``."""
    return "--" + fi.name.replace("_", "-")


def _num(v) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def range_text(fi: FieldInfo) -> str:
    """'1..16', '8..4096, a multiple of 8', 'one of a, b' or '' : the limits as the docs and help show them."""
    if fi.choices:
        return "one of " + ", ".join(map(str, fi.choices))
    parts = []
    if fi.min is not None or fi.max is not None:
        parts.append(f"{_num(fi.min)}..{_num(fi.max)}")
    if fi.multiple_of:
        parts.append(f"a multiple of {fi.multiple_of}")
    return ", ".join(parts)


def _retarget(message: str, key: str, flag: str) -> str:
    # check_value/parse_value messages start with the field's key; on the command line the flag is the name.
    return flag + message[len(key):] if message.startswith(key) else f"{flag}: {message}"


def field_type(fi: FieldInfo, flag: str, allowed: tuple = ()):
    """An argparse ``type=``: text -> the field's type, checked against its range; ``allowed`` values (such as a
    -1 'random' sentinel) pass unchecked."""
    def convert(text: str):
        try:
            value = parse_value(fi, text)
            if value in allowed and not isinstance(value, bool):
                return value
            return check_value(fi, value)
        except UserError as e:
            raise UserError(_retarget(str(e), fi.key, flag), field=fi.key) from None
    convert.__name__ = fi.type_name  # argparse names the type in its own messages
    return convert


def add_field_flag(parser, fi: FieldInfo, flag: str | None = None, *, default=_UNSET, allowed: tuple = (),
                   note: str = "", dest: str | None = None, metavar: str | None = None) -> argparse.Action:
    """Add the flag of one setting: type, default, choices and a help text with its range, all from ``fi``.

    ``default`` overrides the field's default only where the command means something else by "not given"
    (``--seed`` -1 = random); ``note`` is appended to the help. A bool field whose default is False becomes
    an on-switch (``store_true``); one whose default is True gets ``--flag/--no-flag``.
    """
    flag = flag or flag_name(fi)
    value = fi.default if default is _UNSET else default
    kw: dict = {"default": value}
    if dest:
        kw["dest"] = dest
    help_text = fi.help.rstrip()
    if note:
        help_text += f" ({note})"
    if fi.type is bool:
        kw["action"] = "store_true" if not value else argparse.BooleanOptionalAction
        return parser.add_argument(flag, help=help_text.replace("%", "%%"), **kw)
    rng = range_text(fi)
    if rng and not fi.choices:  # argparse prints choices itself
        help_text += f" [{rng}]"
    if value not in ("", None):
        help_text += f" (default: {value})"
    kw["type"] = field_type(fi, flag, allowed)
    if fi.choices:
        kw["choices"] = fi.choices
    if not fi.choices:  # the flag's own name, not the setting's ('--cfg CFG', not GUIDANCE_SCALE)
        kw["metavar"] = metavar or flag.lstrip("-").replace("-", "_").upper()
    return parser.add_argument(flag, help=help_text.replace("%", "%%"), **kw)
