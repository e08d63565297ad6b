"""The Tools tab: resize, merge, extract and bake LoRAs (``trainer.lora.tools``), the engines ``lorastudio lora``
runs.

Each tool has its progress bar (the engine's progress callback drives ``gr.Progress``), a result line (the CLI's
own summary: file written, size, how many modules have each rank, the retained share), a per-module table, and
the ``lorastudio lora ...`` command the run equals, as the Train tab shows its command. LoRAs are picked from the
runs in ``outputs/`` and the Generate tab's LoRA folder (``AppState.lora_choices``) or typed; models from the
base-model list (``AppState.model_choices``) or typed. An empty output box writes under ``outputs/lora-tools/``
(LoRAs) or ``outputs/baked/`` (checkpoints); an existing output is refused unless Overwrite is ticked. The choices
come from ``trainer.lora.tools`` (dynamic modes, precisions, the extract threshold) and the bake command's dtypes;
ranks have no box limits: the engine's own checks (rank 0, a rank above a layer's size) give the one-line message.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import gradio as gr

from trainer.common.names import looks_like_hub_id
from trainer.errors import UserError, first_line
from trainer.generate.settings import FAMILY_CHOICES
from trainer.lora.tools import DYNAMIC_MODES, EXTRACT_THRESHOLD, PRECISIONS

from app.cli.lora_bake import BAKE_DTYPES
from app.ui.form import error_md, frame, guarded
from app.ui.jobs import JobManager
from app.ui.registry import Registry
from app.ui.state import AppState, rel

#: the dynamic-rank menu: off, then kohya's modes (``--dynamic MODE=VALUE``)
DYNAMIC_OFF = "off"
DYNAMIC_CHOICES = (DYNAMIC_OFF, *DYNAMIC_MODES)
#: the default rank of the resize, merge and extract boxes
DEFAULT_RANK = 8
MODULE_HEADERS = ("module", "rank before", "rank after", "keeps")


# ------------------------------------------------------------------------------------------------ helpers


def gui_words(message: str) -> str:
    """An engine message in this page's words: the Overwrite box instead of the --overwrite flag."""
    return re.sub(r"give --overwrite to replace it", "tick Overwrite to replace it", message)


def in_gui_words(fn):
    """UserErrors of a handler said with this page's words (under ``guarded``, which makes them one line)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise UserError(gui_words(first_line(e))) from None
    return wrapper


def in_root(state: AppState, text: str) -> Path:
    """A typed path: relative ones are relative to the app's root folder."""
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else state.root / p


def lora_file(state: AppState, text, what: str = "LoRA") -> Path:
    text = (text or "").strip()
    if not text:
        raise UserError(f"{what}: pick a LoRA file first (or type its path)")
    return in_root(state, text)


def model_source(state: AppState, text, what: str) -> str:
    """A model box's value: a path (made absolute) or a hub id as typed."""
    text = (text or "").strip()
    if not text:
        raise UserError(f"{what}: choose a model (a diffusers folder, a .safetensors checkpoint or a hub id)")
    p = in_root(state, text)
    return text if not p.exists() and looks_like_hub_id(text) else str(p)


def output_path(state: AppState, text, default: Path) -> Path:
    """The output box's value (relative to the root), or the default name under the app's outputs folder."""
    text = (text or "").strip()
    return in_root(state, text) if text else default


def whole(value, flag: str) -> int | None:
    """A number box's value as a whole number (None when empty)."""
    if value is None or str(value).strip() == "":
        return None
    v = float(value)
    if not v.is_integer():
        raise UserError(f"{flag}: expected a whole number, got {value:g}")
    return int(v)


def typical_dynamic_value(mode: str) -> float:
    """What the value box shows when a rule is picked: 90 % of the norm, or a ratio of 20 (kohya's examples)."""
    return 20.0 if mode == "sv_ratio" else 0.9


def dynamic_text(mode, value) -> str | None:
    """``MODE=VALUE`` for ``--dynamic`` from the menu and its box, or None when off."""
    if not mode or mode == DYNAMIC_OFF:
        return None
    if value is None or str(value).strip() == "":
        raise UserError(f"--dynamic: give a value for {mode} (e.g. {mode}={typical_dynamic_value(mode):g})")
    return f"{mode}={float(value):g}"


