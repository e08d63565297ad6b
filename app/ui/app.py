"""LoRA Studio's web app: Dataset, Train, Generate and Presets tabs over the engine (gradio is imported only here).

The app adds no engine logic: the Train form is generated from ``trainer.config.FIELDS`` and checked with
``check_value``; training runs as the headless trainer subprocess (``app.ui.jobs``); dataset work calls
``datasets_tools``; images come from one long-lived ``trainer.generate.engine.Generator``. Importing this module does
not import torch: models load on first use. Every user-facing problem is one line beside the control that
caused it, never a traceback.

Files: the app works in a root folder (``lorastudio ui --root DIR``, default the current folder; relative paths
in the forms are relative to it). Runs land in ``<root>/outputs``, the demo in ``<root>/demo``, thumbnails,
contact sheets and exported presets in ``<root>/.lorastudio-ui``. Only those folders are served to the
browser; pictures from dataset folders the user picks reach it as thumbnails the app made.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.ui.startup import skip_stub_regeneration

skip_stub_regeneration()  # about half of `import gradio`'s time is stub-file regeneration meant for its developers
import gradio as gr  # noqa: E402

from trainer import config as C
from trainer.errors import UserError

from app.ui.jobs import JOBS, JobView, format_duration

log = logging.getLogger("lorastudio.ui")

MAX_GALLERY = 300      # dataset pictures shown at once (thumbnails)
THUMB_PX = 192
MAX_UPLOAD = "1mb"     # only presets are uploaded; validate_preset_text refuses anything over 64 KiB with the reason
WORK_DIR_NAME = ".lorastudio-ui"
SAMPLERS = ("euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc")
CAPTIONERS = ("template", "blip", "wd14")

CSS = """
.ls-error { color: #b91c1c; font-size: 0.9em; }
.ls-error p { margin: 2px 0 !important; }
.ls-ok { color: #166534; }
.ls-banner { border: 2px solid #f59e0b; background: #fffbeb; border-radius: 8px; padding: 6px 12px; }
.ls-banner p { margin: 4px 0 !important; color: #78350f; }
.ls-progress { position: relative; height: 28px; border-radius: 6px; background: #e5e7eb; overflow: hidden; }
.ls-progress .ls-bar { position: absolute; top: 0; left: 0; bottom: 0; background: #f97316; transition: width .4s; }
.ls-progress .ls-bar.ls-done { background: #16a34a; }
.ls-progress .ls-bar.ls-failed { background: #dc2626; }
.ls-progress .ls-bar.ls-indeterminate { width: 30% !important; animation: ls-slide 1.4s infinite linear; }
@keyframes ls-slide { from { left: -30%; } to { left: 100%; } }
.ls-progress .ls-text { position: absolute; inset: 0; display: flex; align-items: center; padding: 0 10px;
  font-size: 0.9em; color: #111827; font-variant-numeric: tabular-nums; }
"""


# ------------------------------------------------------------------------------------------------ app state


@dataclass
class AppContext:
    """Where the app reads and writes; the folders it may serve; the folders the user picked."""
    root: Path
    demo_requested: bool = False
    chosen: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.work = self.root / WORK_DIR_NAME
        self.outputs = self.root / "outputs"
        for d in (self.work, self.outputs, self.work / "thumbs", self.work / "preview", self.work / "exports"):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self.chosen = [f for f in json.loads((self.work / "folders.json").read_text(encoding="utf-8"))
                           if isinstance(f, str)]
        except (OSError, ValueError):
            self.chosen = []

    @property
    def default_lora_dir(self) -> Path:
        return self.root / "loras"

    def remember_folder(self, folder: str) -> None:
        folder = str(Path(folder).resolve())
        self.chosen = [folder] + [f for f in self.chosen if f != folder][:19]
        try:
            (self.work / "folders.json").write_text(json.dumps(self.chosen, indent=1), encoding="utf-8")
        except OSError:
            pass

    def served_paths(self) -> list[str]:
        """Folders gradio may serve files from (launch's allowed_paths)."""
        return [str(self.outputs), str(self.work), str(self.root / "demo")]

    def preset_roots(self) -> list[Path]:
        """Where paths inside an imported preset may point: this app's folders and the ones the user picked."""
        from app.demo import TOYWORLD_MODEL
        roots = [self.root, TOYWORLD_MODEL, *map(Path, self.chosen)]
        return roots


CTX: AppContext | None = None
_DEMO: dict[str, Any] = {"status": "none", "info": None, "message": ""}
_DEMO_LOCK = threading.Lock()


def _ctx() -> AppContext:
    global CTX
    if CTX is None:
        CTX = AppContext(Path.cwd())
    return CTX


# ------------------------------------------------------------------------------------------------ helpers


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _error_md(message: str) -> str:
    return f"⚠️ {message}"


def _user_error(e: BaseException) -> UserError | None:
    """UserError as is; datasets_tools' DatasetError as a UserError (it stays free of trainer imports)."""
    if isinstance(e, UserError):
        return e
    from datasets_tools.errors import DatasetError
    if isinstance(e, DatasetError):
        return UserError(str(e), field=getattr(e, "field", None), path=getattr(e, "path", None))
    return None


def guarded(n_outputs: int, status_at: int = 0):
    """A handler whose UserError/DatasetError becomes one line in its status output (other outputs unchanged).

    Anything else is a bug: it is logged with its traceback on the server and shown as one line too, so the page
    never freezes on a half-finished event.
    """
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure must reach the page as one line
                ue = _user_error(e)
                if ue is not None:
                    msg = _error_md(_one_line(ue))
                else:
                    log.exception("handler %s failed", fn.__name__)
                    msg = _error_md(f"unexpected error ({type(e).__name__}: {_one_line(e)}); details are in the "
                                    "server log")
                out = [gr.skip()] * n_outputs
                out[status_at] = gr.update(value=msg, visible=True)
                return out[0] if n_outputs == 1 else tuple(out)
        return wrapper
    return deco


def _df(rows: list[list], headers: list[str]):
    import pandas as pd
    return pd.DataFrame(rows, columns=headers)


def _rel(path: str | Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _resolve(path: str) -> Path:
    return Path(path).expanduser().resolve()


# ------------------------------------------------------------------------------------------------ the form

#: Every config field, basic ones first: the Train form, in this order, is generated from the schema.
BASIC_FIELDS = [fi for fi in C.FIELDS.values() if fi.basic]
ADVANCED_FIELDS = [fi for fi in C.FIELDS.values() if not fi.basic]
FORM_FIELDS = BASIC_FIELDS + ADVANCED_FIELDS
#: Keys that keep the user's value when a preset that does not set them is loaded (where things are, not how).
_KEEP_ON_PRESET = {fi.key for fi in C.FIELDS.values() if fi.path} | {"output.name", "data.default_caption",
                                                                     "output.trigger_phrase"}


def value_to_form(fi: C.FieldInfo, value: Any) -> Any:
    """A config value as its form component shows it."""
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
        value = float(raw) if fi.type is float else raw
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
            errors[fi.key] = _one_line(e)
    return cfg, errors


def config_to_form(cfg: C.Config) -> list:
    return [value_to_form(fi, getattr(getattr(cfg, fi.section), fi.name)) for fi in FORM_FIELDS]


def _looks_like_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value)) and not Path(value).exists()


def check_before_start(cfg: C.Config) -> dict[str, str]:
    """What would make the trainer refuse at once, found before anything starts: {key: one-line error}."""
    errors: dict[str, str] = {}
    try:
        C.validate_for_training(cfg)
    except UserError as e:
        errors[e.field or "output.name"] = _one_line(e)
    base = cfg.model.base
    if base and not Path(base).expanduser().exists() and not _looks_like_hub_id(base):
        errors["model.base"] = (f"model.base: {base} not found; give a diffusers folder, a .safetensors "
                                "checkpoint or a hub id (org/name)")
    for key, value in (("data.dir", cfg.data.dir), ("data.reg_dir", cfg.data.reg_dir)):
        if value and not Path(value).expanduser().is_dir():
            errors.setdefault(key, f"{key}: folder not found: {value}")
    if cfg.model.vae and not Path(cfg.model.vae).expanduser().exists() and not _looks_like_hub_id(cfg.model.vae):
        errors["model.vae"] = f"model.vae: {cfg.model.vae} not found"
    return errors


def absolute_paths(cfg: C.Config) -> C.Config:
    """Relative paths made absolute (against the app's root), so the run's config.toml replays from any folder."""
    for fi in C.FIELDS.values():
        if not fi.path:
            continue
        section = getattr(cfg, fi.section)
        value = getattr(section, fi.name)
        if value and not (fi.key in ("model.base", "model.vae") and _looks_like_hub_id(value)):
            setattr(section, fi.name, str(_resolve(value)))
    return cfg


def _field_component(fi: C.FieldInfo):
    value = value_to_form(fi, fi.default)
    info = fi.help
    if fi.min is not None and fi.max is not None and fi.choices is None:
        info += f" [{fi.min:g} .. {fi.max:g}]"
    eid = f"f-{fi.section}-{fi.name}"
    if fi.type is bool:
        return gr.Checkbox(value=value, label=fi.key, info=info, elem_id=eid)
    if fi.choices is not None:
        return gr.Dropdown(choices=list(fi.choices), value=value, label=fi.key, info=info, elem_id=eid)
    if fi.type is list:
        return gr.Textbox(value=value, label=fi.key, info=info + " One per line.", lines=2, elem_id=eid)
    return gr.Textbox(value=value, label=fi.key, info=info + (" (a path)" if fi.path else ""), elem_id=eid,
                      max_lines=1)


def _error_updates(errors: dict[str, str]) -> list:
    return [gr.update(value=_error_md(errors[fi.key]), visible=True) if fi.key in errors
            else gr.update(value="", visible=False) for fi in FORM_FIELDS]


def _preset_choices() -> list[tuple[str, str]]:
    from trainer.config.presets import list_presets
    out = [(f"{p.name} ({p.source}): {p.summary[:70]}", f"preset:{p.name}") for p in list_presets()]
    ctx = _ctx()
    if ctx.outputs.is_dir():
        for d in sorted(ctx.outputs.iterdir()):
            if (d / "config.toml").is_file():
                out.append((f"run {d.name}: its settings", f"run:{d.name}"))
    return out


def load_preset_into_form(choice: str, current: list) -> tuple[list, str]:
    """Form values for a preset (defaults + the preset; the user's paths kept when it sets none) or a run's config."""
    from trainer.config.presets import resolve_preset
    if not choice:
        raise UserError("choose a preset or an earlier run first")
    kind, _, name = choice.partition(":")
    if kind == "run":
        path = _ctx().outputs / name / "config.toml"
        cfg = C.load_config(path)
        return config_to_form(cfg), f"loaded the settings of run '{name}' ({_rel(path, _ctx().root)})"
    path = resolve_preset(name)
    data = C.read_toml(path)
    cfg = C.load_config(path)
    values = config_to_form(cfg)
    kept = []
    for i, fi in enumerate(FORM_FIELDS):
        set_by_preset = isinstance(data.get(fi.section), dict) and fi.name in data[fi.section]
        if fi.key in _KEEP_ON_PRESET and not set_by_preset and current and current[i] not in ("", None):
            values[i] = current[i]
            kept.append(fi.key)
    note = f"; kept your {', '.join(kept)}" if kept else ""
    return values, f"loaded preset '{name}' over the defaults{note}"


# ------------------------------------------------------------------------------------------------ Train tab


def _progress_html(v: JobView) -> str:
    if v.state == "idle":
        return ('<div class="ls-progress" id="train-progress-bar" data-state="idle"><div class="ls-bar" '
                'style="width:0%"></div><div class="ls-text">no training job</div></div>')
    pct = 100.0 * v.step / v.max_steps if v.max_steps else 0.0
    parts = [v.state]
    if v.max_steps:
        parts.append(f"step {v.step} / {v.max_steps} ({pct:.0f}%)")
    if v.state in ("running", "stopping") and v.it_per_s:
        parts.append(f"{v.it_per_s:.2f} it/s")
    if v.eta_s is not None and v.state in ("running", "stopping"):
        parts.append(f"ETA {format_duration(v.eta_s)}")
    if v.loss is not None:
        parts.append(f"loss {v.loss:.4f}")
    if v.state == "starting" and v.phase:
        parts.append(v.phase)
    cls = {"completed": "ls-done", "failed": "ls-failed"}.get(v.state, "")
    if v.state == "starting" and not v.max_steps:
        cls = "ls-indeterminate"
    return (f'<div class="ls-progress" id="train-progress-bar" data-state="{v.state}" data-step="{v.step}" '
            f'data-max="{v.max_steps}"><div class="ls-bar {cls}" style="width:{pct:.1f}%"></div>'
            f'<div class="ls-text">{html.escape(" · ".join(parts))}</div></div>')


def _status_md(v: JobView) -> str:
    if v.state == "idle":
        return "No training job yet. Fill in the form (or load a preset) and press **Start**."
    title = {"starting": "Starting", "running": "Training", "stopping": "Stopping", "completed": "Finished",
             "stopped": "Stopped", "failed": "Failed"}[v.state]
    lines = [f"**{title}: run `{v.name}`** ({html.escape(v.run_dir)})", "", html.escape(v.message)]
    if v.state == "failed":
        if v.returncode is not None:
            lines += ["", f"**Exit code {v.returncode}**: {html.escape(v.error)}"]
        lines += ["", "The web app is fine; fix the cause and press Start or Resume. The last log lines are below."]
    if v.checkpoint:
        lines += ["", f"Last checkpoint: {html.escape(v.checkpoint)}"]
    if v.warnings:
        lines += ["", "Warnings:"] + [f"- {html.escape(w)}" for w in v.warnings[-5:]]
    return "\n".join(lines)


def _loss_frame(v: JobView):
    import pandas as pd
    pts = v.loss_points
    return pd.DataFrame({"step": [p[0] for p in pts], "loss": [p[1] for p in pts]})


def _buttons(v: JobView) -> tuple:
    active = v.active
    stop_label = "Stop now (no checkpoint)" if v.state == "stopping" else "Stop (saves a checkpoint)"
    return (gr.update(interactive=not active), gr.update(interactive=active, value=stop_label),
            gr.update(interactive=not active))


def job_outputs(seen: dict | None, force: bool = False) -> tuple:
    """Tick: what changed since this page last looked (everything skipped when nothing did)."""
    v = JOBS.view()
    seen = dict(seen or {})
    n = 10
    if not force and seen.get("version") == v.version and seen.get("state") == v.state:
        return tuple([gr.skip()] * n)
    plot = _loss_frame(v) if force or seen.get("points") != len(v.loss_points) else gr.skip()
    samples = [(p, c) for p, c in v.samples if Path(p).is_file()]
    gallery = samples if force or seen.get("samples") != len(samples) else gr.skip()
    new_seen = {"version": v.version, "state": v.state, "points": len(v.loss_points), "samples": len(samples)}
    return (_status_md(v), _progress_html(v), plot, gallery, "\n".join(v.log_tail) or "(no log yet)",
            v.command or "", *_buttons(v), new_seen)


def _start_or_resume(resume: bool, overwrite: bool, values) -> tuple:
    cfg, errors = form_to_config(values)
    if not errors:
        errors = check_before_start(cfg)
    if errors:
        first = next(iter(errors.values()))
        msg = _error_md(f"{len(errors)} field(s) need attention before training can start (marked below); "
                        f"first: {first}")
        return (*_error_updates(errors), gr.update(value=msg, visible=True))
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.output.dir) / cfg.output.name
    config_path = run_dir / "config.toml"
    text = C.config_to_toml(cfg, header=f"Resolved LoRA Studio config of run '{cfg.output.name}' (from the web app)."
                                        f"\nReplay: python -m trainer --config {config_path}")
    try:
        job = JOBS.start(run_dir, text, resume=resume, overwrite=overwrite and not resume, cwd=_ctx().root)
    except UserError as e:
        errs = {e.field: _one_line(e)} if e.field in C.FIELDS else {}
        return (*_error_updates(errs), gr.update(value=_error_md(_one_line(e)), visible=True))
    what = "resuming" if resume else "started"
    return (*_error_updates({}), gr.update(value=f"{what} run '{job.name}': `{job.display_command}`", visible=True))


# ------------------------------------------------------------------------------------------------ Dataset tab


def _thumbnail(path: Path) -> str:
    """A cached small copy of a dataset picture (the browser never gets the original file)."""
    from datasets_tools.images import load_rgb
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()[:24]
    out = _ctx().work / "thumbs" / f"{key}.jpg"
    if not out.exists():
        img = load_rgb(path, draft_px=THUMB_PX)
        img.thumbnail((THUMB_PX, THUMB_PX))
        tmp = out.with_suffix(".tmp.jpg")
        img.save(tmp, quality=88)
        tmp.replace(out)
    return str(out)


def _dataset_items(folder: Path, ext: str) -> list[dict]:
    from datasets_tools.captions import image_caption_pairs
    from datasets_tools.folder import read_caption
    items = []
    for img, cap in image_caption_pairs(folder, ext):
        try:
            text = read_caption(cap) if cap.exists() else ""
        except (OSError, UnicodeDecodeError):
            text = "(caption not readable)"
        items.append({"image": str(img), "caption_file": str(cap), "caption": text,
                      "rel": img.relative_to(folder).as_posix()})
    return items


def _gallery(items: list[dict]) -> list:
    out = []
    for it in items[:MAX_GALLERY]:
        try:
            thumb = _thumbnail(Path(it["image"]))
        except Exception:  # a broken picture: the scan report names it; the gallery leaves it out
            continue
        out.append((thumb, f"{it['rel']}: {it['caption'] or '(no caption)'}"))
    return out


def _check_dataset_folder(folder: str) -> Path:
    from datasets_tools.folder import check_folder
    if not folder or not str(folder).strip():
        raise UserError("choose a dataset folder first (type its path)")
    return check_folder(_resolve(str(folder).strip()))


def _bucket_settings(res, min_px, max_px, step, no_up, enable, batch, ext) -> dict:
    vals = {}
    for key, raw in (("data.resolution", res), ("data.min_bucket_px", min_px), ("data.max_bucket_px", max_px),
                     ("data.bucket_step_px", step), ("data.bucket_no_upscale", no_up),
                     ("data.enable_bucket", enable), ("train.batch_size", batch),
                     ("data.caption_extension", ext)):
        try:
            vals[key] = value_from_form(C.FIELDS[key], raw)
        except UserError as e:
            raise UserError(f"Train tab: {_one_line(e)}", field=key) from None
    return vals


def _tag_table(folder: Path, ext: str):
    from datasets_tools.captions import tag_frequency, total_frequency
    rows = [[tag, n] for tag, n in total_frequency(tag_frequency(folder, caption_extension=ext))[:200]]
    return _df(rows, ["tag", "images"])


# ------------------------------------------------------------------------------------------------ Generate tab


class GenerationSession:
    """One base model and one Generator kept alive between generations (LoRA weights change, files are not re-read)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.generator = None
        self.loads = 0
        self.load_s = 0.0

    def get(self, base: str, progress=None, lora_dir: str | None = None):
        """The Generator for this base model, loading it only when the model changed; (generator, note)."""
        gen, note = self._get(base, progress)
        d = Path(lora_dir).expanduser() if lora_dir and str(lora_dir).strip() else None
        gen.lora_dir = d if d is not None and d.is_dir() else None  # where <lora:name> prompt tags are looked up
        return gen, note

    def _get(self, base: str, progress=None):
        base = (base or "").strip()
        if not base:
            raise UserError("choose a base model first (a diffusers folder, a .safetensors checkpoint or a hub id)",
                            field="model.base")
        path = Path(base).expanduser()
        source = str(path.resolve()) if path.exists() else base
        if not path.exists() and not _looks_like_hub_id(base):
            raise UserError(f"base model not found: {base}", field="model.base")
        key = (source,)
        if self.key == key and self.generator is not None:
            return self.generator, f"base model reused (loaded once, {self.load_s:.1f} s)"
        if progress is not None:
            progress(0.0, desc="loading the base model (first use) ...")
        t0 = time.perf_counter()
        import torch

        from trainer.config import ModelConfig
        from trainer.generate.engine import Generator
        from trainer.models.loading import load_base_model
        from app.cli.generate import _quiet_loading
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        _quiet_loading()
        self.generator = None  # drop the old model before loading the next
        self.key = None
        base_model = load_base_model(ModelConfig(base=source), dtype=dtype, device=device)
        self.generator = Generator(base_model)
        self.key = key
        self.loads += 1
        self.load_s = time.perf_counter() - t0
        return self.generator, f"base model loaded in {self.load_s:.1f} s"


GEN = GenerationSession()


def lora_choices(lora_dir: str) -> list[tuple[str, str]]:
    """LoRA files in the runs folder (final and intermediate saves) and in the LoRA folder."""
    ctx = _ctx()
    seen, out = set(), []
    for f in sorted(ctx.outputs.rglob("*.safetensors")):
        rel = f.relative_to(ctx.outputs).parts
        if "checkpoints" in rel or f.name.startswith("pytorch_lora_weights") or rel[0] == "generated":
            continue
        out.append((f"outputs/{f.relative_to(ctx.outputs).as_posix()}", str(f)))
        seen.add(str(f.resolve()))
    d = Path(lora_dir).expanduser() if lora_dir else None
    if d is not None and d.is_dir():
        from trainer.generate.engine import list_loras
        for item in list_loras(d):
            if str(Path(item["path"]).resolve()) not in seen:
                label = f"{_rel(item['path'], d.resolve())}" + (f" ({item['alias']})" if item["alias"] else "")
                out.append((label, item["path"]))
    return out


def _numbers(text: str, what: str, cast=float) -> list:
    out = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if part:
            try:
                out.append(cast(part))
            except ValueError:
                raise UserError(f"{what}: '{part}' is not a {'whole ' if cast is int else ''}number") from None
    if not out:
        raise UserError(f"{what}: give at least one value, e.g. {'1, 2' if cast is int else '0, 0.5, 1'}")
    return out


def _specs(rows: list[dict]):
    from trainer.generate.engine import LoraSpec
    specs = []
    for r in rows:
        split = bool(r.get("split"))
        specs.append(LoraSpec(r["path"], float(r["weight"]), te_weight=float(r["te"]) if split else None,
                              unet_weight=float(r["unet"]) if split else None, name=Path(r["path"]).stem))
    return specs


def _gen_kwargs(steps, cfg, width, height, sampler) -> dict:
    try:
        steps, width, height = int(steps), int(width), int(height)
    except (TypeError, ValueError):
        raise UserError("steps, width and height must be whole numbers") from None
    if sampler not in SAMPLERS:
        raise UserError(f"sampler: choose one of {', '.join(SAMPLERS)}")
    return dict(steps=steps, guidance_scale=float(cfg), width=width, height=height, sampler=sampler)


def _save_generated(image, stem: str) -> str:
    from trainer.generate.engine import save_image
    day = time.strftime("%Y%m%d")
    out = _ctx().outputs / "generated" / day / f"{time.strftime('%H%M%S')}-{stem}.png"
    n = 1
    while out.exists():
        out = out.with_name(f"{time.strftime('%H%M%S')}-{stem}-{n}.png")
        n += 1
    return str(save_image(image, out))


# ------------------------------------------------------------------------------------------------ demo


def _demo_banner() -> str:
    st = _DEMO["status"]
    if st == "ready":
        info = _DEMO["info"]
        return (f"**{html.escape(info.label)}**  \nPictures: `{info.images}` · model: `{info.model}` · the Train "
                "form holds the `demo` preset. Walk through: Dataset → Scan, Caption (template), Bucket preview; "
                "Train → Start; Generate with the trained LoRA.")
    if st == "building":
        return f"**Creating the demo** ... {html.escape(_DEMO.get('message', ''))}"
    if st == "failed":
        return _error_md(f"the demo could not be created: {_DEMO.get('message', '')}")
    return ""


def build_demo(progress_cb=None) -> None:
    """Create the demo (model, pictures, preset) once; safe to call from a thread and from a button."""
    from app.demo import create_demo
    with _DEMO_LOCK:
        if _DEMO["status"] == "ready":
            return
        _DEMO.update(status="building", message="")

    def say(text: str) -> None:
        _DEMO["message"] = text
        if progress_cb is not None:
            progress_cb(text)
    try:
        info = create_demo(_ctx().root, progress=say)
    except Exception as e:  # noqa: BLE001
        log.exception("demo creation failed")
        _DEMO.update(status="failed", message=_one_line(e))
        raise
    _ctx().remember_folder(info.images)
    _DEMO.update(status="ready", info=info, message="")


# ------------------------------------------------------------------------------------------------ the app


def build_app(ctx: AppContext | None = None) -> gr.Blocks:
    """The Blocks app, queued (one event at a time unless a handler says otherwise), ready for `launch()`.

    Nothing heavy happens here: no model, no torch, no folder scan."""
    with _server_app_deferred():
        app = _build_blocks(ctx)
        app.queue(default_concurrency_limit=1)
    return app


@contextlib.contextmanager
def _server_app_deferred():
    """Skip the FastAPI apps gradio builds before `launch()`.

    gradio builds a whole server app when a Blocks is created, when its `with` block ends and in `queue()`, and
    then again in `launch()`. Only the last one is served. Each of the earlier ones costs about 0.4 s on a 2-core
    machine (route signatures, pydantic models, the page config), which is a fifth of the app's own start-up.
    """
    routes = getattr(gr, "routes", None)
    real = getattr(routes, "App", None) and routes.App.__dict__.get("create_app")
    if not isinstance(real, staticmethod):  # another gradio layout: leave it alone
        yield
        return
    routes.App.create_app = staticmethod(lambda *args, **kwargs: None)
    try:
        yield
    finally:
        routes.App.create_app = real


def _build_blocks(ctx: AppContext | None) -> gr.Blocks:
    global CTX
    if ctx is not None:
        CTX = ctx
    ctx = _ctx()
    from app.demo import load_demo_info
    info = load_demo_info(ctx.root)
    if info is not None and _DEMO["status"] == "none":
        _DEMO.update(status="ready", info=info)

    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as app:
        seen = gr.State({})
        with gr.Row(equal_height=False):
            gr.Markdown("# LoRA Studio\nCaption, bucket, train and mix Stable Diffusion LoRAs. "
                        f"Root: `{ctx.root}`", elem_id="title")
            demo_btn = gr.Button("Create the demo (tiny model + drawn pictures)", size="md", scale=0,
                                 min_width=320, elem_id="demo-btn")
        demo_banner = gr.Markdown(_demo_banner(), elem_id="demo-banner", elem_classes="ls-banner",
                                  visible=_DEMO["status"] != "none")
        demo_poll = gr.Timer(1.0, active=False)

        with gr.Tabs():
            # ======================================================================== Dataset
            with gr.Tab("Dataset", id="dataset"):
                with gr.Row(equal_height=False):
                    ds_folder = gr.Dropdown(choices=ctx.chosen, value=None, allow_custom_value=True, scale=4,
                                            label="Dataset folder", elem_id="ds-folder",
                                            info="Type a folder path (or pick one you used before). Sub-folders "
                                                 "named 'N_name' repeat their images N times.")
                    ds_scan_btn = gr.Button("Scan", variant="primary", size="md", scale=0, elem_id="ds-scan")
                    ds_use_btn = gr.Button("Use for training", size="md", scale=0, elem_id="ds-use")
                ds_status = gr.Markdown("", elem_id="ds-status")
                with gr.Row():
                    with gr.Column(scale=3):
                        ds_gallery = gr.Gallery(label="Pictures and captions (click one to edit its caption)",
                                                columns=6, height=360, allow_preview=False, elem_id="ds-gallery")
                        with gr.Row(equal_height=False):
                            ds_selected = gr.Textbox(label="Selected picture", interactive=False, scale=1,
                                                     elem_id="ds-selected")
                            ds_caption = gr.Textbox(label="Caption", scale=3, elem_id="ds-caption")
                            ds_save_cap = gr.Button("Save caption", size="md", scale=0, elem_id="ds-save-caption")
                        ds_edit_status = gr.Markdown("", elem_id="ds-edit-status")
                    with gr.Column(scale=2):
                        ds_summary = gr.Code(label="Scan report", language=None, lines=10, elem_id="ds-summary",
                                             wrap_lines=True)
                ds_problems = gr.Dataframe(headers=["file", "problem", "message"], label="Problems by file",
                                           interactive=False, elem_id="ds-problems", max_height=260)
                with gr.Accordion("Caption the pictures", open=True):
                    with gr.Row(equal_height=False):
                        cap_name = gr.Dropdown(choices=list(CAPTIONERS), value="template", label="Captioner",
                                               info="template: from file names (offline); blip: a transformers "
                                                    "image-to-text model; wd14: a booru tagger (ONNX)",
                                               elem_id="cap-name")
                        cap_model = gr.Textbox(label="Model (blip / wd14)", placeholder="a local folder or hub id",
                                               elem_id="cap-model")
                        cap_template = gr.Textbox(value="{name}", label="Template",
                                                  info="{trigger}, {name} (file name), {folder}",
                                                  elem_id="cap-template")
                        cap_trigger = gr.Textbox(label="Trigger word (put first)", elem_id="cap-trigger")
                        cap_overwrite = gr.Checkbox(label="Replace existing captions (backed up)",
                                                    elem_id="cap-overwrite")
                        cap_btn = gr.Button("Caption", variant="primary", size="md", scale=0, elem_id="cap-run")
                    cap_status = gr.Markdown("", elem_id="cap-status")
                with gr.Accordion("Caption operations", open=True):
                    with gr.Row(equal_height=False):
                        op_prefix = gr.Textbox(label="Trigger prefix", elem_id="op-prefix")
                        op_prefix_btn = gr.Button("Add prefix", size="md", scale=0, elem_id="op-prefix-btn")
                        op_find = gr.Textbox(label="Find (whole words)", elem_id="op-find")
                        op_repl = gr.Textbox(label="Replace with (empty deletes)", elem_id="op-repl")
                        op_replace_btn = gr.Button("Replace", size="md", scale=0, elem_id="op-replace-btn")
                    with gr.Row(equal_height=False):
                        op_remove = gr.Textbox(label="Remove tags (comma-separated)", elem_id="op-remove")
                        op_remove_btn = gr.Button("Remove tags", size="md", scale=0, elem_id="op-remove-btn")
                        op_dedupe_btn = gr.Button("Dedupe tags", size="md", scale=0, elem_id="op-dedupe-btn")
                        op_undo_btn = gr.Button("Undo last edit", size="md", scale=0, elem_id="op-undo-btn")
                        op_stats_btn = gr.Button("Tag stats", size="md", scale=0, elem_id="op-stats-btn")
                    op_status = gr.Markdown("", elem_id="op-status")
                    op_tags = gr.Dataframe(headers=["tag", "images"], label="Tag frequency", interactive=False,
                                           elem_id="op-tags", max_height=240)
                with gr.Accordion("Bucket preview (the trainer's own bucket and crop for each picture)", open=True):
                    with gr.Row(equal_height=False):
                        gr.Markdown("Uses the Train tab's data.resolution, data.min/max_bucket_px, "
                                    "data.bucket_step_px, data.bucket_no_upscale, data.enable_bucket and "
                                    "train.batch_size.")
                        bp_btn = gr.Button("Bucket preview", variant="primary", size="md", scale=0, elem_id="bp-run")
                    bp_status = gr.Markdown("", elem_id="bp-status")
                    with gr.Row():
                        bp_counts = gr.Dataframe(headers=["bucket", "images", "samples per epoch"],
                                                 label="Buckets", interactive=False, elem_id="bp-counts",
                                                 max_height=260, scale=1)
                        bp_rows = gr.Dataframe(headers=["image", "size", "bucket", "crop box (image px)"],
                                               label="Each picture", interactive=False, elem_id="bp-rows",
                                               max_height=260, scale=2)
                    bp_sheet = gr.Image(label="Contact sheet: kept area bright, yellow box = crop", type="filepath",
                                        interactive=False, elem_id="bp-sheet", height=420)
                ds_items = gr.State([])

            # ======================================================================== Train
            with gr.Tab("Train", id="train"):
                with gr.Row(equal_height=False):
                    preset_pick = gr.Dropdown(choices=_preset_choices(), value=None, label="Preset or earlier run",
                                              scale=4, elem_id="tr-preset")
                    preset_load = gr.Button("Load into the form", size="md", scale=0, elem_id="tr-preset-load")
                    preset_refresh = gr.Button("↻", size="md", scale=0, min_width=40, elem_id="tr-preset-refresh")
                tr_form_msg = gr.Markdown("", elem_id="tr-form-msg")
                comps: dict[str, Any] = {}
                errs: dict[str, Any] = {}

                def add_fields(fields):
                    for i in range(0, len(fields), 3):
                        with gr.Row():
                            for fi in fields[i:i + 3]:
                                with gr.Column(min_width=220):
                                    comps[fi.key] = _field_component(fi)
                                    errs[fi.key] = gr.Markdown("", visible=False, elem_classes="ls-error",
                                                               elem_id=f"err-{fi.section}-{fi.name}")
                gr.Markdown("### Basic settings")
                add_fields(BASIC_FIELDS)
                with gr.Accordion("Advanced", open=False, elem_id="tr-advanced"):
                    for section, cls in C.SECTIONS.items():
                        fields = [fi for fi in ADVANCED_FIELDS if fi.section == section]
                        if fields:
                            gr.Markdown(f"#### [{section}] {cls.__doc__ or ''}")
                            add_fields(fields)
                form_inputs = [comps[fi.key] for fi in FORM_FIELDS]
                form_errors = [errs[fi.key] for fi in FORM_FIELDS]
                with gr.Row(equal_height=False):
                    start_btn = gr.Button("Start", variant="primary", elem_id="tr-start")
                    stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", interactive=False,
                                         elem_id="tr-stop")
                    resume_btn = gr.Button("Resume", elem_id="tr-resume")
                    overwrite = gr.Checkbox(label="overwrite: start over in a run folder that has checkpoints",
                                            elem_id="tr-overwrite")
                tr_msg = gr.Markdown("", elem_id="tr-msg")
                job_status = gr.Markdown(_status_md(JobView()), elem_id="tr-status")
                job_progress = gr.HTML(_progress_html(JobView()), elem_id="tr-progress")
                with gr.Row():
                    loss_plot = gr.LinePlot(_loss_frame(JobView()), x="step", y="loss", title="Loss",
                                            height=260, elem_id="tr-loss", scale=1)
                    samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="tr-samples", scale=1)
                job_log = gr.Code(label="Log (last lines of <run>/train.log)", language=None, lines=10,
                                  max_lines=14, elem_id="tr-log", value="(no log yet)")
                job_cmd = gr.Code(label="The same run from a shell", language="shell", lines=1,
                                  elem_id="tr-command")
                with gr.Accordion("Resolved config (what Start writes to <run>/config.toml)", open=False):
                    preview_btn = gr.Button("Show config and command", elem_id="tr-preview")
                    preview_code = gr.Code(language=None, lines=12, elem_id="tr-preview-code")
                tick = gr.Timer(1.0)

            # ======================================================================== Generate
            with gr.Tab("Generate", id="generate") as generate_tab:
                with gr.Row(equal_height=False):
                    g_base = gr.Dropdown(choices=_model_choices(), value=None, allow_custom_value=True, scale=3,
                                         label="Base model", info="A diffusers folder, a .safetensors checkpoint "
                                                                  "or a hub id; it stays loaded between images",
                                         elem_id="g-base")
                    g_lora_dir = gr.Textbox(value=str(ctx.default_lora_dir), label="LoRA folder", scale=2,
                                            elem_id="g-lora-dir")
                with gr.Row(equal_height=False):
                    g_pick = gr.Dropdown(choices=lora_choices(str(ctx.default_lora_dir)), value=None,
                                         allow_custom_value=True, label="LoRA (from outputs/ and the LoRA folder)",
                                         scale=4, elem_id="g-pick")
                    g_refresh = gr.Button("↻", size="md", scale=0, min_width=40, elem_id="g-refresh")
                    g_add = gr.Button("Add LoRA", size="md", scale=0, elem_id="g-add")
                g_rows = gr.State([])
                g_rows_version = gr.State(0)

                @gr.render(inputs=[g_rows], triggers=[g_rows_version.change, app.load])
                def render_loras(rows):
                    if not rows:
                        gr.Markdown("No LoRA added: images come from the base model alone.", elem_id="g-no-lora")
                    for i, r in enumerate(rows):
                        with gr.Group(elem_id=f"g-lora-{i}"):
                            with gr.Row(equal_height=False):
                                gr.Markdown(f"**{html.escape(Path(r['path']).name)}**  \n`{r['path']}`",
                                            elem_id=f"g-lora-name-{i}")
                                w = gr.Slider(-2, 2, value=r["weight"], step=0.05, label="weight", scale=3,
                                              elem_id=f"g-lora-weight-{i}", key=f"w-{r['id']}", interactive=True)
                                rm = gr.Button("Remove", size="md", scale=0, elem_id=f"g-lora-remove-{i}",
                                               key=f"rm-{r['id']}")
                            with gr.Accordion("Advanced: separate text-encoder / UNet weights", open=False):
                                with gr.Row():
                                    split = gr.Checkbox(value=r["split"], label="use separate weights",
                                                        elem_id=f"g-lora-split-{i}", key=f"s-{r['id']}",
                                                        interactive=True)
                                    te = gr.Slider(-2, 2, value=r["te"], step=0.05, label="text encoder",
                                                   elem_id=f"g-lora-te-{i}", key=f"te-{r['id']}", interactive=True)
                                    un = gr.Slider(-2, 2, value=r["unet"], step=0.05, label="UNet",
                                                   elem_id=f"g-lora-unet-{i}", key=f"un-{r['id']}", interactive=True)

                        def setter(name, idx=i):
                            def fn(value, rows_now):
                                rows_now = [dict(x) for x in rows_now]
                                if idx < len(rows_now):
                                    rows_now[idx][name] = value
                                return rows_now
                            return fn
                        def set_weight(value, rows_now, idx=i):
                            rows_now = [dict(x) for x in rows_now]
                            if idx >= len(rows_now):
                                return rows_now, gr.skip(), gr.skip()
                            row = rows_now[idx]
                            row["weight"] = value
                            if row.get("split"):
                                return rows_now, gr.skip(), gr.skip()
                            row["te"] = row["unet"] = value  # the split sliders start from the weight
                            return rows_now, value, value
                        w.change(set_weight, [w, g_rows], [g_rows, te, un], show_progress="hidden")
                        split.change(setter("split"), [split, g_rows], [g_rows], show_progress="hidden")
                        te.change(setter("te"), [te, g_rows], [g_rows], show_progress="hidden")
                        un.change(setter("unet"), [un, g_rows], [g_rows], show_progress="hidden")

                        def remove(rows_now, version, idx=i):
                            return [x for j, x in enumerate(rows_now) if j != idx], version + 1
                        rm.click(remove, [g_rows, g_rows_version], [g_rows, g_rows_version])

                with gr.Row():
                    g_prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="g-prompt",
                                          info="<lora:name:weight> tags also work (names looked up in the LoRA "
                                               "folder)")
                    g_negative = gr.Textbox(label="Negative prompt", lines=2, scale=2, elem_id="g-negative")
                with gr.Row():
                    g_seed = gr.Number(value=1, precision=0, label="Seed (-1 = random)", elem_id="g-seed")
                    g_steps = gr.Number(value=20, precision=0, label="Steps", minimum=1, maximum=500,
                                        elem_id="g-steps")
                    g_cfg = gr.Number(value=7.0, label="CFG scale", minimum=0, maximum=50, step=0.5,
                                      elem_id="g-cfg")
                    g_width = gr.Number(value=512, precision=0, label="Width", step=8, elem_id="g-width")
                    g_height = gr.Number(value=512, precision=0, label="Height", step=8, elem_id="g-height")
                    g_sampler = gr.Dropdown(choices=list(SAMPLERS), value="euler", label="Sampler",
                                            elem_id="g-sampler")
                    g_batch = gr.Number(value=1, precision=0, label="Images", minimum=1, maximum=16,
                                        elem_id="g-batch")
                    g_fused = gr.Checkbox(value=True, label="fused (merge into weights; off = adapters)",
                                          elem_id="g-fused")
                with gr.Row(equal_height=False):
                    g_go = gr.Button("Generate", variant="primary", elem_id="g-generate")
                    g_grid_weights = gr.Textbox(value="0, 0.5, 1", label="Grid: weights of the first LoRA",
                                                elem_id="g-grid-weights")
                    g_grid_seeds = gr.Textbox(value="1, 2", label="Grid: seeds", elem_id="g-grid-seeds")
                    g_grid = gr.Button("Grid (weight x seed)", elem_id="g-grid")
                g_status = gr.Markdown("", elem_id="g-status")
                g_gallery = gr.Gallery(label="Images (click one for its parameters)", columns=4, height=460,
                                       object_fit="contain", elem_id="g-gallery")
                g_params = gr.Textbox(label="Parameters (A1111 format; also stored in the PNG)", lines=4,
                                      elem_id="g-params", buttons=["copy"])
                g_params_list = gr.State([])

            # ======================================================================== Presets
            with gr.Tab("Presets", id="presets") as presets_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        p_table = gr.Dataframe(_presets_frame(), label="Shipped and user presets",
                                               interactive=False, elem_id="p-table", max_height=300)
                        with gr.Row(equal_height=False):
                            p_pick = gr.Dropdown(choices=_preset_names(), value=None, label="Preset",
                                                 elem_id="p-pick", scale=3)
                            p_refresh = gr.Button("↻", size="md", scale=0, min_width=40, elem_id="p-refresh")
                            p_to_form = gr.Button("Use in the Train tab", size="md", scale=0, elem_id="p-to-form")
                            p_export = gr.DownloadButton("Export (download)", value=None, interactive=False,
                                                         scale=0, elem_id="p-export")
                        p_status = gr.Markdown("", elem_id="p-status")
                        p_text = gr.Code(label="Preset file", language=None, lines=14, elem_id="p-text")
                    with gr.Column(scale=1):
                        gr.Markdown("### Save the Train form as a preset")
                        p_save_name = gr.Textbox(label="Name", placeholder="my-style", elem_id="p-save-name")
                        p_save_btn = gr.Button("Save current Train form", elem_id="p-save")
                        p_save_status = gr.Markdown("", elem_id="p-save-status")
                        gr.Markdown("### Import a preset file")
                        p_file = gr.File(label="Preset .toml (at most 64 KiB; checked before it is saved)",
                                         file_types=[".toml"], type="filepath", elem_id="p-file")
                        p_import_name = gr.Textbox(label="Save as (default: the file name)",
                                                   elem_id="p-import-name")
                        p_import_btn = gr.Button("Import", elem_id="p-import")
                        p_import_status = gr.Markdown("", elem_id="p-import-status")
                        gr.Markdown("### Rebuild a preset from a LoRA")
                        p_lora = gr.Dropdown(choices=lora_choices(str(ctx.default_lora_dir)), value=None,
                                             allow_custom_value=True, label="LoRA made by LoRA Studio",
                                             elem_id="p-lora")
                        p_rebuild_btn = gr.Button("Rebuild from its metadata", elem_id="p-rebuild")
                        p_rebuild_name = gr.Textbox(label="Save the rebuilt preset as",
                                                    elem_id="p-rebuild-name")
                        p_rebuild_save = gr.Button("Save rebuilt preset", elem_id="p-rebuild-save")
                        p_rebuild_status = gr.Markdown("", elem_id="p-rebuild-status")

        # ============================================================================ wiring: Dataset
        bucket_inputs = [comps["data.resolution"], comps["data.min_bucket_px"], comps["data.max_bucket_px"],
                         comps["data.bucket_step_px"], comps["data.bucket_no_upscale"], comps["data.enable_bucket"],
                         comps["train.batch_size"], comps["data.caption_extension"]]

        @guarded(6)
        def on_scan(folder, res, min_px, max_px, step, no_up, enable, batch, ext, progress=gr.Progress()):
            from datasets_tools.scan import scan_folder
            root = _check_dataset_folder(folder)
            s = _bucket_settings(res, min_px, max_px, step, no_up, enable, batch, ext)
            progress(0.0, desc="scanning ...")
            report = scan_folder(root, resolution=s["data.resolution"], min_px=s["data.min_bucket_px"],
                                 max_px=s["data.max_bucket_px"], step=s["data.bucket_step_px"],
                                 no_upscale=s["data.bucket_no_upscale"], batch_size=s["train.batch_size"],
                                 caption_extension=s["data.caption_extension"],
                                 progress=lambda d, t, *_: progress((d, max(t, 1)), desc="scanning"))
            ctx.remember_folder(str(root))
            items = _dataset_items(root, s["data.caption_extension"])
            rows = [[p.path, p.kind, p.message] for p in sorted(report.problems, key=lambda p: (p.path, p.kind))]
            usable = len(report.usable_images())
            more = f" (showing the first {MAX_GALLERY})" if len(items) > MAX_GALLERY else ""
            status = (f"Scanned `{root}`: {len(report.images)} picture(s), {usable} usable, "
                      f"{len(report.problems)} problem(s) in {report.elapsed_s:.1f} s{more}.")
            return (status, report.summary(max_files=8), _df(rows, ["file", "problem", "message"]), _gallery(items),
                    items, gr.update(choices=ctx.chosen, value=str(root)))

        ds_scan_btn.click(on_scan, [ds_folder, *bucket_inputs],
                          [ds_status, ds_summary, ds_problems, ds_gallery, ds_items, ds_folder])

        @guarded(2)
        def on_use_folder(folder):
            root = _check_dataset_folder(folder)
            return f"data.dir in the Train tab is now `{root}`.", str(root)
        ds_use_btn.click(on_use_folder, [ds_folder], [ds_status, comps["data.dir"]])

        def on_select(items, evt: gr.SelectData):
            i = evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else 0)
            if not items or i >= len(items):
                return gr.skip(), gr.skip()
            return items[i]["rel"], items[i]["caption"]
        ds_gallery.select(on_select, [ds_items], [ds_selected, ds_caption], show_progress="hidden")

        @guarded(4)
        def on_save_caption(folder, items, rel, text):
            from datasets_tools.captions import apply_caption_texts
            root = _check_dataset_folder(folder)
            match = [it for it in items if it["rel"] == rel]
            if not rel or not match:
                raise UserError("click a picture in the gallery first, then edit its caption")
            text = " ".join(str(text or "").split())
            res = apply_caption_texts(root, {Path(match[0]["caption_file"]): text}, operation=f"edit caption of {rel}")
            ext = Path(match[0]["caption_file"]).suffix
            items = _dataset_items(root, ext)
            return f"saved the caption of {rel} ({res.summary()})", _gallery(items), items, gr.skip()
        ds_save_cap.click(on_save_caption, [ds_folder, ds_items, ds_selected, ds_caption],
                          [ds_edit_status, ds_gallery, ds_items, ds_caption])

        @guarded(3)
        def on_caption(folder, name, model, template, trigger, overwrite_caps, ext, progress=gr.Progress()):
            from datasets_tools.captioners import caption_folder, check_captioner_args, get_captioner
            root = _check_dataset_folder(folder)
            ext = value_from_form(C.FIELDS["data.caption_extension"], ext)
            model = (model or "").strip() or None
            check_captioner_args(name, model)
            progress(0.0, desc=f"loading the {name} captioner ...")
            if name == "template":
                cap = get_captioner("template", template=template or "{name}", trigger=trigger or None, root=root)
            else:
                cap = get_captioner(name, model=model)
            run = caption_folder(root, cap, trigger=(trigger or "").strip() or None, overwrite=bool(overwrite_caps),
                                 caption_extension=ext,
                                 progress=lambda d, t: progress((d, max(t, 1)), desc=f"captioning ({name})",
                                                                unit="images"))
            items = _dataset_items(root, ext)
            text = run.summary()
            if run.failed:
                text += "; skipped: " + ", ".join(p.path for p in run.failed[:5])
            return text, _gallery(items), items
        cap_btn.click(on_caption, [ds_folder, cap_name, cap_model, cap_template, cap_trigger, cap_overwrite,
                                   comps["data.caption_extension"]], [cap_status, ds_gallery, ds_items])

        def caption_op(kind):
            @guarded(4)
            def run(folder, ext, prefix, find, repl, remove):
                from datasets_tools import captions as CAP
                root = _check_dataset_folder(folder)
                ext = value_from_form(C.FIELDS["data.caption_extension"], ext)
                if kind == "prefix":
                    if not (prefix or "").strip():
                        raise UserError("type the trigger word to put first")
                    res = CAP.add_prefix(root, prefix.strip(), caption_extension=ext)
                elif kind == "replace":
                    if not (find or "").strip():
                        raise UserError("type the text to find")
                    res = CAP.replace_text(root, find.strip(), (repl or "").strip(), caption_extension=ext)
                elif kind == "remove":
                    tags = [t.strip() for t in (remove or "").split(",") if t.strip()]
                    if not tags:
                        raise UserError("type the tags to remove, comma-separated")
                    res = CAP.remove_tags(root, tags, caption_extension=ext)
                elif kind == "dedupe":
                    res = CAP.dedupe_tags(root, caption_extension=ext)
                elif kind == "undo":
                    res = CAP.undo(root)
                else:
                    return (f"tag frequency of `{root}`", _tag_table(root, ext), gr.skip(), gr.skip())
                items = _dataset_items(root, ext)
                return res.summary(), _tag_table(root, ext), _gallery(items), items
            return run
        op_inputs = [ds_folder, comps["data.caption_extension"], op_prefix, op_find, op_repl, op_remove]
        op_outputs = [op_status, op_tags, ds_gallery, ds_items]
        for btn, kind in ((op_prefix_btn, "prefix"), (op_replace_btn, "replace"), (op_remove_btn, "remove"),
                          (op_dedupe_btn, "dedupe"), (op_undo_btn, "undo"), (op_stats_btn, "stats")):
            btn.click(caption_op(kind), op_inputs, op_outputs)

        @guarded(4)
        def on_preview(folder, res, min_px, max_px, step, no_up, enable, batch, ext):
            from datasets_tools.preview import bucket_preview, contact_sheet
            root = _check_dataset_folder(folder)
            s = _bucket_settings(res, min_px, max_px, step, no_up, enable, batch, ext)
            pv = bucket_preview(root, resolution=s["data.resolution"], min_px=s["data.min_bucket_px"],
                                max_px=s["data.max_bucket_px"], step=s["data.bucket_step_px"],
                                no_upscale=s["data.bucket_no_upscale"], enable_bucket=s["data.enable_bucket"],
                                batch_size=s["train.batch_size"], caption_extension=s["data.caption_extension"])
            counts = [[b, c["images"], c["samples"]] for b, c in pv.buckets.items()]
            rows = [[r.path, f"{r.width}x{r.height}", f"{r.bucket[0]}x{r.bucket[1]}" + (" (upscaled)" if r.upscaled
                                                                                       else ""),
                     ", ".join(str(round(v)) for v in r.box_in_image())] for r in pv.rows]
            sheet = None
            if pv.rows:
                _prune(ctx.work / "preview", keep=8)
                sheet = contact_sheet(pv, ctx.work / "preview" / f"contact-{int(time.time() * 1000)}.png",
                                      thumb_px=128, max_images=200)
            text = (f"{len(pv.rows)} picture(s) in {len(pv.buckets)} bucket(s) at resolution {s['data.resolution']}"
                    f" ({s['data.min_bucket_px']}-{s['data.max_bucket_px']} px, step {s['data.bucket_step_px']}).")
            if pv.warnings:
                text += "\n\n" + "\n".join(f"- {html.escape(w)}" for w in pv.warnings)
            return (text, _df(counts, ["bucket", "images", "samples per epoch"]),
                    _df(rows, ["image", "size", "bucket", "crop box (image px)"]), str(sheet) if sheet else None)
        bp_btn.click(on_preview, [ds_folder, *bucket_inputs], [bp_status, bp_counts, bp_rows, bp_sheet])

        # ============================================================================ wiring: Train
        for fi in FORM_FIELDS:
            if fi.type is bool or fi.choices is not None:
                continue

            def check_one(raw, fi=fi):
                try:
                    value_from_form(fi, raw)
                except UserError as e:
                    return gr.update(value=_error_md(_one_line(e)), visible=True)
                return gr.update(value="", visible=False)
            comps[fi.key].blur(check_one, [comps[fi.key]], [errs[fi.key]], show_progress="hidden", queue=False)

        def on_preset_load(choice, *current):
            try:
                values, note = load_preset_into_form(choice, list(current))
            except Exception as e:  # noqa: BLE001
                ue = _user_error(e)
                return (*[gr.skip()] * len(form_inputs), *[gr.skip()] * len(form_errors),
                        _error_md(_one_line(ue or e)))
            return (*values, *_error_updates({}), note)
        preset_load.click(on_preset_load, [preset_pick, *form_inputs], [*form_inputs, *form_errors, tr_form_msg])
        preset_refresh.click(lambda: gr.update(choices=_preset_choices()), None, [preset_pick])

        start_btn.click(lambda ow, *vals: _start_or_resume(False, ow, vals), [overwrite, *form_inputs],
                        [*form_errors, tr_msg], concurrency_id="train-control")
        resume_btn.click(lambda *vals: _start_or_resume(True, False, vals), form_inputs, [*form_errors, tr_msg],
                         concurrency_id="train-control")

        @guarded(1)
        def on_stop():
            return JOBS.stop()
        stop_btn.click(on_stop, None, [tr_msg], concurrency_id="train-control")

        @guarded(2, status_at=1)
        def on_preview_config(*vals):
            cfg, errors = form_to_config(vals)
            if errors:
                raise UserError(f"{len(errors)} field(s) are not valid: {next(iter(errors.values()))}")
            cfg = absolute_paths(cfg)
            run_dir = Path(cfg.output.dir) / cfg.output.name
            cmd = JOBS.display(JOBS.command_for(run_dir / "config.toml"))
            return (C.config_to_toml(cfg, header=f"Replay: {cmd}"), f"`{cmd}`")
        preview_btn.click(on_preview_config, form_inputs, [preview_code, tr_msg])

        job_outs = [job_status, job_progress, loss_plot, samples, job_log, job_cmd, start_btn, stop_btn, resume_btn,
                    seen]
        tick.tick(lambda s: job_outputs(s), [seen], job_outs, show_progress="hidden", concurrency_limit=None,
                  queue=False)

        # ============================================================================ wiring: Generate
        def on_add(path, rows, version):
            path = (path or "").strip()
            if not path:
                return gr.skip(), gr.skip(), _error_md("pick a LoRA file first (or type its path)")
            p = Path(path).expanduser()
            if not p.is_file():
                return gr.skip(), gr.skip(), _error_md(f"LoRA file not found: {path}")
            row = {"id": f"{time.time_ns()}", "path": str(p.resolve()), "weight": 1.0, "split": False, "te": 1.0,
                   "unet": 1.0}
            return rows + [row], version + 1, f"added {p.name}"
        g_add.click(on_add, [g_pick, g_rows, g_rows_version], [g_rows, g_rows_version, g_status])

        def on_refresh(lora_dir):
            choices = lora_choices(lora_dir)
            return gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=_model_choices())
        g_refresh.click(on_refresh, [g_lora_dir], [g_pick, p_lora, g_base])
        generate_tab.select(on_refresh, [g_lora_dir], [g_pick, p_lora, g_base], show_progress="hidden")

        gen_inputs = [g_base, g_lora_dir, g_prompt, g_negative, g_seed, g_steps, g_cfg, g_width, g_height,
                      g_sampler, g_batch, g_fused, g_rows]

        @guarded(4)
        def on_generate(base, lora_dir, prompt, negative, seed, steps, cfg_scale, width, height, sampler, batch,
                        fused, rows, progress=gr.Progress()):
            kw = _gen_kwargs(steps, cfg_scale, width, height, sampler)
            batch = int(batch or 1)
            if not 1 <= batch <= 16:
                raise UserError("images: 1 to 16 per click")
            with GEN.lock:
                gen, note = GEN.get(base, progress, lora_dir)
                gen.set_loras(_specs(rows), mode="fused" if fused else "unfused")
                seed = int(seed) if seed is not None and int(seed) >= 0 else random.randrange(2**31)
                images = gen.generate(prompt or "", negative or "", seed=seed, batch_size=batch,
                                      on_step=lambda i, n: progress((i, n), desc="denoising", unit="steps"), **kw)
            items, params = [], []
            for i, img in enumerate(images):
                path = _save_generated(img, f"{seed + i}")
                p = img.info.get("parameters", "")
                items.append((path, p))
                params.append(p)
            loras = ", ".join(f"{Path(r['path']).stem} {r['weight']:g}" for r in rows) or "no LoRA"
            status = (f"{len(images)} image(s), seed {seed}, {loras} ({'fused' if fused else 'adapters'}); {note}. "
                      f"Saved in {_rel(Path(items[0][0]).parent, ctx.root)}.")
            return status, items, params[0] if params else "", params
        g_go.click(on_generate, gen_inputs, [g_status, g_gallery, g_params, g_params_list], concurrency_id="gen")

        @guarded(4)
        def on_grid(base, lora_dir, prompt, negative, seed, steps, cfg_scale, width, height, sampler, batch, fused,
                    rows, weights_text, seeds_text, progress=gr.Progress()):
            kw = _gen_kwargs(steps, cfg_scale, width, height, sampler)
            if not rows:
                raise UserError("add a LoRA first: the grid varies the first LoRA's weight")
            weights = _numbers(weights_text, "grid weights")
            seeds = _numbers(seeds_text, "grid seeds", int)
            if len(weights) * len(seeds) > 100:
                raise UserError(f"grid: {len(weights) * len(seeds)} images is too many (at most 100)")
            specs = _specs(rows)
            with GEN.lock:
                gen, note = GEN.get(base, progress, lora_dir)
                gen.set_loras(specs[1:], mode="fused" if fused else "unfused")
                progress(0.0, desc=f"grid of {len(weights) * len(seeds)} images ...")
                res = gen.grid_weight_seed(specs[0], weights, seeds, prompt or "", negative or "", **kw)
            path = _save_generated(res.image, "grid")
            status = (f"grid: {len(res.row_labels)} seeds x {len(res.col_labels)} weights of "
                      f"{Path(rows[0]['path']).stem}; {note}. Saved as {_rel(path, ctx.root)}.")
            return status, gr.update(value=[(path, res.parameters)], selected_index=0), res.parameters, \
                [res.parameters]
        g_grid.click(on_grid, [*gen_inputs, g_grid_weights, g_grid_seeds],
                     [g_status, g_gallery, g_params, g_params_list], concurrency_id="gen")

        def on_gen_select(params, evt: gr.SelectData):
            i = evt.index if isinstance(evt.index, int) else 0
            return params[i] if params and i < len(params) else gr.skip()
        g_gallery.select(on_gen_select, [g_params_list], [g_params], show_progress="hidden")

        # ============================================================================ wiring: Presets
        def presets_refresh():
            names = _preset_names()
            return _presets_frame(), gr.update(choices=names), gr.update(choices=_preset_choices())
        p_refresh.click(presets_refresh, None, [p_table, p_pick, preset_pick])
        presets_tab.select(presets_refresh, None, [p_table, p_pick, preset_pick], show_progress="hidden")

        @guarded(3, status_at=2)
        def on_pick(name):
            from trainer.config.presets import resolve_preset
            if not name:
                return "", gr.update(value=None, interactive=False), ""
            path = resolve_preset(name)
            text = path.read_text(encoding="utf-8")
            export = ctx.work / "exports" / f"{name}.toml"
            export.write_text(text, encoding="utf-8")
            return text, gr.update(value=str(export), interactive=True), f"preset '{name}' ({_rel(path, ctx.root)})"
        p_pick.change(on_pick, [p_pick], [p_text, p_export, p_status])

        def on_to_form(name, *current):
            try:
                values, note = load_preset_into_form(f"preset:{name}" if name else "", list(current))
            except Exception as e:  # noqa: BLE001
                return (*[gr.skip()] * (len(form_inputs) + len(form_errors)), _error_md(_one_line(_user_error(e)
                                                                                                  or e)))
            return (*values, *_error_updates({}), note + "; see the Train tab")
        p_to_form.click(on_to_form, [p_pick, *form_inputs], [*form_inputs, *form_errors, p_status])

        @guarded(4, status_at=0)
        def on_save_preset(name, *vals):
            from trainer.config.presets import save_user_preset
            name = (name or "").strip()
            if not name:
                raise UserError("type a name for the preset")
            cfg, errors = form_to_config(vals)
            if errors:
                raise UserError(f"the Train form has {len(errors)} invalid field(s); first: "
                                f"{next(iter(errors.values()))}")
            path = save_user_preset(name, cfg, f"User preset '{name}', saved from the web app's Train form.")
            return (f"saved preset '{name}' to {path}", _presets_frame(),
                    gr.update(choices=_preset_names(), value=name), gr.update(choices=_preset_choices()))
        p_save_btn.click(on_save_preset, [p_save_name, *form_inputs], [p_save_status, p_table, p_pick, preset_pick])

        @guarded(5, status_at=0)
        def on_import(file, name):
            from trainer.config.presets import _summary, save_user_preset, validate_preset_text
            if not file:
                raise UserError("choose a preset file to import first")
            path = Path(file)
            with open(path, "rb") as fh:
                data = fh.read(C.MAX_PRESET_BYTES + 1)
            if len(data) > C.MAX_PRESET_BYTES:
                raise UserError(f"{path.name} is larger than {C.MAX_PRESET_BYTES // 1024} KiB; not a LoRA Studio "
                                "preset (refused)")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path.name} is not UTF-8 text; not a LoRA Studio preset (refused)") from None
            cfg = validate_preset_text(text, path.name, allowed_roots=ctx.preset_roots())
            stem = re.sub(r"[^\w.-]", "-", (name or "").strip() or path.stem)[:64].strip(".-") or "imported"
            saved = save_user_preset(stem, cfg, _summary(text) or f"Imported from {path.name}")
            return (f"imported '{stem}' (checked: keys, types, ranges, paths) -> {saved}", _presets_frame(),
                    gr.update(choices=_preset_names(), value=stem), gr.update(choices=_preset_choices()), None)
        p_import_btn.click(on_import, [p_file, p_import_name], [p_import_status, p_table, p_pick, preset_pick,
                                                                p_file])

        @guarded(2, status_at=1)
        def on_rebuild(lora):
            from trainer.config.presets import preset_from_lora
            if not (lora or "").strip():
                raise UserError("pick a LoRA file first (or type its path)")
            text = preset_from_lora(_resolve(lora.strip()))
            return text, f"rebuilt from the metadata of {Path(lora).name}; save it under a name below"
        p_rebuild_btn.click(on_rebuild, [p_lora], [p_text, p_rebuild_status])

        @guarded(4, status_at=0)
        def on_rebuild_save(lora, name):
            from trainer.config.presets import preset_from_lora, save_user_preset, validate_preset_text
            if not (lora or "").strip():
                raise UserError("pick a LoRA file first (or type its path)")
            text = preset_from_lora(_resolve(lora.strip()))
            cfg = validate_preset_text(text, Path(lora).name)
            name = (name or "").strip() or Path(lora).stem
            saved = save_user_preset(name, cfg, f"Rebuilt from {Path(lora).name} (its embedded training config).")
            return (f"saved preset '{name}' -> {saved}", _presets_frame(),
                    gr.update(choices=_preset_names(), value=name), gr.update(choices=_preset_choices()))
        p_rebuild_save.click(on_rebuild_save, [p_lora, p_rebuild_name],
                             [p_rebuild_status, p_table, p_pick, preset_pick])

        # ============================================================================ wiring: demo and page load
        demo_targets = [demo_banner, ds_folder, g_base, g_width, g_height, g_steps, g_prompt, preset_pick,
                        *form_inputs]

        def demo_fill() -> tuple:
            info = _DEMO["info"]
            from trainer.config import load_config
            from trainer.config.presets import resolve_preset
            cfg = load_config(resolve_preset(info.preset))
            prompt = cfg.sample.prompts[0] if cfg.sample.prompts else ""  # the demo's first sample prompt
            return (gr.update(value=_demo_banner(), visible=True),
                    gr.update(choices=ctx.chosen, value=info.images),
                    gr.update(choices=_model_choices(), value=info.model), 64, 64, 12, prompt,
                    gr.update(choices=_preset_choices(), value=f"preset:{info.preset}"), *config_to_form(cfg))

        def on_demo_click(progress=gr.Progress()):
            try:
                build_demo(lambda text: progress(0.5, desc=text))
            except Exception as e:  # noqa: BLE001
                return (gr.update(value=_error_md(f"the demo could not be created: {_one_line(e)}"), visible=True),
                        *[gr.skip()] * (len(demo_targets) - 1))
            return demo_fill()
        demo_btn.click(on_demo_click, None, demo_targets, concurrency_id="demo")

        def on_demo_poll():
            if _DEMO["status"] == "building":
                return (gr.update(value=_demo_banner(), visible=True), *[gr.skip()] * (len(demo_targets) - 1),
                        gr.Timer(active=True))
            if _DEMO["status"] == "ready":
                return (*demo_fill(), gr.Timer(active=False))
            return (gr.update(value=_demo_banner(), visible=_DEMO["status"] != "none"),
                    *[gr.skip()] * (len(demo_targets) - 1), gr.Timer(active=False))
        demo_poll.tick(on_demo_poll, None, [*demo_targets, demo_poll], show_progress="hidden")

        def on_load():
            """A (re)loaded page: re-attach to the training job (its settings fill the form), show the demo."""
            job = JOBS.job
            out: list = [gr.skip()] * len(demo_targets)
            timer = gr.Timer(active=_DEMO["status"] == "building")
            filled = _DEMO["status"] == "ready" and ctx.demo_requested
            if filled:
                out = list(demo_fill())
            elif _DEMO["status"] != "none":
                out[0] = gr.update(value=_demo_banner(), visible=True)
            if job is not None and job.config_path.is_file():
                try:
                    cfg = C.load_config(job.config_path)
                except UserError:
                    cfg = None
                if cfg is not None:
                    out[len(demo_targets) - len(form_inputs):] = config_to_form(cfg)
                    if not filled:  # Generate starts from the model being trained
                        out[2] = gr.update(value=cfg.model.base)
            shown = job_outputs({}, force=True)
            return (*out, timer, shown[-1], *shown[:-1])
        app.load(on_load, None, [*demo_targets, demo_poll, seen, *job_outs[:-1]])
    return app


def _prune(folder: Path, keep: int) -> None:
    files = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime)
    for f in files[:-keep] if keep else files:
        f.unlink(missing_ok=True)


def _model_choices() -> list[str]:
    """Base models the app knows of: the demo model and model folders/files under <root>/models."""
    ctx = _ctx()
    out = []
    info = _DEMO.get("info")
    if info is not None:
        out.append(info.model)
    models = ctx.root / "models"
    if models.is_dir():
        for p in sorted(models.iterdir()):
            if (p / "model_index.json").is_file() or p.suffix in (".safetensors", ".ckpt"):
                out.append(str(p))
    return out


def _preset_names() -> list[str]:
    from trainer.config.presets import list_presets
    seen, out = set(), []
    for p in reversed(list_presets()):  # a user preset shadows a shipped one of the same name
        if p.name not in seen:
            seen.add(p.name)
            out.append(p.name)
    return sorted(out)


def _presets_frame():
    from trainer.config.presets import list_presets
    return _df([[p.name, p.source, p.summary] for p in list_presets()], ["name", "source", "summary"])


# ------------------------------------------------------------------------------------------------ launch


def launch(root: str | Path = ".", *, listen: bool = False, port: int = 7860, auth: tuple[str, str] | None = None,
           demo: bool = False, block: bool = True, quiet: bool = False):
    """Serve the app: 127.0.0.1 unless listen; files only from the app's own folders; optional password."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # relative paths in forms and presets mean "in the root", for the app and the trainer alike
    ctx = AppContext(root, demo_requested=demo)
    app = build_app(ctx)
    if demo and _DEMO["status"] != "ready":
        _DEMO.update(status="building", message="starting ...")
        threading.Thread(target=_build_demo_quietly, name="lorastudio-demo", daemon=True).start()
    return app.launch(server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, auth=auth,
                      allowed_paths=ctx.served_paths(), max_file_size=MAX_UPLOAD, show_error=False,
                      prevent_thread_lock=not block, quiet=quiet, ssr_mode=False, pwa=False, mcp_server=False,
                      enable_monitoring=False, inbrowser=False, css=CSS,
                      footer_links=["gradio", "settings"])


def _build_demo_quietly() -> None:
    try:
        _DEMO["status"] = "none"
        build_demo()
    except Exception:  # noqa: BLE001 - shown in the banner
        pass
