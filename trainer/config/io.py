"""Config files: read TOML (size-capped, strict UTF-8), migrate old preset versions, apply --set overrides, write TOML.

Everything is checked against the schema in ``trainer.config.schema``; nothing here knows a key by name except
the cross-field checks a run needs (``validate_for_training``).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from trainer.config.schema import (FIELDS, MAX_PRESET_BYTES, PRESET_VERSION, SECTIONS, Config, _suggest,
                                   check_value, parse_value)
from trainer.errors import UserError
from trainer.lora.kinds import check_adapter_options


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}


def default_config() -> Config:
    return Config()


def _migrate(data: dict, source: str) -> dict:
    """Bring an older preset/config to the current schema, or refuse it."""
    version = data.pop("preset_version", PRESET_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"preset_version in {source} must be an integer, got {version!r}", field="preset_version")
    if version > PRESET_VERSION:
        raise UserError(f"{source} has preset_version {version}, newer than this LoRA Studio understands "
                        f"({PRESET_VERSION}); update LoRA Studio", field="preset_version")
    if version < 1:
        raise UserError(f"{source} has unknown preset_version {version}", field="preset_version")
    return data


def apply_dict(cfg: Config, data: dict, source: str = "") -> Config:
    """Overlay a nested dict (from TOML) onto cfg, validating every key and value."""
    where = f" in {source}" if source else ""
    data = _migrate(dict(data), source or "config")
    for sname, section in data.items():
        if sname not in SECTIONS:
            raise UserError(f"unknown section '{sname}'{where}{_suggest(sname, SECTIONS)}", field=sname)
        if not isinstance(section, dict):
            raise UserError(f"'{sname}'{where} must be a table of settings ([{sname}])", field=sname)
        for name, value in section.items():
            key = f"{sname}.{name}"
            fi = FIELDS.get(key)
            if fi is None:
                raise UserError(f"unknown key '{key}'{where}{_suggest(key, FIELDS)}", field=key)
            setattr(getattr(cfg, sname), name, check_value(fi, value, source))
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (the CLI's --set)."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        fi = FIELDS.get(key)
        if fi is None:
            raise UserError(f"unknown key '{key}'{_suggest(key, FIELDS)}", field=key)
        setattr(getattr(cfg, fi.section), fi.name, check_value(fi, parse_value(fi, text), "--set"))
    return cfg


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}", path=str(p))
    if p.stat().st_size > MAX_PRESET_BYTES:
        raise UserError(f"{p} is larger than {MAX_PRESET_BYTES // 1024} KiB; not a LoRA Studio preset", path=str(p))
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid TOML: {e}", path=str(p)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults, then the file (a preset or a full config), then --set overrides."""
    cfg = base or default_config()
    if path is not None:
        apply_dict(cfg, read_toml(path), str(path))
    return apply_overrides(cfg, overrides or [])


def validate_for_training(cfg: Config) -> None:
    """Cross-field checks that only matter when a run starts."""
    if not cfg.model.base:
        raise UserError("model.base is not set: give a diffusers folder, hub id or .safetensors checkpoint",
                        field="model.base")
    if not cfg.data.dir:
        raise UserError("data.dir is not set: give the folder of training images", field="data.dir")
    if cfg.data.min_bucket_px > cfg.data.max_bucket_px:
        raise UserError(f"data.min_bucket_px ({cfg.data.min_bucket_px}) is larger than data.max_bucket_px "
                        f"({cfg.data.max_bucket_px})", field="data.min_bucket_px")
    tr = cfg.train
    if tr.min_timestep >= tr.max_timestep:
        raise UserError(f"train.min_timestep ({tr.min_timestep}) must be below train.max_timestep "
                        f"({tr.max_timestep})", field="train.min_timestep")
    if tr.fp8_base_text_encoder and not tr.fp8_base:
        raise UserError("train.fp8_base_text_encoder: only together with train.fp8_base = true",
                        field="train.fp8_base_text_encoder")
    if cfg.data.inverted_mask_prior > 0 and not (cfg.data.mask_dir or cfg.data.alpha_mask):
        raise UserError("data.inverted_mask_prior needs masks: set data.mask_dir or data.alpha_mask",
                        field="data.inverted_mask_prior")
    if cfg.data.validation_dir and cfg.data.validation_split > 0:
        raise UserError("data.validation_split: give data.validation_dir or a split, not both",
                        field="data.validation_split")
    if tr.keep_best and not (cfg.data.validation_dir or cfg.data.validation_split > 0):
        raise UserError("train.keep_best needs a validation set: set data.validation_dir or data.validation_split",
                        field="train.keep_best")
    from trainer.generate.prompt_syntax import parse_sample_prompts
    parse_sample_prompts(cfg.sample.prompts)  # a bad --w/--s/... option fails here, before anything runs
    check_adapter_options(cfg.lora, cfg.output)
    name = cfg.output.name
    if not name or any(c in name for c in '/\\:*?"<>|') or name in (".", ".."):
        raise UserError(f"output.name {name!r} is not a valid file name", field="output.name")


# ---------------------------------------------------------------------------------------------- TOML writing

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        return r if ("." in r or "e" in r or "inf" in r or "nan" in r) else r + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v)} to TOML")


def dict_to_toml(data: dict[str, dict[str, Any]], header: str = "", preset_version: bool = True) -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()] if header else []
    if preset_version:
        lines.append(f"preset_version = {PRESET_VERSION}")
    for sname, section in data.items():
        if not section:
            continue
        lines.append("")
        lines.append(f"[{sname}]")
        for k, v in section.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def config_to_toml(cfg: Config, header: str = "") -> str:
    """The full resolved config; itself a valid --config and preset."""
    return dict_to_toml(config_to_dict(cfg), header)


def diff_from_defaults(cfg: Config) -> dict[str, dict[str, Any]]:
    """Only the keys that differ from the defaults (what a preset stores)."""
    out: dict[str, dict[str, Any]] = {}
    for fi in FIELDS.values():
        v = getattr(getattr(cfg, fi.section), fi.name)
        if v != fi.default:
            out.setdefault(fi.section, {})[fi.name] = v
    return out


def help_table(markdown: bool = False) -> str:
    """Every key with type, default, range/choices and help: for --help-config and the docs."""
    rows = []
    for fi in FIELDS.values():
        rng = ""
        if fi.choices:
            rng = (", " if markdown else "|").join(map(str, fi.choices))
        elif fi.min is not None or fi.max is not None:
            rng = f"{fi.min:g}..{fi.max:g}"
        rows.append((fi.key, fi.type_name, _toml_value(fi.default), rng, fi.help))
    if markdown:
        out = ["| key | type | default | range / choices | help |", "|---|---|---|---|---|"]
        out += [f"| `{k}` | {t} | `{d}` | {r} | {h} |" for k, t, d, r, h in rows]
        return "\n".join(out)
    return "\n".join(f"  {k:<34} {t:<5} default {d:<12} {('[' + r + ']') if r else ''}\n      {h}"
                     for k, t, d, r, h in rows)