def lora_lines(text) -> list[str]:
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def weighted_line(state: AppState, line: str) -> str:
    """``FILE[:WEIGHT...]`` with FILE made absolute (the weights after it as typed)."""
    from trainer.generate.prompt_syntax import parse_lora_arg
    name = parse_lora_arg(line).name
    rest = line[len(name):] if line.startswith(name) else ""
    return f"{in_root(state, name)}{rest}"


def shown(argv: list[str]) -> str:
    """The command as the Train tab shows its own (shell-quoted)."""
    return JobManager.display(argv)


def progress_cb(progress, name: str):
    """The engines' (done, total) callback driving the tab's progress bar (None without one)."""
    if progress is None:
        return None
    return lambda done, total: progress((done, total), desc=name, unit="modules")


def module_rows(result):
    return frame([[m.key, m.rank_in, m.rank_out, f"{m.kept:.2%}"] for m in result.modules], list(MODULE_HEADERS))


def tool_summary(state: AppState, result) -> str:
    from app.cli.lora import summary
    return summary(result, rel(result.written.path, state.root))


def add_line(state: AppState, text, pick) -> tuple:
    """The picked LoRA appended to a LoRA list box at weight 1 (the box stays editable)."""
    pick = (pick or "").strip()
    if not pick:
        return gr.skip(), error_md("pick a LoRA file first (or type its path)")
    p = in_root(state, pick)
    if not p.is_file():
        return gr.skip(), error_md(f"LoRA file not found: {pick}")
    lines = lora_lines(text) + [f"{p}:1"]
    return "\n".join(lines), f"added {p.name} at weight 1 (edit the number after ':')"


# ------------------------------------------------------------------------------------------------ the tools


def run_resize(state: AppState, lora, rank, mode, value, precision, out, overwrite, progress=None):
    """(result line, command, per-module table)."""
    src = lora_file(state, lora)
    rank = whole(rank, "--rank")
    dyn = dynamic_text(mode, value)
    tag = f"r{rank}" if rank is not None and not dyn else (dyn or "").replace("=", "") + (
        f"-max{rank}" if rank is not None else "")
    target = output_path(state, out, state.tools_out / f"{src.stem}-{tag or 'resized'}.safetensors")
    argv = ["lorastudio", "lora", "resize", str(src)]
    argv += ["--rank", str(rank)] if rank is not None else []
    argv += ["--dynamic", dyn] if dyn else []
    argv += ["--out", str(target), "--precision", precision] + (["--overwrite"] if overwrite else [])
    from trainer.lora.tools.resize import resize_lora
    from trainer.lora.tools.svd import parse_dynamic
    result = resize_lora(src, target, rank=rank, dynamic=parse_dynamic(dyn), save_precision=precision,
                         overwrite=bool(overwrite), progress=progress_cb(progress, "resize"))
    return tool_summary(state, result), shown(argv), module_rows(result)


def run_merge(state: AppState, loras, concat, rank, mode, value, precision, out, overwrite, progress=None):
    from trainer.lora.tools.merge import merge_loras, parse_source
    lines = lora_lines(loras)
    if not lines:
        raise UserError("merge: add at least one LoRA (one per line: FILE or FILE:WEIGHT)")
    sources = []
    for line in lines:
        file, weight = parse_source(line)
        sources.append((str(in_root(state, file)), weight))
    rank = None if concat else whole(rank, "--rank")
    dyn = None if concat else dynamic_text(mode, value)
    stem = "+".join(Path(f).stem for f, _ in sources)[:80]
    target = output_path(state, out, state.tools_out / f"{stem}-merged.safetensors")
    argv = ["lorastudio", "lora", "merge", *(f"{f}:{w:g}" for f, w in sources)]
    argv += ["--concat"] if concat else []
    argv += ["--rank", str(rank)] if rank is not None else []
    argv += ["--dynamic", dyn] if dyn else []
    argv += ["--out", str(target), "--precision", precision] + (["--overwrite"] if overwrite else [])
    from trainer.lora.tools.svd import parse_dynamic
    result = merge_loras(sources, target, rank=rank, dynamic=parse_dynamic(dyn), concat=bool(concat),
                         save_precision=precision, overwrite=bool(overwrite),
                         progress=progress_cb(progress, "merge"))
    return tool_summary(state, result), shown(argv), module_rows(result)


