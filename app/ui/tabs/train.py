"""The Train tab: the config form generated from the schema, checks before Start, and the live training job.

The form is ``trainer.config.FIELDS`` through ``app.ui.form`` (the words users know first, the key beside them),
checked with the schema's own rules as the user types. Start writes the resolved config and runs the headless
trainer (``app.ui.jobs``); a one-second timer shows its progress, loss, samples and log, and says when a job
ends (``train.finished``) so the Generate tab can offer the new LoRA at once.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

import gradio as gr

from trainer import config as C
from trainer.common.names import looks_like_hub_id
from trainer.errors import UserError, first_line

from app.ui.form import (ADVANCED_FIELDS, BASIC_FIELDS, FORM_FIELDS, KEEP_ON_PRESET, config_control, config_to_form,
                         error_md, error_updates, form_to_config, guarded, resolve, value_from_form)
from app.ui.jobs import MAX_PROCESSES, MIN_PROCESSES, JobView, format_duration
from app.ui.registry import Registry
from app.ui.state import AppState, rel

ENDED = ("completed", "stopped", "failed")


# ------------------------------------------------------------------------------------------------ checks


def check_before_start(cfg: C.Config) -> dict[str, str]:
    """What would make the trainer refuse at once, found before anything starts: {key: one-line error}."""
    errors: dict[str, str] = {}
    try:
        C.validate_for_training(cfg)
    except UserError as e:
        errors[e.field or "output.name"] = first_line(e)
    base = cfg.model.base
    if base and not Path(base).expanduser().exists() and not looks_like_hub_id(base):
        errors["model.base"] = (f"model.base: {base} not found; give a diffusers folder, a .safetensors "
                                "checkpoint or a hub id (org/name)")
    for key, value in (("data.dir", cfg.data.dir), ("data.reg_dir", cfg.data.reg_dir)):
        if value and not Path(value).expanduser().is_dir():
            errors.setdefault(key, f"{key}: folder not found: {value}")
    if cfg.model.vae and not Path(cfg.model.vae).expanduser().exists() and not looks_like_hub_id(cfg.model.vae):
        errors["model.vae"] = f"model.vae: {cfg.model.vae} not found"
    return errors


def absolute_paths(cfg: C.Config) -> C.Config:
    """Relative paths made absolute (against the app's root), so the run's config.toml replays from any folder."""
    for fi in C.FIELDS.values():
        if not fi.path:
            continue
        section = getattr(cfg, fi.section)
        value = getattr(section, fi.name)
        if value and not (fi.key in ("model.base", "model.vae") and looks_like_hub_id(value)):
            setattr(section, fi.name, str(resolve(value)))
    return cfg


def load_preset_into_form(state: AppState, choice: str, current: list) -> tuple[list, str]:
    """Form values for a preset (defaults + the preset; the user's paths kept when it sets none) or a run's config."""
    from trainer.config.presets import resolve_preset
    if not choice:
        raise UserError("choose a preset or an earlier run first")
    kind, _, name = choice.partition(":")
    if kind == "run":
        path = state.outputs / name / "config.toml"
        cfg = C.load_config(path)
        return config_to_form(cfg), f"loaded the settings of run '{name}' ({rel(path, state.root)})"
    path = resolve_preset(name)
    data = C.read_toml(path)
    cfg = C.load_config(path)
    values = config_to_form(cfg)
    kept = []
    for i, fi in enumerate(FORM_FIELDS):
        set_by_preset = isinstance(data.get(fi.section), dict) and fi.name in data[fi.section]
        if fi.key in KEEP_ON_PRESET and not set_by_preset and current and current[i] not in ("", None):
            values[i] = current[i]
            kept.append(fi.key)
    note = f"; kept your {', '.join(kept)}" if kept else ""
    return values, f"loaded preset '{name}' over the defaults{note}"


def samples_note(every_raw: Any, max_steps_raw: Any, every_epochs_raw: Any = 0) -> str:
    """When the first training sample will come, from the form's sample.every_steps / every_epochs and
    train.max_steps."""
    try:
        every = value_from_form(C.FIELDS["sample.every_steps"], every_raw)
    except UserError:
        return "Samples: sample.every_steps is not a valid number."
    try:
        epochs = value_from_form(C.FIELDS["sample.every_epochs"], every_epochs_raw)
    except UserError:
        return "Samples: sample.every_epochs is not a valid number."
    by_epoch = f"at the end of every {epochs} epoch(s)" if epochs else ""
    if not every:
        if by_epoch:
            return f"Samples {by_epoch}, and after the last step."
        return ("Samples are off (Sample every N steps · sample.every_steps and Sample every N epochs · "
                "sample.every_epochs are 0).")
    try:
        max_steps = value_from_form(C.FIELDS["train.max_steps"], max_steps_raw)
    except UserError:
        max_steps = None
    if max_steps is not None and every > max_steps:
        return (f"Samples are off for this run: every {every} steps is after the last step ({max_steps}); "
                "lower sample.every_steps.")
    return f"First sample at step {every} (every {every} steps)" + (f"; also {by_epoch}." if by_epoch else ".")


#: Side of one picture in a save's sample grid (the Train tab shows many saves; full size is one click away in
#: the run's samples/ folder).
GRID_CELL_PX = 256


def _sample_step(path: str, caption: str) -> int | None:
    """The step of a training sample: from its file name (stepNNNNNNNN-II.png), else its caption ("step N: ...")."""
    import re
    m = re.match(r"step(\d+)-", Path(path).name) or re.match(r"step (\d+):", caption)
    return int(m.group(1)) if m else None


def sample_grids(samples: list[tuple[str, str]]) -> list[tuple[Any, str]]:
    """The gallery: one picture per save (the prompts of that step side by side), newest save first.

    ``samples`` are (png path, "step N: prompt") in the order the run wrote them."""
    groups: dict[Any, list[tuple[str, str]]] = {}
    for path, caption in samples:
        step = _sample_step(path, caption)
        groups.setdefault(step if step is not None else path, []).append((path, caption))
    out = []
    for key, items in reversed(list(groups.items())):
        items = [(p, c) for p, c in items if Path(p).is_file()]
        if not items:
            continue
        files = tuple((p, Path(p).stat().st_mtime_ns) for p, _ in items)
        label = f"step {key}" if isinstance(key, int) else Path(str(key)).name
        out.append((_grid(files, tuple(c.split(": ", 1)[-1] for _, c in items), label),
                    f"{label} · {len(items)} sample(s)"))
    return out


@functools.lru_cache(maxsize=64)
def _grid(files: tuple[tuple[str, int], ...], prompts: tuple[str, ...], label: str):
    """One save's samples in a row, each fitted into a GRID_CELL_PX square, the prompts above them (made once per
    set of files: the key holds each file's mtime)."""
    from PIL import Image

    from trainer.generate.engine import make_grid
    cells = []
    for p, _ in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((GRID_CELL_PX, GRID_CELL_PX))
            cell = Image.new("RGB", (GRID_CELL_PX, GRID_CELL_PX), "white")
            cell.paste(im, ((GRID_CELL_PX - im.width) // 2, (GRID_CELL_PX - im.height) // 2))
            cells.append(cell)
    return make_grid([cells], [label], list(prompts))


# ------------------------------------------------------------------------------------------------ job view


def progress_html(v: JobView) -> str:
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


def status_md(v: JobView) -> str:
    if v.state == "idle":
        return "No training job yet. Fill in the form (or load a preset) and press **Start**."
    title = {"starting": "Starting", "running": "Training", "stopping": "Stopping", "completed": "Finished",
             "stopped": "Stopped", "failed": "Failed"}[v.state]
    lines = [f"**{title}: run `{v.name}`** ({html.escape(v.run_dir)})", "", html.escape(v.message)]
    if v.state == "failed":
        if v.returncode is not None:
            lines += ["", f"**Exit code {v.returncode}**: {html.escape(v.error)}"]
        lines += ["", "The web app is fine; fix the cause and press Start or Resume. The last log lines are below."]
    if v.state == "completed":
        lines += ["", "The LoRA is in the Generate tab's list."]
    if v.checkpoint:
        lines += ["", f"Last checkpoint: {html.escape(v.checkpoint)}"]
    if v.warnings:
        lines += ["", "Warnings:"] + [f"- {html.escape(w)}" for w in v.warnings[-5:]]
    return "\n".join(lines)


def loss_frame(v: JobView):
    import pandas as pd
    # one line per series: the training loss and, with a validation set, the validation loss beside it
    pts = [(s, loss, "train") for s, loss in v.loss_points]
    pts += [(s, loss, "validation") for s, loss in v.validation_points]
    return pd.DataFrame({"step": [p[0] for p in pts], "loss": [p[1] for p in pts], "series": [p[2] for p in pts]})


def buttons(v: JobView) -> tuple:
    active = v.active
    stop_label = "Stop now (no checkpoint)" if v.state == "stopping" else "Stop (saves a checkpoint)"
    return (gr.update(interactive=not active), gr.update(interactive=active, value=stop_label),
            gr.update(interactive=not active))


JOB_OUTPUT_KEYS = ("train.status", "train.progress", "train.loss", "train.samples", "train.log", "train.command",
                   "train.start", "train.stop", "train.resume", "train.finished", "train.seen")


def job_outputs(state: AppState, seen: dict | None, finished: int = 0, force: bool = False) -> tuple:
    """Tick: what changed since this page last looked (everything skipped when nothing did), JOB_OUTPUT_KEYS order.

    ``train.finished`` counts the jobs this page saw end; the Generate tab refreshes its LoRA list when it changes."""
    v = state.jobs.view()
    seen = dict(seen or {})
    if not force and seen.get("version") == v.version and seen.get("state") == v.state:
        return tuple([gr.skip()] * len(JOB_OUTPUT_KEYS))
    points = len(v.loss_points) + len(v.validation_points)
    plot = loss_frame(v) if force or seen.get("points") != points else gr.skip()
    samples = [(p, c) for p, c in v.samples if Path(p).is_file()]
    gallery = sample_grids(samples) if force or seen.get("samples") != len(samples) else gr.skip()
    ended_now = v.state in ENDED and seen.get("state") not in (None, *ENDED)
    new_seen = {"version": v.version, "state": v.state, "points": points, "samples": len(samples)}
    return (status_md(v), progress_html(v), plot, gallery, "\n".join(v.log_tail) or "(no log yet)",
            v.command or "", *buttons(v), (finished or 0) + 1 if ended_now else gr.skip(), new_seen)


def _processes(raw: Any) -> int:
    """The processes (GPUs) box: a whole number from MIN_PROCESSES to MAX_PROCESSES, or a UserError."""
    try:
        f = float(raw)
    except (TypeError, ValueError):
        f = 0.5
    if not (f.is_integer() and MIN_PROCESSES <= f <= MAX_PROCESSES):
        raise UserError(f"processes (GPUs): {raw!r} is not a whole number from {MIN_PROCESSES} to {MAX_PROCESSES}")
    return int(f)


def start_or_resume(state: AppState, resume: bool, overwrite: bool, values, processes: Any = 1) -> tuple:
    try:
        n_proc = _processes(processes)
    except UserError as e:
        return (*error_updates({}), gr.update(value=error_md(first_line(e)), visible=True))
    cfg, errors = form_to_config(values)
    if not errors:
        errors = check_before_start(cfg)
    if errors:
        first = next(iter(errors.values()))
        msg = error_md(f"{len(errors)} field(s) need attention before training can start (marked below); "
                       f"first: {first}")
        return (*error_updates(errors), gr.update(value=msg, visible=True))
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.output.dir) / cfg.output.name
    config_path = run_dir / "config.toml"
    text = C.config_to_toml(cfg, header=f"Resolved LoRA Studio config of run '{cfg.output.name}' (from the web app)."
                                        f"\nReplay: python -m trainer --config {config_path}")
    try:
        job = state.jobs.start(run_dir, text, resume=resume, overwrite=overwrite and not resume, cwd=state.root,
                               processes=n_proc)
    except UserError as e:
        errs = {e.field: first_line(e)} if e.field in C.FIELDS else {}
        return (*error_updates(errs), gr.update(value=error_md(first_line(e)), visible=True))
    what = "resuming" if resume else "started"
    return (*error_updates({}), gr.update(value=f"{what} run '{job.name}': `{job.display_command}`", visible=True))


# ------------------------------------------------------------------------------------------------ the tab


def form_inputs(reg: Registry) -> list:
    """The Train form's controls in FORM_FIELDS order (what form_to_config reads)."""
    return reg.many(f"train.{fi.key}" for fi in FORM_FIELDS)


def form_errors(reg: Registry) -> list:
    return reg.many(f"train.error.{fi.key}" for fi in FORM_FIELDS)


def create_train_tab(state: AppState, reg: Registry) -> None:
    r = reg.add
    with gr.Row(equal_height=False):
        preset_pick = r("train.preset", gr.Dropdown(choices=state.preset_choices(), value=None,
                                                    label="Preset or earlier run", scale=4, elem_id="tr-preset"))
        preset_load = gr.Button("Load into the form", size="md", scale=0, elem_id="tr-preset-load")
        preset_refresh = gr.Button("↻", size="md", scale=0, min_width=40, elem_id="tr-preset-refresh")
    form_msg = r("train.form_msg", gr.Markdown("", elem_id="tr-form-msg"))

    def add_fields(fields):
        for i in range(0, len(fields), 3):
            with gr.Row():
                for fi in fields[i:i + 3]:
                    with gr.Column(min_width=220):
                        r(f"train.{fi.key}", config_control(fi))
                        r(f"train.error.{fi.key}", gr.Markdown("", visible=False, elem_classes="ls-error",
                                                               elem_id=f"err-{fi.section}-{fi.name}"))
    gr.Markdown("### Basic settings")
    add_fields(BASIC_FIELDS)
    with gr.Accordion("Advanced", open=False, elem_id="tr-advanced"):
        for section, cls in C.SECTIONS.items():
            fields = [fi for fi in ADVANCED_FIELDS if fi.section == section]
            if fields:
                gr.Markdown(f"#### [{section}] {cls.__doc__ or ''}")
                add_fields(fields)
    inputs, errors = form_inputs(reg), form_errors(reg)
    with gr.Row(equal_height=False):
        start_btn = r("train.start", gr.Button("Start", variant="primary", elem_id="tr-start"))
        stop_btn = r("train.stop", gr.Button("Stop (saves a checkpoint)", variant="stop", interactive=False,
                                             elem_id="tr-stop"))
        resume_btn = r("train.resume", gr.Button("Resume", elem_id="tr-resume"))
        overwrite = r("train.overwrite", gr.Checkbox(label="overwrite: start over in a run folder that has "
                                                           "checkpoints", elem_id="tr-overwrite"))
        processes = r("train.processes", gr.Number(
            MIN_PROCESSES, precision=0, minimum=MIN_PROCESSES, maximum=MAX_PROCESSES, label="Processes (GPUs)", elem_id="tr-processes",
            info="More than one: the run starts under `accelerate launch --num_processes N` (one process per "
                 "GPU); Stop and Resume work the same"))
    msg = r("train.msg", gr.Markdown("", elem_id="tr-msg"))
    idle = JobView()
    r("train.status", gr.Markdown(status_md(idle), elem_id="tr-status"))
    r("train.progress", gr.HTML(progress_html(idle), elem_id="tr-progress"))
    with gr.Row():
        r("train.loss", gr.LinePlot(loss_frame(idle), x="step", y="loss", color="series", title="Loss", height=260,
                                    elem_id="tr-loss", scale=1))
        with gr.Column(scale=1):
            note = r("train.samples_note", gr.Markdown(
                samples_note(C.FIELDS["sample.every_steps"].default, C.FIELDS["train.max_steps"].default,
                             C.FIELDS["sample.every_epochs"].default), elem_id="tr-samples-note"))
            r("train.samples", gr.Gallery(label="Samples: one grid per save, newest first", columns=1, height=260,
                                          object_fit="contain", elem_id="tr-samples"))
    r("train.log", gr.Code(label="Log (last lines of <run>/train.log)", language=None, lines=10, max_lines=14,
                           elem_id="tr-log", value="(no log yet)"))
    r("train.command", gr.Code(label="The same run from a shell", language="shell", lines=1,
                               elem_id="tr-command"))
    with gr.Accordion("Resolved config (what Start writes to <run>/config.toml)", open=False):
        preview_btn = gr.Button("Show config and command", elem_id="tr-preview")
        preview_code = r("train.preview", gr.Code(language=None, lines=12, elem_id="tr-preview-code"))
    tick = r("train.tick", gr.Timer(1.0))
    seen = r("train.seen", gr.State({}))
    # a hidden number, not a gr.State: the Generate tab listens to its change, and a State updated by a non-queued
    # event (this tick) does not fire one
    finished = r("train.finished", gr.Number(0, precision=0, visible="hidden", interactive=False,
                                             elem_id="tr-finished"))

    # ---- wiring
    for fi in FORM_FIELDS:
        if fi.type is bool or fi.choices is not None:
            continue

        def check_one(raw, fi=fi):
            try:
                value_from_form(fi, raw)
            except UserError as e:
                return gr.update(value=error_md(first_line(e)), visible=True)
            return gr.update(value="", visible=False)
        reg.get(f"train.{fi.key}").blur(check_one, [reg.get(f"train.{fi.key}")], [reg.get(f"train.error.{fi.key}")],
                                        show_progress="hidden", queue=False)

    every, max_steps = reg.get("train.sample.every_steps"), reg.get("train.train.max_steps")
    every_epochs = reg.get("train.sample.every_epochs")
    for comp in (every, max_steps, every_epochs):
        comp.change(samples_note, [every, max_steps, every_epochs], [note], show_progress="hidden", queue=False)

    def on_preset_load(choice, *current):
        try:
            values, text = load_preset_into_form(state, choice, list(current))
        except UserError as e:
            return (*[gr.skip()] * (len(inputs) + len(errors)), error_md(first_line(e)))
        return (*values, *error_updates({}), text)
    preset_load.click(on_preset_load, [preset_pick, *inputs], [*inputs, *errors, form_msg])
    preset_refresh.click(lambda: gr.update(choices=state.preset_choices()), None, [preset_pick])

    start_btn.click(lambda ow, n, *vals: start_or_resume(state, False, ow, vals, n), [overwrite, processes, *inputs],
                    [*errors, msg], concurrency_id="train-control")
    resume_btn.click(lambda n, *vals: start_or_resume(state, True, False, vals, n), [processes, *inputs],
                     [*errors, msg], concurrency_id="train-control")

    @guarded(1)
    def on_stop():
        return state.jobs.stop()
    stop_btn.click(on_stop, None, [msg], concurrency_id="train-control")

    @guarded(2, status_at=1)
    def on_preview_config(n, *vals):
        n = _processes(n)
        cfg, errs = form_to_config(vals)
        if errs:
            raise UserError(f"{len(errs)} field(s) are not valid: {next(iter(errs.values()))}")
        cfg = absolute_paths(cfg)
        run_dir = Path(cfg.output.dir) / cfg.output.name
        cmd = state.jobs.display(state.jobs.command_for(run_dir / "config.toml", processes=n))
        return (C.config_to_toml(cfg, header=f"Replay: {cmd}"), f"`{cmd}`")
    preview_btn.click(on_preview_config, [processes, *inputs], [preview_code, msg])

    tick.tick(lambda s, n: job_outputs(state, s, n), [seen, finished], reg.many(JOB_OUTPUT_KEYS),
              show_progress="hidden", concurrency_limit=None, queue=False)

