"""The page around the tabs: title, the demo button and banner, and what a (re)loaded page shows.

These reach into every tab (the demo fills the Dataset folder, the Train form, the Generate settings and the
Train tab's preset picker; a reloaded page re-attaches to the running training job), so they are wired through
the registry once all tabs exist.
"""

from __future__ import annotations

import html

import gradio as gr

from trainer import config as C
from trainer.errors import UserError, first_line

from app.demo import DEMO_STYLE_HELP, DEMO_STYLES, style_help
from app.ui.form import config_to_form, error_md
from app.ui.registry import Registry
from app.ui.state import AppState
from app.ui.tabs.train import JOB_OUTPUT_KEYS, form_inputs, job_outputs

DEMO_STEPS = 12  # the Generate tab's steps for the demo's 64 px model


def demo_banner(state: AppState, note: str = "") -> str:
    d = state.demo
    if d.status == "ready":
        info = d.info
        lead = f"{note}  \n" if note else ""
        return (f"{lead}**{html.escape(info.label)}**  \nStyle: **{html.escape(info.style)}** "
                f"({html.escape(DEMO_STYLE_HELP.get(info.style, info.style))}) · pictures: `{info.images}` · "
                f"model: `{info.model}` · the "
                "Train form holds the `demo` preset. Walk through: Dataset → Scan, Caption (template), Bucket "
                "preview; Train → Start; Generate with the trained LoRA.")
    if d.status == "building":
        return f"**Creating the demo** ... {html.escape(d.message)}"
    if d.status == "failed":
        return error_md(f"the demo could not be created: {d.message}")
    return ""


def create_header(state: AppState, reg: Registry) -> None:
    r = reg.add
    with gr.Row(equal_height=False):
        gr.Markdown("# LoRA Studio\nCaption, bucket, train and mix Stable Diffusion LoRAs. "
                    f"Root: `{state.root}`", elem_id="title")
        with gr.Column(scale=0, min_width=420):
            r("page.demo_style", gr.Dropdown(
                [(style_help(s), s) for s in DEMO_STYLES], value=state.demo_style, label="Demo style",
                info="the style the demo's pictures are drawn in; the demo trains it with the trigger word",
                elem_id="demo-style"))
            r("page.demo_button", gr.Button("Create the demo (tiny model + drawn pictures)", size="md",
                                            min_width=420, elem_id="demo-btn"))
    r("page.demo_banner", gr.Markdown(demo_banner(state), elem_id="demo-banner", elem_classes="ls-banner",
                                      visible=state.demo.status != "none"))
    r("page.demo_poll", gr.Timer(1.0, active=False))


def wire_page(state: AppState, reg: Registry, app: gr.Blocks) -> None:
    """The demo and page-load events (call once every tab is built)."""
    banner, poll = reg.get("page.demo_banner"), reg.get("page.demo_poll")
    inputs = form_inputs(reg)
    targets = [banner, *reg.many(("dataset.folder", "generate.base", "generate.width", "generate.height",
                                  "generate.steps", "generate.prompt", "train.preset", "page.demo_style")),
               *inputs]
    base_at, style_at = 2, len(targets) - len(inputs) - 1  # generate.base; page.demo_style

    def demo_fill(note: str = "") -> tuple:
        info = state.demo.info
        from trainer.config.presets import resolve_preset
        cfg = C.load_config(resolve_preset(info.preset))
        prompt = cfg.sample.prompts[0] if cfg.sample.prompts else ""  # the demo's first sample prompt
        return (gr.update(value=demo_banner(state, note), visible=True),
                gr.update(choices=state.chosen, value=info.images),
                gr.update(choices=state.model_choices(), value=info.model), cfg.data.resolution,
                cfg.data.resolution, DEMO_STEPS, prompt,
                gr.update(choices=state.preset_choices(), value=f"preset:{info.preset}"), info.style,
                *config_to_form(cfg))

    def on_demo_click(style, progress=gr.Progress()):
        try:
            made = state.build_demo(lambda text: progress(0.5, desc=text), style=style)
        except Exception as e:  # noqa: BLE001 - one line in the banner (the server log has the rest)
            return (gr.update(value=error_md(f"the demo could not be created: {first_line(e)}"), visible=True),
                    *[gr.skip()] * (len(targets) - 1))
        note = "" if made else (f"The demo already exists in `{state.root / 'demo'}` in the '{style}' style: the "
                                "forms are filled with it again (your edits to them are replaced).")
        return demo_fill(note)
    reg.get("page.demo_button").click(on_demo_click, reg.get("page.demo_style"), targets, concurrency_id="demo")

    def on_demo_poll():
        status = state.demo.status
        if status == "building":
            return (gr.update(value=demo_banner(state), visible=True), *[gr.skip()] * (len(targets) - 1),
                    gr.Timer(active=True))
        if status == "ready":
            return (*demo_fill(), gr.Timer(active=False))
        return (gr.update(value=demo_banner(state), visible=status != "none"), *[gr.skip()] * (len(targets) - 1),
                gr.Timer(active=False))
    poll.tick(on_demo_poll, None, [*targets, poll], show_progress="hidden")

    job_targets = reg.many(JOB_OUTPUT_KEYS)

    def on_load():
        """A (re)loaded page: re-attach to the training job (its settings fill the form), show the demo."""
        job = state.jobs.job
        out: list = [gr.skip()] * len(targets)
        timer = gr.Timer(active=state.demo.status == "building")
        filled = state.demo.status == "ready" and state.demo_requested
        if filled:
            out = list(demo_fill())
        elif state.demo.status != "none":
            out[0] = gr.update(value=demo_banner(state), visible=True)
            out[style_at] = state.demo_style  # the style made last, also after a switch in another page
        if job is not None and job.config_path.is_file():
            try:
                cfg = C.load_config(job.config_path)
            except UserError:
                cfg = None
            if cfg is not None:
                out[len(targets) - len(inputs):] = config_to_form(cfg)
                if not filled:  # Generate starts from the model being trained
                    out[base_at] = gr.update(value=cfg.model.base)
        shown = list(job_outputs(state, {}, 0, force=True))
        shown[JOB_OUTPUT_KEYS.index("train.finished")] = gr.skip()
        return (*out, timer, *shown)
    app.load(on_load, None, [*targets, poll, *job_targets])
