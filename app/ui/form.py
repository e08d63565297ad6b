"""Schema to form: gradio controls built from ``FieldInfo`` (the training config's and the generation settings').

One description of every setting (``trainer.config.FIELDS``, ``trainer.generate.settings.GENERATE_FIELDS`` /
``GRID_FIELDS``) gives the control: choices make a Dropdown, min/max the Number's limits, ``multiple_of`` its
step, ``label`` the words users know with the key beside it ("Network dim (rank) · lora.rank"; the key is what
``--set`` takes). Values typed into the form are parsed and checked with the schema's own ``check_value``, so a
limit is the same in the shell and the browser. Also here: the one-line error convention of every handler.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from trainer import config as C
from trainer.errors import UserError, first_line

log = logging.getLogger("lorastudio.ui")

#: Every config field, basic ones first: the Train form, in this order, is generated from the schema.
BASIC_FIELDS = [fi for fi in C.FIELDS.values() if fi.basic]
ADVANCED_FIELDS = [fi for fi in C.FIELDS.values() if not fi.basic]
FORM_FIELDS = BASIC_FIELDS + ADVANCED_FIELDS
#: Keys that keep the user's value when a preset that does not set them is loaded (where things are, not how).
KEEP_ON_PRESET = {fi.key for fi in C.FIELDS.values() if fi.path} | {"output.name", "data.default_caption",
                                                                    "output.trigger_phrase"}


# ------------------------------------------------------------------------------------------------ errors


def error_md(message: str) -> str:
    return f"⚠️ {message}"


def guarded(n_outputs: int, status_at: int = 0):
    """A handler whose UserError becomes one line in its status output (other outputs unchanged).

    Anything else is a bug: it is logged with its traceback on the server and shown as one line too, so the page
    never freezes on a half-finished event.
    """
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure must reach the page as one line
                if isinstance(e, UserError):
                    msg = error_md(first_line(e))
                else:
                    log.exception("handler %s failed", fn.__name__)
                    msg = error_md(f"unexpected error ({type(e).__name__}: {first_line(e)}); details are in the "
                                   "server log")
                out = [gr.skip()] * n_outputs
                out[status_at] = gr.update(value=msg, visible=True)
                return out[0] if n_outputs == 1 else tuple(out)
        wrapper.__wrapped_outputs__ = n_outputs  # checked against the event's outputs by the tests
        return wrapper
    return deco


def resolve(path: str) -> Path:
    return Path(path).expanduser().resolve()


def frame(rows: list[list], headers: list[str]):
    import pandas as pd
    return pd.DataFrame(rows, columns=headers)


# ------------------------------------------------------------------------------------------------ controls


def label_for(fi: C.FieldInfo, *, with_key: bool = True) -> str:
    """ "Network dim (rank) · lora.rank": the words users know first, the key (what --set takes) beside them."""
    if not with_key:
        return fi.label or fi.name
    return f"{fi.label} · {fi.key}" if fi.label else fi.key


def elem_id_for(fi: C.FieldInfo) -> str:
    return f"f-{fi.section}-{fi.name}"


def _range_note(fi: C.FieldInfo) -> str:
    if fi.min is None or fi.max is None or fi.choices is not None:
        return ""
    note = f" [{fi.min:g} .. {fi.max:g}]"
    return note + (f", a multiple of {fi.multiple_of}" if fi.multiple_of else "")


def config_control(fi: C.FieldInfo):
    """The Train form's control of one config field. Numbers are text boxes: a typo shows the schema's own message
    ("expected int") beside the field instead of being silently refused by the browser."""
    value = value_to_form(fi, fi.default)
    info = fi.help + _range_note(fi)
    eid = elem_id_for(fi)
    label = label_for(fi)
    if fi.type is bool:
        return gr.Checkbox(value=value, label=label, info=info, elem_id=eid)
    if fi.choices is not None:
        return gr.Dropdown(choices=list(fi.choices), value=value, label=label, info=info, elem_id=eid)
    if fi.type is list:
        return gr.Textbox(value=value, label=label, info=info + " One per line.", lines=2, elem_id=eid)
    return gr.Textbox(value=value, label=label, info=info + (" (a path)" if fi.path else ""), elem_id=eid,
                      max_lines=1)


def setting_control(fi: C.FieldInfo, elem_id: str, *, label: str | None = None, info: str | None = None, **kw):
    """A Generate-tab control of one generation setting: Number with the setting's limits and step, Dropdown of
    its choices, or a text box."""
    label = label or label_for(fi, with_key=False)
    info = fi.help if info is None else info
    if fi.choices is not None:
        return gr.Dropdown(choices=list(fi.choices), value=fi.default, label=label, info=info, elem_id=elem_id,
                           **kw)
    if fi.type in (int, float):
        step = fi.multiple_of or 1
        return gr.Number(value=fi.default, label=label, info=info, minimum=fi.min, maximum=fi.max, step=step,
                         precision=0 if fi.type is int else None, elem_id=elem_id, **kw)
    return gr.Textbox(value=str(fi.default), label=label, info=info, elem_id=elem_id, max_lines=1, **kw)


# ------------------------------------------------------------------------------------------------ values


def value_to_form(fi: C.FieldInfo, value: Any) -> Any:
    """A config value as its form control shows it."""
    if fi.type is bool or fi.choices is not None:
        return value
    if fi.type is list:
        return "\n".join(value)
    if fi.type is float:
        return repr(float(value))
    return str(value)


def value_from_form(fi: C.FieldInfo, raw: Any) -> Any:
    """A form value parsed and checked with the schema's own rules; UserError names the field."""
    if fi.type is bool:
        value = bool(raw)
    elif fi.type is list:
        value = [line.strip() for line in str(raw or "").splitlines() if line.strip()]
    elif fi.type is str:
        value = "" if raw is None else str(raw).strip()
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw) if fi.type is float else (int(raw) if float(raw).is_integer() else raw)
    else:
        value = C.parse_value(fi, "" if raw is None else str(raw))
    return C.check_value(fi, value)


def form_to_config(values) -> tuple[C.Config, dict[str, str]]:
    """The form's values (FORM_FIELDS order) as a Config, plus {key: one-line error} for fields that are wrong."""
    cfg = C.default_config()
    errors: dict[str, str] = {}
    for fi, raw in zip(FORM_FIELDS, values):
        try:
            setattr(getattr(cfg, fi.section), fi.name, value_from_form(fi, raw))
        except UserError as e:
            errors[fi.key] = first_line(e)
    return cfg, errors


def config_to_form(cfg: C.Config) -> list:
    return [value_to_form(fi, getattr(getattr(cfg, fi.section), fi.name)) for fi in FORM_FIELDS]


def error_updates(errors: dict[str, str]) -> list:
    """One update per form field's error line: shown with its message, or hidden."""
    return [gr.update(value=error_md(errors[fi.key]), visible=True) if fi.key in errors
            else gr.update(value="", visible=False) for fi in FORM_FIELDS]
