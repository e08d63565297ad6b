"""Presets: shipped and user TOML overlays; list, show, validate, save, import/export, rebuild from a LoRA."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from trainer import config as C
from trainer.common.names import looks_like_hub_id
from trainer.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "presets"


def user_dir() -> Path:
    """User presets live in $LORASTUDIO_HOME/presets (default ~/.lorastudio/presets)."""
    home = Path(os.environ.get("LORASTUDIO_HOME", Path.home() / ".lorastudio"))
    return home / "presets"


@dataclass
class PresetInfo:
    name: str
    path: Path
    source: str          # shipped | user
    summary: str         # first header line


def preset_summary(text: str) -> str:
    """The first line of a preset's header comment."""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            s = s.lstrip("#").strip()
            if s:
                return s
        elif s:
            break
    return ""


def list_presets() -> list[PresetInfo]:
    out = []
    for source, d in (("shipped", SHIPPED_DIR), ("user", user_dir())):
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                try:
                    out.append(PresetInfo(p.stem, p, source, preset_summary(p.read_text(encoding="utf-8"))))
                except OSError:
                    continue
    return out


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return p
    for info in reversed(list_presets()):  # a user preset shadows a shipped one of the same name
        if info.name == name_or_path:
            return info.path
    names = [i.name for i in list_presets()]
    import difflib
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; available: {', '.join(names)}"
    raise UserError(f"preset not found: {name_or_path}{hint}")


def validate_preset_text(text: str, source: str = "preset", allowed_roots: list[Path] | None = None) -> C.Config:
    """Parse and check a preset: size, TOML, known keys, types, ranges, and (if given) where paths may point."""
    if len(text.encode("utf-8")) > C.MAX_PRESET_BYTES:
        raise UserError(f"{source} is larger than {C.MAX_PRESET_BYTES // 1024} KiB; not a LoRA Studio preset")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source} is not valid TOML: {e}") from None
    if "preset_version" not in data:
        raise UserError(f"{source} has no preset_version; not a LoRA Studio preset", field="preset_version")
    cfg = C.apply_dict(C.default_config(), data, source)
    if allowed_roots is not None:
        roots = [Path(r).resolve() for r in allowed_roots]
        for fi in C.FIELDS.values():
            if not fi.path:
                continue
            value = data.get(fi.section, {}).get(fi.name) if isinstance(data.get(fi.section), dict) else None
            if not value or (fi.key == "model.base" and looks_like_hub_id(value)):
                continue
            target = Path(value).expanduser()
            target = (target if target.is_absolute() else Path.cwd() / target).resolve()
            if not any(target == r or r in target.parents for r in roots):
                raise UserError(f"{source}: {fi.key} points outside the allowed folders ({value})", field=fi.key)
    return cfg


def read_preset_file(path: str | Path) -> str:
    """A preset file's text: at most MAX_PRESET_BYTES, strict UTF-8, or a UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"preset file not found: {p}", path=str(p))
    with open(p, "rb") as fh:
        data = fh.read(C.MAX_PRESET_BYTES + 1)
    if len(data) > C.MAX_PRESET_BYTES:
        raise UserError(f"{p.name} is larger than {C.MAX_PRESET_BYTES // 1024} KiB; not a LoRA Studio preset "
                        "(refused)", path=str(p))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p.name} is not UTF-8 text; not a LoRA Studio preset (refused)", path=str(p)) from None


def import_preset(path: str | Path, name: str = "", *, allowed_roots: list[Path]) -> tuple[str, Path]:
    """The one preset import (CLI and GUI): read strictly, check keys, types, ranges, version and that every path
    points inside ``allowed_roots``, then save it as a user preset. Returns (name, saved path)."""
    p = Path(path)
    text = read_preset_file(p)
    cfg = validate_preset_text(text, p.name, allowed_roots=allowed_roots)
    stem = re.sub(r"[^\w.-]", "-", (name or "").strip() or p.stem)[:64].strip(".-") or "imported"
    return stem, save_user_preset(stem, cfg, preset_summary(text) or f"Imported from {p.name}")


def preset_text(cfg: C.Config, header: str) -> str:
    """A partial preset: only what differs from the defaults."""
    return C.dict_to_toml(C.diff_from_defaults(cfg), header=header)


def save_user_preset(name: str, cfg: C.Config, header: str = "") -> Path:
    if not re.fullmatch(r"[\w.-]{1,64}", name) or name.startswith("."):
        raise UserError(f"preset name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    d = user_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(preset_text(cfg, header or f"User preset '{name}'."), encoding="utf-8")
    tmp.replace(path)
    return path


def preset_from_lora(path: str | Path) -> str:
    """Rebuild the preset that made a LoRA Studio LoRA from its embedded resolved config."""
    from trainer.common.safetensors_header import read_metadata
    meta = read_metadata(path)
    text = meta.get("lorastudio.config")
    if not text:
        raise UserError(f"{path} was not made by LoRA Studio (no lorastudio.config in its metadata)", path=str(path))
    cfg = validate_preset_text(text, str(path))
    return preset_text(cfg, header=f"Rebuilt from {Path(path).name} (its embedded training config).")
