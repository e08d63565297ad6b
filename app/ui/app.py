"""LoRA Studio's web app: the page composed from its tabs (``app/ui/tabs``), and launching it.

The app adds no engine logic: the Train form is generated from ``trainer.config.FIELDS`` and the Generate
controls from ``trainer.generate.settings`` (``app.ui.form``); training runs as the headless trainer subprocess
(``app.ui.jobs``); dataset work calls ``datasets_tools``; images come from one long-lived
``trainer.generate.engine.Generator``. Each tab module holds its layout and its handlers side by side; tabs reach
each other's controls through the registry (``app.ui.registry``), and what the app knows between events lives in
one ``AppState`` made here (``app.ui.state``). Importing this module does not import torch: models load on
first use. Every user-facing problem is one line beside the control that caused it, never a traceback.

Files: the app works in a root folder (``lorastudio ui --root DIR``, default the current folder; relative paths
in the forms are relative to it). Runs land in ``<root>/outputs``, the demo in ``<root>/demo``, thumbnails,
contact sheets, scan reports and exported presets in ``<root>/.lorastudio-ui``. Only those folders are served
to the browser; pictures from dataset folders the user picks reach it as thumbnails the app made.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from app.ui.startup import skip_stub_regeneration

skip_stub_regeneration()  # about half of `import gradio`'s time is stub-file regeneration meant for its developers
import gradio as gr  # noqa: E402

from app.ui.gradio_shims import patient_local_probe, server_app_deferred  # noqa: E402
from app.ui.page import create_header, wire_page  # noqa: E402
from app.ui.registry import Registry  # noqa: E402
from app.ui.state import AppState  # noqa: E402
from app.ui.tabs.dataset import create_dataset_tab  # noqa: E402
from app.ui.tabs.generate import create_generate_tab  # noqa: E402
from app.ui.tabs.presets import create_presets_tab  # noqa: E402
from app.ui.tabs.tools import create_tools_tab  # noqa: E402
from app.ui.tabs.train import create_train_tab  # noqa: E402

MAX_UPLOAD = "1mb"     # only presets are uploaded; import_preset refuses anything over 64 KiB with the reason

CSS = """
.ls-error { color: #b91c1c; font-size: 0.9em; }
.ls-error p { margin: 2px 0 !important; }
.ls-ok { color: #166534; }
.ls-beside { align-self: center; min-width: 160px; }
.ls-beside p { margin: 0 !important; }
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
#g-gallery img, #tr-samples img, #bp-sheet img { image-rendering: pixelated; max-width: 100%; max-height: 100%;
  object-fit: contain; }
"""


def build_app(state: AppState) -> gr.Blocks:
    """The Blocks app, queued (one event at a time unless a handler says otherwise), ready for `launch()`.

    Nothing heavy happens here: no model, no torch, no folder scan."""
    with server_app_deferred():
        app, _ = build_blocks(state)
        app.queue(default_concurrency_limit=1)
    return app


def build_blocks(state: AppState) -> tuple[gr.Blocks, Registry]:
    """The page: header, the tabs in order, then the wiring that reaches across tabs."""
    reg = Registry()
    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as app:
        create_header(state, reg)
        with gr.Tabs():
            with reg.add("tab.dataset", gr.Tab("Dataset", id="dataset")):
                create_dataset_tab(state, reg)
            with reg.add("tab.train", gr.Tab("Train", id="train")):
                create_train_tab(state, reg)
            with reg.add("tab.generate", gr.Tab("Generate", id="generate")):
                create_generate_tab(state, reg, app)
            with reg.add("tab.presets", gr.Tab("Presets", id="presets")):
                create_presets_tab(state, reg)
            with reg.add("tab.tools", gr.Tab("Tools", id="tools")):
                create_tools_tab(state, reg)
        reg.finish()
        wire_page(state, reg, app)
    return app, reg


def launch(root: str | Path = ".", *, listen: bool = False, port: int = 7860, auth: tuple[str, str] | None = None,
           demo: bool = False, demo_style: str | None = None, block: bool = True, quiet: bool = False):
    """Serve the app: 127.0.0.1 unless listen; files only from the app's own folders; optional password."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # relative paths in forms and presets mean "in the root", for the app and the trainer alike
    state = AppState(root, demo_requested=demo)
    if demo_style is not None:
        from app.demo import check_style
        state.demo_style = check_style(demo_style)
    app = build_app(state)
    if demo and (state.demo.status != "ready" or state.demo.info.style != state.demo_style):
        state.demo.status, state.demo.message = "building", "starting ..."
        threading.Thread(target=_build_demo_quietly, args=(state,), name="lorastudio-demo", daemon=True).start()
    with patient_local_probe():
        return app.launch(server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, auth=auth,
                          allowed_paths=state.served_paths(), max_file_size=MAX_UPLOAD, show_error=False,
                          prevent_thread_lock=not block, quiet=quiet, ssr_mode=False, pwa=False, mcp_server=False,
                          enable_monitoring=False, inbrowser=False, css=CSS,
                          footer_links=["gradio", "settings"], i18n=_missing_gradio_words())


def _missing_gradio_words():
    """Words gradio's page uses but its English table lacks: after every event its screen-reader status line
    (also shown for a moment near the component) said the raw key "common.complete" (gradio 6.31)."""
    return gr.I18n(en={"common.complete": "Complete"})


def _build_demo_quietly(state: AppState) -> None:
    state.demo.status = "none"
    try:
        state.build_demo(style=state.demo_style)
    except Exception:  # noqa: BLE001 - shown in the banner
        pass
