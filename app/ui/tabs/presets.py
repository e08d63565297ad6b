"""The Presets tab: shipped and user presets, export, save the Train form, import a file, rebuild from a LoRA.

Import is ``trainer.config.presets.import_preset``, the same strict reading the CLI uses (byte cap, UTF-8, keys,
types, ranges, version, and paths only inside this app's folders: ``AppState.preset_roots``).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from trainer.errors import UserError, first_line

from app.ui.form import error_md, error_updates, form_to_config, frame, guarded, resolve
from app.ui.registry import Registry
from app.ui.state import AppState, rel
from app.ui.tabs.train import form_errors, form_inputs, load_preset_into_form


def presets_frame():
    from trainer.config.presets import list_presets
    return frame([[p.name, p.source, p.summary] for p in list_presets()], ["name", "source", "summary"])


def create_presets_tab(state: AppState, reg: Registry) -> None:
    r = reg.add
    with gr.Row():
        with gr.Column(scale=2):
            table = r("presets.table", gr.Dataframe(presets_frame(), label="Shipped and user presets",
                                                    interactive=False, elem_id="p-table", max_height=300))
            with gr.Row(equal_height=False):
                pick = r("presets.pick", gr.Dropdown(choices=state.preset_names(), value=None, label="Preset",
                                                     elem_id="p-pick", scale=3))
                refresh = gr.Button("↻", size="md", scale=0, min_width=40, elem_id="p-refresh")
                to_form = gr.Button("Use in the Train tab", size="md", scale=0, elem_id="p-to-form")
                export = r("presets.export", gr.DownloadButton("Export (download)", value=None, interactive=False,
                                                               scale=0, elem_id="p-export"))
            status = r("presets.status", gr.Markdown("", elem_id="p-status"))
            text = r("presets.text", gr.Code(label="Preset file", language=None, lines=14, elem_id="p-text"))
        with gr.Column(scale=1):
            gr.Markdown("### Save the Train form as a preset")
            save_name = r("presets.save_name", gr.Textbox(label="Name", placeholder="my-style", elem_id="p-save-name"))
            save_btn = gr.Button("Save current Train form", elem_id="p-save")
            save_status = r("presets.save_status", gr.Markdown("", elem_id="p-save-status"))
            gr.Markdown("### Import a preset file")
            file = r("presets.file", gr.File(label="Preset .toml (at most 64 KiB; checked before it is saved)",
                                             file_types=[".toml"], type="filepath", elem_id="p-file"))
            import_name = r("presets.import_name", gr.Textbox(label="Save as (default: the file name)",
                                                              elem_id="p-import-name"))
            import_btn = gr.Button("Import", elem_id="p-import")
            import_status = r("presets.import_status", gr.Markdown("", elem_id="p-import-status"))
            gr.Markdown("### Rebuild a preset from a LoRA")
            lora = r("presets.lora", gr.Dropdown(choices=state.lora_choices(str(state.default_lora_dir)), value=None,
                                                 allow_custom_value=True, label="LoRA made by LoRA Studio",
                                                 elem_id="p-lora"))
            rebuild_btn = gr.Button("Rebuild from its metadata", elem_id="p-rebuild")
            rebuild_name = r("presets.rebuild_name", gr.Textbox(label="Save the rebuilt preset as",
                                                                elem_id="p-rebuild-name"))
            rebuild_save = gr.Button("Save rebuilt preset", elem_id="p-rebuild-save")
            rebuild_status = r("presets.rebuild_status", gr.Markdown("", elem_id="p-rebuild-status"))

    # ---- wiring
    train_pick = reg.get("train.preset")
    inputs, errors = form_inputs(reg), form_errors(reg)
    lists = [table, pick, train_pick]

    def lists_now(value=None):
        return presets_frame(), gr.update(choices=state.preset_names(), value=value), \
            gr.update(choices=state.preset_choices())

    def presets_refresh():
        table_now, _, train_now = lists_now()
        return table_now, gr.update(choices=state.preset_names()), train_now
    refresh.click(presets_refresh, None, lists)
    reg.get("tab.presets").select(presets_refresh, None, lists, show_progress="hidden")

    @guarded(3, status_at=2)
    def on_pick(name):
        from trainer.config.presets import resolve_preset
        if not name:
            return "", gr.update(value=None, interactive=False), ""
        path = resolve_preset(name)
        content = path.read_text(encoding="utf-8")
        out = state.work / "exports" / f"{name}.toml"
        out.write_text(content, encoding="utf-8")
        return content, gr.update(value=str(out), interactive=True), f"preset '{name}' ({rel(path, state.root)})"
    pick.change(on_pick, [pick], [text, export, status])

    def on_to_form(name, *current):
        try:
            values, note = load_preset_into_form(state, f"preset:{name}" if name else "", list(current))
        except UserError as e:
            return (*[gr.skip()] * (len(inputs) + len(errors)), error_md(first_line(e)))
        return (*values, *error_updates({}), note + "; see the Train tab")
    to_form.click(on_to_form, [pick, *inputs], [*inputs, *errors, status])

    @guarded(4, status_at=0)
    def on_save_preset(name, *vals):
        from trainer.config.presets import save_user_preset
        name = (name or "").strip()
        if not name:
            raise UserError("type a name for the preset")
        cfg, errs = form_to_config(vals)
        if errs:
            raise UserError(f"the Train form has {len(errs)} invalid field(s); first: {next(iter(errs.values()))}")
        path = save_user_preset(name, cfg, f"User preset '{name}', saved from the web app's Train form.")
        return (f"saved preset '{name}' to {path}", *lists_now(name))
    save_btn.click(on_save_preset, [save_name, *inputs], [save_status, *lists])

    @guarded(5, status_at=0)
    def on_import(path, name):
        from trainer.config.presets import import_preset
        if not path:
            raise UserError("choose a preset file to import first")
        stem, saved = import_preset(path, name or "", allowed_roots=state.preset_roots())
        return (f"imported '{stem}' (checked: keys, types, ranges, paths) -> {saved}", *lists_now(stem), None)
    import_btn.click(on_import, [file, import_name], [import_status, *lists, file])

    @guarded(2, status_at=1)
    def on_rebuild(lora_now):
        from trainer.config.presets import preset_from_lora
        if not (lora_now or "").strip():
            raise UserError("pick a LoRA file first (or type its path)")
        content = preset_from_lora(resolve(lora_now.strip()))
        return content, f"rebuilt from the metadata of {Path(lora_now).name}; save it under a name below"
    rebuild_btn.click(on_rebuild, [lora], [text, rebuild_status])

    @guarded(4, status_at=0)
    def on_rebuild_save(lora_now, name):
        from trainer.config.presets import preset_from_lora, save_user_preset, validate_preset_text
        if not (lora_now or "").strip():
            raise UserError("pick a LoRA file first (or type its path)")
        content = preset_from_lora(resolve(lora_now.strip()))
        cfg = validate_preset_text(content, Path(lora_now).name)
        name = (name or "").strip() or Path(lora_now).stem
        saved = save_user_preset(name, cfg, f"Rebuilt from {Path(lora_now).name} (its embedded training config).")
        return (f"saved preset '{name}' -> {saved}", *lists_now(name))
    rebuild_save.click(on_rebuild_save, [lora, rebuild_name], [rebuild_status, *lists])
