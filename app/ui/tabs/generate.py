"""The Generate tab: one long-lived Generator, LoRAs mixed at their weights, a weight x seed grid.

Every setting control is built from ``trainer.generate.settings`` (GENERATE_FIELDS, GRID_FIELDS) through
``app.ui.form``, and every value is checked with ``settings.check``, so the steps, size, CFG, sampler, seed,
images and grid limits are the ones ``lorastudio generate`` / ``grid`` enforce. The LoRA list refreshes when the
tab is opened and when a training job ends, so a LoRA just trained is there without pressing ↻.
"""

from __future__ import annotations

import html
import random
import time
from pathlib import Path

import gradio as gr

from trainer.errors import UserError
from trainer.generate import settings as S
from trainer.generate.inspection import file_summary
from trainer.generate.limits import LORA_WEIGHT_SLIDER

from app.ui.form import error_md, guarded, setting_control
from app.ui.registry import Registry
from app.ui.state import AppState, rel

#: The LoRA weight sliders' range and step (a slider needs ends; typed values outside it are refused by gradio).
WEIGHT_SLIDER = LORA_WEIGHT_SLIDER
#: The Generate tab's settings, in the order of its handlers' arguments.
SETTING_KEYS = ("steps", "guidance_scale", "width", "height", "sampler", "batch", "clip_skip")
ELEM_IDS = (("guidance_scale", "g-cfg"), ("clip_skip", "g-clip-skip"))  # the rest: g-<name>


def specs(rows: list[dict]):
    from trainer.generate.engine import LoraSpec
    out = []
    for r in rows:
        split = bool(r.get("split"))
        out.append(LoraSpec(r["path"], float(r["weight"]), te_weight=float(r["te"]) if split else None,
                            unet_weight=float(r["unet"]) if split else None, name=Path(r["path"]).stem))
    return out


def gen_kwargs(steps, cfg, width, height, sampler, batch, clip_skip) -> dict:
    """The request's settings checked with the generation settings' own limits (UserError names the setting)."""
    def whole(name, v):
        try:
            return S.check(name, int(v) if v is not None and float(v).is_integer() else v)
        except (TypeError, ValueError):
            raise UserError(f"{S.GENERATE_FIELDS[name].label}: expected a whole number, got {v!r}") from None
    return dict(steps=whole("steps", steps), guidance_scale=S.check("guidance_scale", float(cfg or 0)),
                width=whole("width", width), height=whole("height", height), sampler=S.check("sampler", sampler),
                batch=whole("batch", batch), clip_skip=whole("clip_skip", clip_skip))


def seed_of(seed) -> int:
    if seed is None or str(seed).strip() == "":
        raise UserError("seed: give a number (Random picks one)")
    return S.check("seed", int(float(seed)))


def save_generated(state: AppState, image, stem: str) -> str:
    from trainer.generate.engine import save_image
    day = time.strftime("%Y%m%d")
    out = state.outputs / "generated" / day / f"{time.strftime('%H%M%S')}-{stem}.png"
    n = 1
    while out.exists():
        out = out.with_name(f"{time.strftime('%H%M%S')}-{stem}-{n}.png")
        n += 1
    return str(save_image(image, out))