def run_extract(state: AppState, tuned, base, rank, conv_rank, threshold, mode, value, precision, out, overwrite,
                progress=None):
    tuned_src = model_source(state, tuned, "--tuned")
    base_src = model_source(state, base, "--base")
    rank = whole(rank, "--rank")
    if rank is None:
        raise UserError("--rank: give the rank of the extracted modules")
    conv = whole(conv_rank, "--conv-rank")
    thr = EXTRACT_THRESHOLD if threshold is None or str(threshold).strip() == "" else float(threshold)
    dyn = dynamic_text(mode, value)
    target = output_path(state, out, state.tools_out / f"{Path(tuned_src).stem}-extracted-r{rank}.safetensors")
    argv = ["lorastudio", "lora", "extract", "--tuned", tuned_src, "--base", base_src, "--rank", str(rank)]
    argv += ["--conv-rank", str(conv)] if conv is not None else []
    argv += ["--threshold", f"{thr:g}"] if thr != EXTRACT_THRESHOLD else []
    argv += ["--dynamic", dyn] if dyn else []
    argv += ["--out", str(target), "--precision", precision] + (["--overwrite"] if overwrite else [])
    from trainer.lora.tools.extract import extract_lora
    from trainer.lora.tools.svd import parse_dynamic
    if progress is not None:
        progress(0.0, desc="loading the models ...")
    result = extract_lora(tuned_src, base_src, target, rank=rank, conv_rank=conv, threshold=thr,
                          dynamic=parse_dynamic(dyn), save_precision=precision, overwrite=bool(overwrite),
                          progress=progress_cb(progress, "extract"))
    return tool_summary(state, result), shown(argv), module_rows(result)


def run_bake(state: AppState, base, loras, dtype, family, diffusers, allow_partial, out, overwrite, progress=None):
    base_src = model_source(state, base, "--model")
    lines = [weighted_line(state, line) for line in lora_lines(loras)]
    if not lines:
        raise UserError("bake: add at least one LoRA (one per line: FILE or FILE:WEIGHT)")
    from trainer.generate.prompt_syntax import parse_lora_arg
    stem = "+".join([Path(base_src).stem, *(Path(parse_lora_arg(x).name).stem for x in lines)])[:100]
    target = output_path(state, out, state.baked_out / (stem if diffusers else f"{stem}.safetensors"))
    argv = ["lorastudio", "lora", "bake", "--model", base_src]
    argv += [a for x in lines for a in ("--lora", x)]
    argv += ["--diffusers" if diffusers else "--out", str(target)]
    argv += ["--dtype", dtype] + (["--family", family] if family != FAMILY_CHOICES[0] else [])
    argv += (["--overwrite"] if overwrite else []) + (["--allow-partial"] if allow_partial else [])
    from app.cli.lora_bake import summary_lines
    from trainer.lora.tools.bake import bake
    result = bake(base_src, lines, target, dtype=dtype, diffusers=bool(diffusers), overwrite=bool(overwrite),
                  family=family, allow_partial=bool(allow_partial),
                  progress=None if progress is None else (
                      lambda stage, done, total: progress((done, total), desc=stage)))
    text = summary_lines(result, rel(result.path, state.root))
    rows = frame([[b.path.name, f"{b.te_weight:g}", f"{b.unet_weight:g}", b.modules] for b in result.loras],
                 ["LoRA", "text-encoder weight", "UNet weight", "modules fused"])
    return text[0], shown(argv), rows


# ------------------------------------------------------------------------------------------------ the tab


def _run_row(prefix: str, reg: Registry, label: str):
    """Run button, Overwrite box and the result/error line beside them; then the command and the table."""
    r = reg.add
    with gr.Row(equal_height=False):
        button = r(f"tools.{prefix}.run", gr.Button(label, variant="primary", scale=0, elem_id=f"t-{prefix}-run"))
        overwrite = r(f"tools.{prefix}.overwrite", gr.Checkbox(label="Overwrite an existing output", scale=0,
                                                               elem_id=f"t-{prefix}-overwrite"))
        status = r(f"tools.{prefix}.status", gr.Markdown("", elem_id=f"t-{prefix}-status",
                                                         elem_classes="ls-beside"))
    command = r(f"tools.{prefix}.command", gr.Code(label="The same run from a shell", language="shell", lines=1,
                                                   elem_id=f"t-{prefix}-command"))
    with gr.Accordion("Per module", open=False):
        table = r(f"tools.{prefix}.modules", gr.Dataframe(interactive=False, elem_id=f"t-{prefix}-modules",
                                                          max_height=260))
    return button, overwrite, status, command, table


