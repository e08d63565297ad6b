"""The Dataset tab's Masks section: training masks drawn by a prompt (CLIPSeg) or taken from the alpha channel,
and a gallery of the pictures with their masks over them.

The work is ``datasets_tools.mask_maker.make_masks``, the same function as ``lorastudio masks``; the sliders are
made from the same ``MASK_FIELDS`` as the command's flags, so a range is the same in the shell and the browser.
The masks go to DIR/masks (or the folder typed here), where the Train tab's ``data.mask_dir`` reads them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import gradio as gr

from app.cli.masks import MASK_FIELDS
from app.ui.form import guarded, resolve
from app.ui.registry import Registry
from app.ui.state import AppState
from datasets_tools.mask_maker import DEVICES, MASK_DIR_NAME, OPTIONS

MAX_OVERLAYS = 120  # pictures shown with their masks at once
OVERLAY_PX = 192


def mask_slider(name: str, **kw):
    """The slider of one mask option: its ends, default and step from MASK_OPTIONS (as the CLI's flags)."""
    fi = MASK_FIELDS[name]
    return gr.Slider(minimum=fi.min, maximum=fi.max, value=fi.default, step=OPTIONS[name].step, label=fi.label,
                     info=fi.help, elem_id=f"mk-{name.replace('_', '-')}", **kw)


def _masker(cache: dict, model: str, device: str):
    """The CLIPSeg of (model, device), loaded once per app and kept for the next run (one in memory at a time)."""
    from datasets_tools.mask_maker import ClipSegMasker
    key = (str(Path(model).expanduser().resolve()) if model and Path(model).expanduser().exists() else model, device)
    if key not in cache:
        cache.clear()
        cache[key] = ClipSegMasker(model, device=device)
    return cache[key]


def mask_folder(root: Path, typed: str) -> Path:
    typed = (typed or "").strip()
    return resolve(typed) if typed else root / MASK_DIR_NAME


def overlays(state: AppState, root: Path, mask_dir: Path) -> list:
    """(thumbnail, caption) of the pictures that have a mask, each with its mask over it (cached by content)."""
    from datasets_tools.folder import collect_images
    from datasets_tools.mask_maker import is_mask_file, mask_overlay
    from datasets_tools.masks import mask_index

    if not mask_dir.is_dir():
        return []
    index = mask_index(mask_dir)
    items, _ = collect_images(root)
    out_dir = state.work / "mask-preview"
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = []
    for it in items:
        mask = index.get(Path(it.path).stem)
        if mask is None or is_mask_file(Path(it.path), mask_dir.resolve()):
            continue
        a, b = Path(it.path).stat(), mask.stat()
        key = hashlib.sha1(f"{Path(it.path).resolve()}|{a.st_mtime_ns}|{a.st_size}|{mask.resolve()}|"
                           f"{b.st_mtime_ns}|{b.st_size}".encode()).hexdigest()[:24]
        thumb = out_dir / f"{key}.jpg"
        if not thumb.exists():
            try:
                img = mask_overlay(it.path, mask, OVERLAY_PX)
            except Exception:  # noqa: BLE001 - an unreadable picture or mask: the run's lines name it
                continue
            tmp = thumb.with_suffix(".tmp.jpg")
            img.save(tmp, quality=88)
            tmp.replace(thumb)
        shown.append((str(thumb), f"{Path(it.path).relative_to(root).as_posix()} -> {mask.name}"))
        if len(shown) >= MAX_OVERLAYS:
            break
    return shown


def create_masks_section(state: AppState, reg: Registry) -> None:
    """The Masks accordion of the Dataset tab (call inside the tab's layout, after dataset.folder exists)."""
    r = reg.add
    with gr.Accordion("Masks (what each picture trains: data.mask_dir)", open=False, elem_id="mk-accordion"):
        gr.Markdown("White trains, black is ignored. A prompt says what to keep (CLIPSeg, e.g. "
                    "`CIDAS/clipseg-rd64-refined` or a local folder); or take each picture's transparency. The "
                    f"masks are written to `DIR/{MASK_DIR_NAME}/<name>.png`; existing ones are kept unless "
                    "*Replace existing masks* is ticked. Same as `lorastudio masks DIR`.")
        with gr.Row(equal_height=False):
            prompt = r("dataset.mask_prompt", gr.Textbox(label="Prompt (what to train on)", scale=3,
                                                         placeholder="the character", elem_id="mk-prompt",
                                                         info="one per line: a pixel is white if any finds it",
                                                         lines=1, max_lines=4))
            model = r("dataset.mask_model", gr.Textbox(label="CLIPSeg model", scale=3, elem_id="mk-model",
                                                       placeholder="a local folder or hub id"))
            device = r("dataset.mask_device", gr.Dropdown(choices=list(DEVICES), value=DEVICES[0], label="Device",
                                                          scale=1, elem_id="mk-device"))
            alpha = r("dataset.mask_alpha", gr.Checkbox(label="From the alpha channel instead", scale=1,
                                                        elem_id="mk-alpha"))
        with gr.Row(equal_height=False):
            threshold = r("dataset.mask_threshold", mask_slider("threshold"))
            grow = r("dataset.mask_grow", mask_slider("grow"))
            blur = r("dataset.mask_blur", mask_slider("blur"))
            batch = r("dataset.mask_batch_size", mask_slider("batch_size"))
        with gr.Row(equal_height=False):
            invert = r("dataset.mask_invert", gr.Checkbox(label=MASK_FIELDS["invert"].label,
                                                          info=MASK_FIELDS["invert"].help, elem_id="mk-invert"))
            alpha_cut = r("dataset.mask_alpha_threshold", gr.Checkbox(
                label="Threshold the alpha too", elem_id="mk-alpha-threshold",
                info="alpha mode keeps the alpha's grey values unless this is ticked"))
            overwrite = r("dataset.mask_overwrite", gr.Checkbox(label="Replace existing masks",
                                                                elem_id="mk-overwrite"))
            out = r("dataset.mask_dir", gr.Textbox(label="Mask folder", elem_id="mk-out", scale=2,
                                                   placeholder=f"DIR/{MASK_DIR_NAME}"))
            run_btn = r("dataset.mask_run", gr.Button("Make masks", variant="primary", size="md", scale=0,
                                                      elem_id="mk-run"))
            show_btn = r("dataset.mask_show", gr.Button("Show masks", size="md", scale=0, elem_id="mk-show"))
            use_btn = r("dataset.mask_use", gr.Button("Use for training", size="md", scale=0, elem_id="mk-use"))
        status = r("dataset.mask_status", gr.Markdown("", elem_id="mk-status"))
        shown = r("dataset.mask_gallery", gr.Gallery(
            label="Pictures with their masks (blue = left out by the mask)", columns=6, height=360,
            allow_preview=True, object_fit="contain", elem_id="mk-gallery"))
    folder = reg.get("dataset.folder")
    maskers: dict = {}  # this app's loaded CLIPSeg

    def where(folder_now: str, out_now: str) -> tuple[Path, Path]:
        from app.ui.tabs.dataset import check_dataset_folder
        root = check_dataset_folder(folder_now)
        return root, mask_folder(root, out_now)

    @guarded(2)
    def on_run(folder_now, prompt_now, model_now, device_now, alpha_now, thr, gr_px, blur_px, batch_now, inv,
               alpha_thr, over, out_now, progress=gr.Progress()):
        from datasets_tools.mask_maker import check_option, make_masks, mask_plan
        root, mdir = where(folder_now, out_now)
        prompts = [] if alpha_now else [p.strip() for p in str(prompt_now or "").splitlines() if p.strip()]
        threshold = check_option("threshold", thr) if (not alpha_now or alpha_thr) else None
        masker = None
        if prompts:
            todo, _ = mask_plan(root, mdir, overwrite=bool(over))
            if todo:
                progress(0.0, desc="loading CLIPSeg ...")
                masker = _masker(maskers, str(model_now or "").strip(), device_now)
        run = make_masks(root, prompts=prompts, from_alpha=bool(alpha_now), mask_dir=mdir, threshold=threshold,
                         grow=gr_px, blur=blur_px, invert=bool(inv), overwrite=bool(over), batch_size=batch_now,
                         masker=masker, model=str(model_now or "").strip() or None, device=device_now,
                         progress=lambda d, t: progress((d, max(t, 1)), desc="making masks", unit="pictures"))
        text = run.summary() + (" (tick *Replace existing masks* to redo them)" if run.kept and not run.written
                                else "")
        if run.skipped:
            text += "\n\n" + "\n".join(f"- {p.message}" for p in run.skipped[:20])
            if len(run.skipped) > 20:
                text += f"\n- ... and {len(run.skipped) - 20} more"
        return text, overlays(state, root, mdir)
    run_btn.click(on_run, [folder, prompt, model, device, alpha, threshold, grow, blur, batch, invert, alpha_cut,
                           overwrite, out], [status, shown])

    @guarded(2)
    def on_show(folder_now, out_now):
        root, mdir = where(folder_now, out_now)
        pics = overlays(state, root, mdir)
        return (f"{len(pics)} picture(s) with a mask in `{mdir}`" if pics else f"no masks in `{mdir}` yet"), pics
    show_btn.click(on_show, [folder, out], [status, shown])

    @reg.after_build
    def wire():
        @guarded(2)
        def on_use(folder_now, out_now):
            _, mdir = where(folder_now, out_now)
            return f"data.mask_dir (Train tab) is now `{mdir}`.", str(mdir)
        use_btn.click(on_use, [folder, out], [status, reg.get("train.data.mask_dir")])
