"""The settings of `lorastudio ui` that have a range (the port), described once as FieldInfo so the flag is
made by ``app.cli.flags.add_field_flag`` and checked by ``check_value`` like every other flag, not by a
comparison written into the command."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.schema import FieldInfo, fields_of, opt

MAX_PORT = 65535  # TCP


@dataclass
class ServeSettings:
    port: int = opt(7860, "Port the web app listens on.", min=1, max=MAX_PORT, label="Port")


SERVE_FIELDS: dict[str, FieldInfo] = {fi.name: fi for fi in fields_of("ui", ServeSettings)}