def _lora_pick(state: AppState, reg: Registry, key: str, label: str):
    return reg.add(key, gr.Dropdown(choices=state.lora_choices(str(state.default_lora_dir)), value=None,
                                    allow_custom_value=True, label=label, scale=4,
                                    elem_id="t-" + key.split(".", 1)[1].replace(".", "-")))


def _model_pick(state: AppState, reg: Registry, key: str, label: str, info: str):
    return reg.add(key, gr.Dropdown(choices=state.model_choices(), value=None, allow_custom_value=True, label=label,
                                    info=info, elem_id="t-" + key.split(".", 1)[1].replace(".", "-")))


def _dynamic(reg: Registry, prefix: str):
    mode = reg.add(f"tools.{prefix}.dynamic", gr.Dropdown(
        choices=list(DYNAMIC_CHOICES), value=DYNAMIC_OFF, label="Dynamic rank · --dynamic",
        info="sv_fro: share of the Frobenius norm kept; sv_cumulative: of the sum of singular values; sv_ratio: "
             "largest / smallest kept. The rank then caps it.", elem_id=f"t-{prefix}-dynamic"))
    value = reg.add(f"tools.{prefix}.dynamic_value", gr.Number(value=None, label="Dynamic value",
                                                               info="set to a typical value when a rule is picked",
                                                               elem_id=f"t-{prefix}-dynamic-value"))
    mode.change(lambda m: gr.skip() if m == DYNAMIC_OFF else typical_dynamic_value(m), [mode], [value],
                show_progress="hidden", queue=False)
    return mode, value


def _precision(reg: Registry, prefix: str):
    return reg.add(f"tools.{prefix}.precision", gr.Dropdown(
        choices=list(PRECISIONS), value=PRECISIONS[0], label="Precision · --precision",
        info="dtype of the written factors (alpha is always float32)", elem_id=f"t-{prefix}-precision"))


def _out_box(reg: Registry, prefix: str, default_text: str):
    return reg.add(f"tools.{prefix}.out", gr.Textbox(label="Output · --out", placeholder=default_text,
                                                     info="empty: " + default_text, max_lines=1,
                                                     elem_id=f"t-{prefix}-out"))


