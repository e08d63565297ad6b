"""The Dataset tab: scan a folder, caption it, edit captions, preview the trainer's buckets and crops.

Everything is ``datasets_tools``; this module only lays it out and keeps what the page shows current: every
change to the captions (captioning, an edit in the caption editor, a caption operation, undo) re-runs the scan, so
the scan report never says "no caption file: 30" about captions that were just written, and the caption editor
(``app.ui.tabs.caption_editor``: the pictures, a page at a time, with their captions) shows the files again. The bucket settings are the
Train form's own fields (reached through the registry), so the preview is what the trainer will do.
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import gradio as gr

from datasets_tools.captioners import CAPTIONERS, FLORENCE_TASKS
from trainer import config as C
from trainer.errors import UserError, first_line

from app.ui.form import frame, guarded, resolve, value_from_form
from app.ui.registry import Registry
from app.ui.state import AppState
from app.ui.tabs.dataset_masks import create_masks_section
from app.ui.tabs.caption_editor import create_caption_editor, thumbnail  # noqa: F401 - thumbnail: the tab's cache

#: The Train form's fields that the scan and the bucket preview use, in the order of their handlers' arguments.
BUCKET_KEYS = ("data.resolution", "data.min_bucket_px", "data.max_bucket_px", "data.bucket_step_px",
               "data.bucket_no_upscale", "data.enable_bucket", "train.batch_size", "data.caption_extension",
               "data.mask_dir")
PROBLEM_HEADERS = ("file", "problem", "message")


def gui_words(text: str) -> str:
    """datasets_tools' messages speak to the shell; on the page, point to the page's own buttons."""
    return re.sub(r"undo with `lorastudio captions DIR --undo`", "undo with the **Undo last edit** button below",
                  text)


def dataset_items(folder: Path, ext: str) -> list[dict]:
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


def check_dataset_folder(folder: str) -> Path:
    from datasets_tools.folder import check_folder
    if not folder or not str(folder).strip():
        raise UserError("choose a dataset folder first (type its path)")
    return check_folder(resolve(str(folder).strip()))


def bucket_settings(*raw) -> dict:
    """The Train form's bucket fields, checked (a wrong one names the Train tab's field)."""
    vals = {}
    for key, value in zip(BUCKET_KEYS, raw):
        try:
            vals[key] = value_from_form(C.FIELDS[key], value)
        except UserError as e:
            raise UserError(f"Train tab: {first_line(e)}", field=key) from None
    return vals


def scan(state: AppState, root: Path, s: dict, progress=None) -> tuple:
    """(status line, report text, problems table, JSON report path, items) of a fresh scan."""
    from datasets_tools.scan import scan_folder
    report = scan_folder(root, resolution=s["data.resolution"], min_px=s["data.min_bucket_px"],
                         max_px=s["data.max_bucket_px"], step=s["data.bucket_step_px"],
                         no_upscale=s["data.bucket_no_upscale"], batch_size=s["train.batch_size"],
                         caption_extension=s["data.caption_extension"], mask_dir=s["data.mask_dir"] or None,
                         progress=(lambda d, t, *_: progress((d, max(t, 1)), desc="scanning")) if progress else None)
    items = dataset_items(root, s["data.caption_extension"])
    rows = [[p.path, p.kind, p.message] for p in sorted(report.problems, key=lambda p: (p.path, p.kind))]
    usable = len(report.usable_images())
    status = (f"Scanned `{root}` at {time.strftime('%H:%M:%S')}: {len(report.images)} picture(s), {usable} usable, "
              f"{len(report.problems)} problem(s) in {report.elapsed_s:.1f} s.")
    json_path = report.write_json(state.work / "reports" / "scan-report.json")
    summary = report.summary(max_files=8).replace("(see the JSON report)", "(all of them: Download the JSON report)")
    return status, summary, frame(rows, list(PROBLEM_HEADERS)), str(json_path), items


def tag_table(folder: Path, ext: str):
    from datasets_tools.captions import tag_frequency, total_frequency
    rows = [[tag, n] for tag, n in total_frequency(tag_frequency(folder, caption_extension=ext))[:200]]
    return frame(rows, ["tag", "images"])


def prune(folder: Path, keep: int) -> None:
    files = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime)
    for f in files[:-keep] if keep else files:
        f.unlink(missing_ok=True)


def create_dataset_tab(state: AppState, reg: Registry) -> None:
    r = reg.add
    with gr.Row(equal_height=False):
        folder = r("dataset.folder", gr.Dropdown(
            choices=state.chosen, value=None, allow_custom_value=True, scale=4, label="Dataset folder",
            elem_id="ds-folder", info="Type a folder path (or pick one you used before). Repeats come from "
                                      "N_name folders: sub-folders named 'N_name' repeat their images N times."))
        scan_btn = r("dataset.scan", gr.Button("Scan", variant="primary", size="md", scale=0, elem_id="ds-scan"))
        use_btn = r("dataset.use", gr.Button("Use for training", size="md", scale=0, elem_id="ds-use"))
    status = r("dataset.status", gr.Markdown("", elem_id="ds-status"))
    with gr.Row():
        with gr.Column(scale=2):
            summary = r("dataset.summary", gr.Code(label="Scan report (updated after every caption change)",
                                                   language=None, lines=10, elem_id="ds-summary", wrap_lines=True))
            report_btn = r("dataset.report", gr.DownloadButton("Download the JSON report", value=None,
                                                               interactive=False, size="sm", elem_id="ds-report"))
        with gr.Column(scale=3):
            problems = r("dataset.problems", gr.Dataframe(headers=list(PROBLEM_HEADERS), label="Problems by file",
                                                          interactive=False, elem_id="ds-problems", max_height=300))
    with gr.Accordion("Pictures and captions (the caption editor)", open=True):
        editor = create_caption_editor(state, reg)
    with gr.Accordion("Caption the pictures", open=True):
        with gr.Row(equal_height=False):
            cap_name = r("dataset.captioner", gr.Dropdown(
                choices=list(CAPTIONERS), value=CAPTIONERS[0], label="Captioner", elem_id="cap-name",
                info="template: from file names (offline); the others need a model (docs/captioning.md)"))
            cap_model = r("dataset.captioner_model", gr.Textbox(label="Model (all but template)",
                                                                placeholder="a local folder or hub id",
                                                                elem_id="cap-model"))
            cap_prompt = r("dataset.caption_prompt", gr.Textbox(
                label="Instruction (vlm) or task (florence2)", elem_id="cap-prompt",
                placeholder=f"empty: the default; florence2: {', '.join(FLORENCE_TASKS)}"))
            cap_template = r("dataset.template", gr.Textbox(value="{name}", label="Template",
                                                            info="{trigger}, {name} (file name), {folder}",
                                                            elem_id="cap-template"))
            cap_trigger = r("dataset.trigger", gr.Textbox(label="Trigger word (put first)", elem_id="cap-trigger"))
            cap_overwrite = r("dataset.overwrite", gr.Checkbox(label="Replace existing captions (backed up)",
                                                               elem_id="cap-overwrite"))
            cap_btn = r("dataset.caption_run", gr.Button("Caption", variant="primary", size="md", scale=0,
                                                         elem_id="cap-run"))
        cap_status = r("dataset.caption_status", gr.Markdown("", elem_id="cap-status"))
    with gr.Accordion("Caption operations", open=True):
        with gr.Row(equal_height=False):
            op_prefix = r("dataset.op_prefix", gr.Textbox(label="Trigger prefix", elem_id="op-prefix"))
            op_prefix_btn = gr.Button("Add prefix", size="md", scale=0, elem_id="op-prefix-btn")
            op_find = r("dataset.op_find", gr.Textbox(label="Find (whole words)", elem_id="op-find"))
            op_repl = r("dataset.op_replace", gr.Textbox(label="Replace with (empty deletes)", elem_id="op-repl"))
            op_replace_btn = gr.Button("Replace", size="md", scale=0, elem_id="op-replace-btn")
        with gr.Row(equal_height=False):
            op_remove = r("dataset.op_remove", gr.Textbox(label="Remove tags (comma-separated)",
                                                          elem_id="op-remove"))
            op_remove_btn = gr.Button("Remove tags", size="md", scale=0, elem_id="op-remove-btn")
            op_dedupe_btn = gr.Button("Dedupe tags", size="md", scale=0, elem_id="op-dedupe-btn")
            op_undo_btn = r("dataset.undo", gr.Button("Undo last edit", size="md", scale=0, elem_id="op-undo-btn"))
            op_stats_btn = gr.Button("Tag stats", size="md", scale=0, elem_id="op-stats-btn")
        op_status = r("dataset.op_status", gr.Markdown("", elem_id="op-status"))
        op_tags = r("dataset.tags", gr.Dataframe(headers=["tag", "images"], label="Tag frequency",
                                                 interactive=False, elem_id="op-tags", max_height=240))
    with gr.Accordion("Bucket preview (the trainer's own bucket and crop for each picture)", open=True):
        with gr.Row(equal_height=False):
            gr.Markdown("Uses the Train tab's " + ", ".join(f"`{k}`" for k in BUCKET_KEYS
                                                            if k != "data.caption_extension") + ".")
            bp_btn = gr.Button("Bucket preview", variant="primary", size="md", scale=0, elem_id="bp-run")
        bp_status = r("dataset.bucket_status", gr.Markdown("", elem_id="bp-status"))
        with gr.Row():
            bp_counts = r("dataset.buckets", gr.Dataframe(
                headers=["bucket", "images", "samples per epoch"], label="Buckets", interactive=False,
                elem_id="bp-counts", max_height=260, scale=1))
            bp_rows = r("dataset.bucket_rows", gr.Dataframe(
                headers=["image", "size", "bucket", "crop box (image px)"], label="Each picture",
                interactive=False, elem_id="bp-rows", max_height=260, scale=2))
        bp_sheet = r("dataset.contact_sheet", gr.Image(
            label="Contact sheet: kept area bright, yellow box = crop", type="filepath", interactive=False,
            elem_id="bp-sheet", height=420, buttons=[]))
    create_masks_section(state, reg)  # the Masks accordion (app.ui.tabs.dataset_masks)
    items = r("dataset.items", gr.State([]))

    # The rest reads the Train form's fields, built after this tab: wired once every tab exists.
    @reg.after_build
    def wire():
        bucket_inputs = reg.many(f"train.{k}" for k in BUCKET_KEYS)
        rescan_outputs = [status, summary, problems, report_btn, items]

        def rescan(root: Path, s: dict) -> tuple:
            st, text, probs, json_path, its = scan(state, root, s)
            return st, text, probs, gr.update(value=json_path, interactive=True), its

        editor.wire(folder=folder, items=items, bucket_inputs=bucket_inputs, root_of=check_dataset_folder,
                    settings=bucket_settings, rescan=rescan, rescan_outputs=rescan_outputs, words=gui_words)

        @guarded(6)
        def on_scan(folder_now, res, min_px, max_px, step, no_up, enable, batch, ext, mask,
                    progress=gr.Progress()):
            # (explicit arguments: gradio hands gr.Progress only to a positional parameter)
            root = check_dataset_folder(folder_now)
            s = bucket_settings(res, min_px, max_px, step, no_up, enable, batch, ext, mask)
            progress(0.0, desc="scanning ...")
            st, text, probs, json_path, its = scan(state, root, s, progress)
            state.remember_folder(str(root))
            return (st, text, probs, gr.update(value=json_path, interactive=True), its,
                    gr.update(choices=state.chosen, value=str(root)))
        editor.reload(scan_btn.click(on_scan, [folder, *bucket_inputs],
                                     [status, summary, problems, report_btn, items, folder]))

        @guarded(2)
        def on_use_folder(folder_now):
            root = check_dataset_folder(folder_now)
            return f"data.dir (Image folder) in the Train tab is now `{root}`.", str(root)
        use_btn.click(on_use_folder, [folder], [status, reg.get("train.data.dir")])

        @guarded(6)
        def on_caption(folder_now, name, model, prompt, template, trigger, overwrite_caps, res, min_px, max_px, step,
                       no_up, enable, batch, ext, mask, progress=gr.Progress()):
            from datasets_tools.captioners import (caption_folder, captioner_options, check_captioner_args,
                                                   get_captioner)
            root = check_dataset_folder(folder_now)
            s = bucket_settings(res, min_px, max_px, step, no_up, enable, batch, ext, mask)
            ext = s["data.caption_extension"]
            model = (model or "").strip() or None
            check_captioner_args(name, model)
            progress(0.0, desc=f"loading the {name} captioner ...")
            prompt = (prompt or "").strip() or None  # the registry says which captioner takes prompt or task
            cap = get_captioner(name, model=model, **captioner_options(
                name, template=template or "{name}", trigger=trigger or None, root=root, prompt=prompt, task=prompt))
            run = caption_folder(root, cap, trigger=(trigger or "").strip() or None, overwrite=bool(overwrite_caps),
                                 caption_extension=ext,
                                 progress=lambda d, t: progress((d, max(t, 1)), desc=f"captioning ({name})",
                                                                unit="images"))
            text = run.summary()
            if run.backup:
                text += "; undo with the **Undo last edit** button below"
            return (text, *rescan(root, s))
        editor.reload(cap_btn.click(on_caption, [folder, cap_name, cap_model, cap_prompt, cap_template, cap_trigger,
                                                 cap_overwrite, *bucket_inputs], [cap_status, *rescan_outputs]))

        def caption_op(kind):
            @guarded(7)
            def run(folder_now, prefix, find, repl, remove, *bucket):
                from datasets_tools import captions as CAP
                root = check_dataset_folder(folder_now)
                s = bucket_settings(*bucket)
                ext = s["data.caption_extension"]
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
                    return (f"tag frequency of `{root}`", tag_table(root, ext), *[gr.skip()] * 5)
                return (gui_words(res.summary()), tag_table(root, ext), *rescan(root, s))
            return run
        op_inputs = [folder, op_prefix, op_find, op_repl, op_remove, *bucket_inputs]
        op_outputs = [op_status, op_tags, *rescan_outputs]
        for btn, kind in ((op_prefix_btn, "prefix"), (op_replace_btn, "replace"), (op_remove_btn, "remove"),
                          (op_dedupe_btn, "dedupe"), (op_undo_btn, "undo")):
            editor.reload(btn.click(caption_op(kind), op_inputs, op_outputs))
        op_stats_btn.click(caption_op("stats"), op_inputs, op_outputs)

        @guarded(4)
        def on_preview(folder_now, *bucket):
            from datasets_tools.preview import bucket_preview, contact_sheet
            root = check_dataset_folder(folder_now)
            s = bucket_settings(*bucket)
            pv = bucket_preview(root, resolution=s["data.resolution"], min_px=s["data.min_bucket_px"],
                                max_px=s["data.max_bucket_px"], step=s["data.bucket_step_px"],
                                no_upscale=s["data.bucket_no_upscale"], enable_bucket=s["data.enable_bucket"],
                                batch_size=s["train.batch_size"], caption_extension=s["data.caption_extension"],
                                mask_dir=s["data.mask_dir"])
            counts = [[b, c["images"], c["samples"]] for b, c in pv.buckets.items()]
            rows = [[r_.path, f"{r_.width}x{r_.height}",
                     f"{r_.bucket[0]}x{r_.bucket[1]}" + (" (upscaled)" if r_.upscaled else ""),
                     ", ".join(str(round(v)) for v in r_.box_in_image())] for r_ in pv.rows]
            sheet = None
            if pv.rows:
                prune(state.work / "preview", keep=8)
                sheet = contact_sheet(pv, state.work / "preview" / f"contact-{int(time.time() * 1000)}.png",
                                      thumb_px=128, max_images=200)
            text = (f"{len(pv.rows)} picture(s) in {len(pv.buckets)} bucket(s) at resolution "
                    f"{s['data.resolution']} ({s['data.min_bucket_px']}-{s['data.max_bucket_px']} px, step "
                    f"{s['data.bucket_step_px']}).")
            if pv.warnings:
                text += "\n\n" + "\n".join(f"- {html.escape(w)}" for w in pv.warnings)
            return (text, frame(counts, ["bucket", "images", "samples per epoch"]),
                    frame(rows, ["image", "size", "bucket", "crop box (image px)"]), str(sheet) if sheet else None)
        bp_btn.click(on_preview, [folder, *bucket_inputs], [bp_status, bp_counts, bp_rows, bp_sheet])