def create_generate_tab(state: AppState, reg: Registry, app: gr.Blocks) -> None:
    r = reg.add
    G, GR = S.GENERATE_FIELDS, S.GRID_FIELDS
    with gr.Row(equal_height=False):
        base = r("generate.base", gr.Dropdown(
            choices=state.model_choices(), value=None, allow_custom_value=True, scale=3, label="Base model",
            info="A diffusers folder, a .safetensors checkpoint or a hub id; it stays loaded between images",
            elem_id="g-base"))
        lora_dir = r("generate.lora_dir", gr.Textbox(value=str(state.default_lora_dir), label="LoRA folder", scale=2,
                                                     elem_id="g-lora-dir"))
    with gr.Row(equal_height=False):
        pick = r("generate.lora", gr.Dropdown(
            choices=state.lora_choices(str(state.default_lora_dir)), value=None, allow_custom_value=True,
            label="LoRA (from outputs/ and the LoRA folder)", scale=4, elem_id="g-pick"))
        refresh = gr.Button("↻", size="md", scale=0, min_width=40, elem_id="g-refresh")
        add = gr.Button("Add LoRA", size="md", scale=0, elem_id="g-add")
        add_status = r("generate.add_status", gr.Markdown("", elem_id="g-add-status", elem_classes="ls-beside"))
    rows_state = r("generate.rows", gr.State([]))
    rows_version = r("generate.rows_version", gr.State(0))
    w_min, w_max, w_step = WEIGHT_SLIDER

    @gr.render(inputs=[rows_state], triggers=[rows_version.change, app.load])
    def render_loras(rows):
        if not rows:
            gr.Markdown("No LoRA added: images come from the base model alone.", elem_id="g-no-lora")
        for i, row in enumerate(rows):
            with gr.Group(elem_id=f"g-lora-{i}"):
                with gr.Row(equal_height=False):
                    gr.Markdown(f"**{html.escape(Path(row['path']).name)}**  \n`{row['path']}`  \n"
                                f"{html.escape(file_summary(row['path']))}", elem_id=f"g-lora-name-{i}")
                    w = gr.Slider(w_min, w_max, value=row["weight"], step=w_step, label="weight", scale=3,
                                  elem_id=f"g-lora-weight-{i}", key=f"w-{row['id']}", interactive=True)
                    rm = gr.Button("Remove", size="md", scale=0, elem_id=f"g-lora-remove-{i}", key=f"rm-{row['id']}")
                with gr.Accordion("Advanced: separate text-encoder / UNet weights", open=False):
                    with gr.Row():
                        split = gr.Checkbox(value=row["split"], label="use separate weights",
                                            elem_id=f"g-lora-split-{i}", key=f"s-{row['id']}", interactive=True)
                        te = gr.Slider(w_min, w_max, value=row["te"], step=w_step, label="text encoder",
                                       elem_id=f"g-lora-te-{i}", key=f"te-{row['id']}", interactive=True)
                        un = gr.Slider(w_min, w_max, value=row["unet"], step=w_step, label="UNet",
                                       elem_id=f"g-lora-unet-{i}", key=f"un-{row['id']}", interactive=True)

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
                row_now = rows_now[idx]
                row_now["weight"] = value
                if row_now.get("split"):
                    return rows_now, gr.skip(), gr.skip()
                row_now["te"] = row_now["unet"] = value  # the split sliders start from the weight
                return rows_now, value, value
            w.change(set_weight, [w, rows_state], [rows_state, te, un], show_progress="hidden")
            split.change(setter("split"), [split, rows_state], [rows_state], show_progress="hidden")
            te.change(setter("te"), [te, rows_state], [rows_state], show_progress="hidden")
            un.change(setter("unet"), [un, rows_state], [rows_state], show_progress="hidden")

            def remove(rows_now, version, idx=i):
                return [x for j, x in enumerate(rows_now) if j != idx], version + 1
            rm.click(remove, [rows_state, rows_version], [rows_state, rows_version])

    with gr.Row():
        prompt = r("generate.prompt", gr.Textbox(
            label="Prompt", lines=2, scale=3, elem_id="g-prompt",
            info="<lora:name:weight> tags also work (names looked up in the LoRA folder)"))
        negative = r("generate.negative", gr.Textbox(label=G["negative"].label, lines=2, scale=2,
                                                     elem_id="g-negative"))
    with gr.Row():
        seed = r("generate.seed", setting_control(G["seed"], "g-seed", info="", min_width=140))
        dice = gr.Button("Random", size="md", scale=0, min_width=80, elem_id="g-seed-random")
        ids = dict(ELEM_IDS)
        controls = {k: r(f"generate.{k}", setting_control(G[k], ids.get(k, f"g-{k}"), info="", min_width=110))
                    for k in SETTING_KEYS}
        fused = r("generate.fused", gr.Checkbox(value=True, label="fused (merge into weights; off = adapters)",
                                                elem_id="g-fused"))
    with gr.Row(equal_height=False):
        go = gr.Button("Generate", variant="primary", elem_id="g-generate")
        grid_weights = r("generate.grid_weights", setting_control(
            GR["weights"], "g-grid-weights", label="Grid: weights of the first LoRA", info=""))
        grid_seeds = r("generate.grid_seeds", setting_control(GR["seeds"], "g-grid-seeds", label="Grid: seeds",
                                                              info=""))
        grid_btn = gr.Button(f"Grid (weight x seed, at most {GR['max_cells'].default} pictures)", elem_id="g-grid")
    status = r("generate.status", gr.Markdown("", elem_id="g-status"))
    out_gallery = r("generate.gallery", gr.Gallery(
        label="Images (click one for its parameters)", columns=4, height=460, object_fit="scale-down",
        elem_id="g-gallery"))
    params = r("generate.params", gr.Textbox(label="Parameters (A1111 format; also stored in the PNG)", lines=4,
                                             elem_id="g-params", buttons=["copy"]))
    params_list = r("generate.params_list", gr.State([]))

    # ---- wiring
    dice.click(lambda: random.randint(int(G["seed"].min), int(G["seed"].max)), None, [seed], show_progress="hidden")

    def on_add(path, rows, version):
        path = (path or "").strip()
        if not path:
            return gr.skip(), gr.skip(), error_md("pick a LoRA file first (or type its path)")
        p = Path(path).expanduser()
        if not p.is_file():
            return gr.skip(), gr.skip(), error_md(f"LoRA file not found: {path}")
        row = {"id": f"{time.time_ns()}", "path": str(p.resolve()), "weight": 1.0, "split": False, "te": 1.0,
               "unet": 1.0}
        return rows + [row], version + 1, f"added {p.name}"
    add.click(on_add, [pick, rows_state, rows_version], [rows_state, rows_version, add_status])

    setting_inputs = [controls[k] for k in SETTING_KEYS]
    gen_inputs = [base, lora_dir, prompt, negative, seed, *setting_inputs, fused, rows_state]

    @guarded(4)
    def on_generate(base_now, lora_dir_now, prompt_now, negative_now, seed_now, steps, cfg, width, height, sampler,
                    batch, clip_skip, fused_now, rows, progress=gr.Progress()):
        # (explicit arguments: gradio hands gr.Progress only to a positional parameter)
        kw = gen_kwargs(steps, cfg, width, height, sampler, batch, clip_skip)
        batch = kw.pop("batch")
        seed_value = seed_of(seed_now)
        with state.gen.lock:
            gen, note = state.gen.get(base_now, progress, lora_dir_now)
            gen.set_loras(specs(rows), mode="fused" if fused_now else "unfused")
            images = gen.generate(prompt_now or "", negative_now or "", seed=seed_value, batch_size=batch,
                                  on_step=lambda i, n: progress((i, n), desc="denoising", unit="steps"), **kw)
        items, texts = [], []
        for i, img in enumerate(images):
            path = save_generated(state, img, f"{seed_value + i}")
            p = img.info.get("parameters", "")
            items.append((path, p))
            texts.append(p)
        loras = ", ".join(f"{Path(x['path']).stem} {x['weight']:g}" for x in rows) or "no LoRA"
        text = (f"{len(images)} image(s), seed {seed_value}, {loras} ({'fused' if fused_now else 'adapters'}); "
                f"{note}. Saved in {rel(Path(items[0][0]).parent, state.root)}.")
        return text, items, texts[0] if texts else "", texts
    go.click(on_generate, gen_inputs, [status, out_gallery, params, params_list], concurrency_id="gen")

    @guarded(4)
    def on_grid(base_now, lora_dir_now, prompt_now, negative_now, seed_now, steps, cfg, width, height, sampler,
                batch, clip_skip, fused_now, rows, weights_text, seeds_text, progress=gr.Progress()):
        kw = gen_kwargs(steps, cfg, width, height, sampler, batch, clip_skip)
        kw.pop("batch")
        if not rows:
            raise UserError("add a LoRA first: the grid varies the first LoRA's weight")
        weights = S.parse_numbers(weights_text, "grid weights")
        seeds = [S.check("seed", s) for s in S.parse_numbers(seeds_text, "grid seeds", int)]
        S.check_grid_size(len(weights) * len(seeds))
        lora_specs = specs(rows)
        with state.gen.lock:
            gen, note = state.gen.get(base_now, progress, lora_dir_now)
            gen.set_loras(lora_specs[1:], mode="fused" if fused_now else "unfused")
            progress(0.0, desc=f"grid of {len(weights) * len(seeds)} images ...")
            res = gen.grid_weight_seed(lora_specs[0], weights, seeds, prompt_now or "", negative_now or "", **kw)
        name = Path(rows[0]["path"]).stem
        path = save_generated(state, res.image, "grid")
        title = f"{name}: weight (columns) x seed (rows)"
        text = (f"grid: {len(res.row_labels)} seeds x {len(res.col_labels)} weights of {name}; {note}. "
                f"Saved as {rel(path, state.root)}.")
        return text, gr.update(value=[(path, title)], selected_index=0), res.parameters, [res.parameters]
    grid_btn.click(on_grid, [*gen_inputs, grid_weights, grid_seeds], [status, out_gallery, params, params_list],
                   concurrency_id="gen")

    def on_select(texts, evt: gr.SelectData):
        i = evt.index if isinstance(evt.index, int) else 0
        return texts[i] if texts and i < len(texts) else gr.skip()
    out_gallery.select(on_select, [params_list], [params], show_progress="hidden")

    # The LoRA pickers (this tab's and the Presets tab's) refresh on ↻, when the tab is opened and when a
    # training job ends; the Presets tab is built after this one.
    @reg.after_build
    def wire():
        targets = [pick, reg.get("presets.lora"), base]

        def on_refresh(lora_dir_now):
            choices = state.lora_choices(lora_dir_now)
            return gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=state.model_choices())
        refresh.click(on_refresh, [lora_dir], targets)
        reg.get("tab.generate").select(on_refresh, [lora_dir], targets, show_progress="hidden")
        reg.get("train.finished").change(on_refresh, [lora_dir], targets, show_progress="hidden")