def create_tools_tab(state: AppState, reg: Registry) -> None:
    r = reg.add
    gr.Markdown("Tools on LoRA files, the ones `lorastudio lora` runs. Each output is read back and checked before "
                "it gets its name, and its metadata says how it was made.")
    lora_pickers, model_pickers = [], []
    with gr.Tabs():
        with r("tools.tab_resize", gr.Tab("Resize", id="tools-resize")):
            gr.Markdown("A LoRA at a lower rank (or a rank per module chosen by a dynamic rule): per module the best "
                        "delta of that rank. A rank at or above the file's keeps it exactly.")
            with gr.Row(equal_height=False):
                rs_lora = _lora_pick(state, reg, "tools.resize.lora", "LoRA (from outputs/ and the LoRA folder)")
                lora_pickers.append(rs_lora)
            with gr.Row():
                rs_rank = r("tools.resize.rank", gr.Number(value=DEFAULT_RANK, precision=0, label="Rank · --rank",
                                                           info="with a dynamic rule: the largest",
                                                           elem_id="t-resize-rank"))
                rs_mode, rs_value = _dynamic(reg, "resize")
                rs_prec = _precision(reg, "resize")
            rs_out = _out_box(reg, "resize", "outputs/lora-tools/<name>-r<rank>.safetensors")
            rs_btn, rs_ow, rs_status, rs_cmd, rs_table = _run_row("resize", reg, "Resize")
        with r("tools.tab_merge", gr.Tab("Merge", id="tools-merge")):
            gr.Markdown("Several LoRAs, each at its weight, as one: per module the SVD of the weighted sum cut to "
                        "the rank (exact at the summed rank), or **concat** (the ranks stacked, always exact).")
            with gr.Row(equal_height=False):
                mg_pick = _lora_pick(state, reg, "tools.merge.pick", "LoRA to add")
                lora_pickers.append(mg_pick)
                mg_add = gr.Button("Add", size="md", scale=0, elem_id="t-merge-add")
                mg_add_status = r("tools.merge.add_status", gr.Markdown("", elem_id="t-merge-add-status",
                                                                        elem_classes="ls-beside"))
            mg_loras = r("tools.merge.loras", gr.Textbox(label="LoRAs and weights", lines=3, elem_id="t-merge-loras",
                                                         info="one per line: FILE or FILE:WEIGHT (default 1)"))
            with gr.Row():
                mg_concat = r("tools.merge.concat", gr.Checkbox(label="concat (exact; rank and dynamic unused)",
                                                                elem_id="t-merge-concat"))
                mg_rank = r("tools.merge.rank", gr.Number(value=DEFAULT_RANK, precision=0, label="Rank · --rank",
                                                          elem_id="t-merge-rank"))
                mg_mode, mg_value = _dynamic(reg, "merge")
                mg_prec = _precision(reg, "merge")
            mg_out = _out_box(reg, "merge", "outputs/lora-tools/<a>+<b>-merged.safetensors")
            mg_btn, mg_ow, mg_status, mg_cmd, mg_table = _run_row("merge", reg, "Merge")
        with r("tools.tab_extract", gr.Tab("Extract", id="tools-extract")):
            gr.Markdown("The LoRA whose delta best approximates a fine-tuned model minus its base (UNet and text "
                        "encoders); layers that differ by less than the threshold are left out.")
            with gr.Row():
                ex_tuned = _model_pick(state, reg, "tools.extract.tuned", "Fine-tuned model · --tuned",
                                       "a .safetensors checkpoint, a diffusers folder or a hub id")
                ex_base = _model_pick(state, reg, "tools.extract.base", "Base model · --base", "the model it was "
                                      "tuned from")
                model_pickers += [ex_tuned, ex_base]
            with gr.Row():
                ex_rank = r("tools.extract.rank", gr.Number(value=DEFAULT_RANK, precision=0, label="Rank · --rank",
                                                            elem_id="t-extract-rank"))
                ex_conv = r("tools.extract.conv_rank", gr.Number(value=None, precision=0,
                                                                 label="Conv rank · --conv-rank",
                                                                 info="empty: the rank; 0 leaves 3x3 convs out",
                                                                 elem_id="t-extract-conv-rank"))
                ex_thr = r("tools.extract.threshold", gr.Number(value=EXTRACT_THRESHOLD, label="Threshold · "
                                                                "--threshold", info="||TUNED - BASE|| / ||BASE|| "
                                                                "below which a layer is left out",
                                                                elem_id="t-extract-threshold"))
            with gr.Row():
                ex_mode, ex_value = _dynamic(reg, "extract")
                ex_prec = _precision(reg, "extract")
            ex_out = _out_box(reg, "extract", "outputs/lora-tools/<tuned>-extracted-r<rank>.safetensors")
            ex_btn, ex_ow, ex_status, ex_cmd, ex_table = _run_row("extract", reg, "Extract")
        with r("tools.tab_bake", gr.Tab("Bake", id="tools-bake")):
            gr.Markdown("LoRAs fused into a base model, written as one checkpoint (the layout A1111, ComfyUI and "
                        "this app read) or a diffusers folder. It appears in the base-model lists.")
            bk_base = _model_pick(state, reg, "tools.bake.base", "Base model · --model",
                                  "a diffusers folder, a .safetensors checkpoint or a hub id")
            model_pickers.append(bk_base)
            with gr.Row(equal_height=False):
                bk_pick = _lora_pick(state, reg, "tools.bake.pick", "LoRA to add")
                lora_pickers.append(bk_pick)
                bk_add = gr.Button("Add", size="md", scale=0, elem_id="t-bake-add")
                bk_add_status = r("tools.bake.add_status", gr.Markdown("", elem_id="t-bake-add-status",
                                                                       elem_classes="ls-beside"))
            bk_loras = r("tools.bake.loras", gr.Textbox(
                label="LoRAs and weights", lines=3, elem_id="t-bake-loras",
                info="one per line: FILE, FILE:WEIGHT or FILE:TE:UNET (text-encoder and UNet weights)"))
            with gr.Row():
                bk_dtype = r("tools.bake.dtype", gr.Dropdown(choices=list(BAKE_DTYPES), value="fp16",
                                                             label="dtype · --dtype", elem_id="t-bake-dtype"))
                bk_family = r("tools.bake.family", gr.Dropdown(choices=list(FAMILY_CHOICES),
                                                               value=FAMILY_CHOICES[0], label="Family · --family",
                                                               elem_id="t-bake-family"))
                bk_diff = r("tools.bake.diffusers", gr.Checkbox(label="a diffusers folder instead of one file",
                                                                elem_id="t-bake-diffusers"))
                bk_partial = r("tools.bake.allow_partial", gr.Checkbox(
                    label="allow LoRAs with keys that match no layer (skipped)", elem_id="t-bake-allow-partial"))
            bk_out = _out_box(reg, "bake", "outputs/baked/<base>+<loras>.safetensors")
            bk_btn, bk_ow, bk_status, bk_cmd, bk_table = _run_row("bake", reg, "Bake")

    # ---- wiring (explicit arguments: gradio hands gr.Progress only to a positional parameter)
    @guarded(3)
    @in_gui_words
    def on_resize(lora, rank, mode, value, precision, out, overwrite, progress=gr.Progress()):
        return run_resize(state, lora, rank, mode, value, precision, out, overwrite, progress)
    rs_btn.click(on_resize, [rs_lora, rs_rank, rs_mode, rs_value, rs_prec, rs_out, rs_ow],
                 [rs_status, rs_cmd, rs_table], concurrency_id="tools")

    @guarded(3)
    @in_gui_words
    def on_merge(loras, concat, rank, mode, value, precision, out, overwrite, progress=gr.Progress()):
        return run_merge(state, loras, concat, rank, mode, value, precision, out, overwrite, progress)
    mg_btn.click(on_merge, [mg_loras, mg_concat, mg_rank, mg_mode, mg_value, mg_prec, mg_out, mg_ow],
                 [mg_status, mg_cmd, mg_table], concurrency_id="tools")

    @guarded(3)
    @in_gui_words
    def on_extract(tuned, base, rank, conv, thr, mode, value, precision, out, overwrite, progress=gr.Progress()):
        return run_extract(state, tuned, base, rank, conv, thr, mode, value, precision, out, overwrite, progress)
    ex_btn.click(on_extract, [ex_tuned, ex_base, ex_rank, ex_conv, ex_thr, ex_mode, ex_value, ex_prec, ex_out, ex_ow],
                 [ex_status, ex_cmd, ex_table], concurrency_id="tools")

    @guarded(3)
    @in_gui_words
    def on_bake(base, loras, dtype, family, diffusers, partial, out, overwrite, progress=gr.Progress()):
        return run_bake(state, base, loras, dtype, family, diffusers, partial, out, overwrite, progress)
    bk_btn.click(on_bake, [bk_base, bk_loras, bk_dtype, bk_family, bk_diff, bk_partial, bk_out, bk_ow],
                 [bk_status, bk_cmd, bk_table], concurrency_id="tools")

    mg_add.click(lambda text, pick: add_line(state, text, pick), [mg_loras, mg_pick], [mg_loras, mg_add_status],
                 show_progress="hidden")
    bk_add.click(lambda text, pick: add_line(state, text, pick), [bk_loras, bk_pick], [bk_loras, bk_add_status],
                 show_progress="hidden")

    # the pickers refresh when the tab is opened and when a training job ends (LoRAs from the Generate tab's
    # LoRA folder, models including the checkpoints baked here)
    @reg.after_build
    def wire():
        lora_dir = reg.get("generate.lora_dir")
        targets = [*lora_pickers, *model_pickers]

        def on_refresh(lora_dir_now):
            loras, models = state.lora_choices(lora_dir_now), state.model_choices()
            return (*[gr.update(choices=loras)] * len(lora_pickers), *[gr.update(choices=models)] * len(model_pickers))
        reg.get("tab.tools").select(on_refresh, [lora_dir], targets, show_progress="hidden")
        reg.get("train.finished").change(on_refresh, [lora_dir], targets, show_progress="hidden")
