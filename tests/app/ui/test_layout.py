"""The page's structure without a browser: one module per tab, the registry, controls from the one description of
each setting, and the fixes a new user needed (labels, short grid labels, the Samples note, the LoRA list after a
job, GUI words in dataset messages)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from trainer import config as C
from trainer.errors import UserError
from trainer.generate import settings as S

REPO = Path(__file__).resolve().parents[3]
UI = REPO / "app" / "ui"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from app.ui.app import build_blocks
    from app.ui.state import AppState
    state = AppState(tmp_path_factory.mktemp("root"))
    app, reg = build_blocks(state)
    return state, app, reg


def test_every_tab_is_its_own_module_and_app_py_is_short():
    for tab in ("dataset", "train", "generate", "presets", "tools"):
        tree = ast.parse((UI / "tabs" / f"{tab}.py").read_text())
        assert f"create_{tab}_tab" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, tab
    assert len((UI / "app.py").read_text().splitlines()) < 160


def test_no_module_level_mutable_state_in_the_web_app():
    """What the app knows lives in AppState (made per app); no CTX/JOBS/GEN/_DEMO module globals."""
    for path in UI.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for t in targets:
                if not isinstance(t, ast.Name) or node.value is None:
                    continue
                assert not isinstance(node.value, (ast.Dict, ast.List, ast.Set, ast.Call)) or t.id in (
                    "log",), f"{path.relative_to(REPO)}: module-level {t.id}"


def test_registry_holds_every_control_by_tab_and_name(built):
    _, _, reg = built
    for key in ("dataset.folder", "dataset.summary", "dataset.report", "train.data.dir", "train.lora.rank",
                "train.error.train.max_steps", "train.finished", "generate.lora", "generate.add_status",
                "generate.steps", "generate.sampler", "generate.clip_skip", "presets.lora", "page.demo_banner",
                "tab.generate"):
        assert key in reg, key
    assert reg.get("train.data.dir").elem_id == "f-data-dir"
    assert len(reg.keys("train.")) > 2 * len(C.FIELDS)  # a control and an error line per config field
    with pytest.raises(KeyError, match="no control registered as 'train.nope'"):
        reg.get("train.nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("dataset.folder", object())


def test_two_apps_do_not_share_state(tmp_path):
    from app.ui.app import build_blocks
    from app.ui.state import AppState
    a, b = AppState(tmp_path / "a"), AppState(tmp_path / "b")
    a.remember_folder(str(tmp_path))
    build_blocks(a), build_blocks(b)
    assert b.chosen == [] and a.jobs is not b.jobs and a.gen is not b.gen


def test_labels_are_the_words_users_know_with_the_key_beside_them(built):
    from app.ui.form import label_for
    assert label_for(C.FIELDS["lora.rank"]) == "Network dim (rank) · lora.rank"
    assert all(fi.label for fi in C.FIELDS.values())  # every schema field has one
    _, _, reg = built
    assert reg.get("train.lora.rank").label == "Network dim (rank) · lora.rank"
    assert reg.get("train.train.max_steps").label == "Max train steps · train.max_steps"
    assert reg.get("train.data.dir").label == "Image folder · data.dir"
    assert "N_name" in reg.get("dataset.folder").info


def test_generate_controls_come_from_the_generation_settings(built):
    _, _, reg = built
    G = S.GENERATE_FIELDS
    steps = reg.get("generate.steps")
    assert (steps.minimum, steps.maximum, steps.value) == (G["steps"].min, G["steps"].max, G["steps"].default)
    width = reg.get("generate.width")
    assert width.step == G["width"].multiple_of and width.maximum == G["width"].max
    assert [c[1] for c in reg.get("generate.sampler").choices] == list(G["sampler"].choices)
    assert reg.get("generate.batch").maximum == G["batch"].max
    assert reg.get("generate.clip_skip").maximum == G["clip_skip"].max
    assert reg.get("generate.seed").maximum == G["seed"].max
    from datasets_tools.captioners import CAPTIONERS
    assert [c[1] for c in reg.get("dataset.captioner").choices] == list(CAPTIONERS)


def test_generate_settings_are_checked_with_their_own_limits():
    from app.ui.tabs.generate import gen_kwargs
    kw = gen_kwargs(20, 7, 64, 64, "ddim", 2, 1)
    assert kw == dict(steps=20, guidance_scale=7.0, width=64, height=64, sampler="ddim", batch=2, clip_skip=1)
    with pytest.raises(UserError, match="above the maximum"):
        gen_kwargs(S.GENERATE_FIELDS["steps"].max + 1, 7, 64, 64, "ddim", 1, 1)
    with pytest.raises(UserError, match="not a multiple of 8"):
        gen_kwargs(20, 7, 60, 64, "ddim", 1, 1)
    with pytest.raises(UserError, match="not one of"):
        gen_kwargs(20, 7, 64, 64, "plms", 1, 1)


def test_the_web_app_has_no_literal_limits_choices_or_hub_id_rule():
    """Limits and choices come from FieldInfo / CAPTIONERS / trainer.generate.settings; one hub-id rule."""
    for path in UI.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg in ("minimum", "maximum"):
                assert not isinstance(node.value, (ast.Constant, ast.UnaryOp)), f"{path.name}: {node.arg} literal"
            if isinstance(node, ast.keyword) and node.arg == "choices":
                assert not isinstance(node.value, (ast.List, ast.Tuple)), f"{path.name}: literal choices"
            if isinstance(node, ast.FunctionDef):
                assert node.name not in ("_looks_like_hub_id", "_user_error", "has_checkpoints"), path.name


def test_samples_note_says_when_the_first_sample_comes():
    from app.ui.tabs.train import samples_note
    assert samples_note("4", "10") == "First sample at step 4 (every 4 steps)."
    assert samples_note("0", "10").startswith("Samples are off")
    assert "after the last step" in samples_note("50", "10")
    assert samples_note("0", "10", "2") == "Samples at the end of every 2 epoch(s), and after the last step."
    assert samples_note("4", "10", "1").endswith("also at the end of every 1 epoch(s).")


def test_samples_show_as_one_grid_per_save_newest_first(tmp_path):
    """The Train tab's gallery: the samples of one step side by side in one picture, the latest save first."""
    from PIL import Image

    from app.ui.tabs.train import GRID_CELL_PX, sample_grids
    samples = []
    for step, n in ((5, 3), (10, 3)):
        for i in range(n):
            p = tmp_path / f"step{step:08d}-{i:02d}.png"
            Image.new("RGB", (64, 96 if i == 0 else 64), (40 * i, 100, step * 20)).save(p)
            samples.append((str(p), f"step {step}: prompt {i}"))
    grids = sample_grids(samples)
    assert [caption for _, caption in grids] == ["step 10 · 3 sample(s)", "step 5 · 3 sample(s)"]
    image = grids[0][0]
    assert image.width >= 3 * GRID_CELL_PX and image.height >= GRID_CELL_PX
    # the step's three pictures sit in one row, in prompt order (the colours tell them apart)
    row = image.height - GRID_CELL_PX // 2
    left = image.width - 3 * GRID_CELL_PX
    colours = [image.getpixel((left + k * GRID_CELL_PX + GRID_CELL_PX // 2, row)) for k in range(3)]
    assert colours == [(0, 100, 200), (40, 100, 200), (80, 100, 200)]


def test_a_finished_job_refreshes_the_lora_list(built, tmp_path):
    """The tick counts a job that ended (train.finished); the Generate tab's LoRA list is refreshed on that."""
    import textwrap
    state, app, reg = built
    from app.ui.tabs.train import JOB_OUTPUT_KEYS, job_outputs
    at = JOB_OUTPUT_KEYS.index("train.finished")
    run = tmp_path / "run"
    fake = tmp_path / "fake.py"
    fake.write_text(textwrap.dedent("""
        import json, sys, time
        from pathlib import Path
        ev = open(Path(sys.argv[1]) / "events.jsonl", "a")
        ev.write(json.dumps({"type": "run_started", "max_steps": 1, "start_step": 0}) + "\\n"); ev.flush()
        time.sleep(1.0)
        ev.write(json.dumps({"type": "run_ended", "status": "completed", "step": 1}) + "\\n"); ev.flush()
    """))
    state.jobs.start(run, "preset_version = 1\n", argv=[sys.executable, str(fake), str(run)], cwd=tmp_path)
    out = job_outputs(state, {}, 0, force=True)
    seen = out[-1]
    assert seen["state"] in ("starting", "running")
    state.jobs.job.proc.wait(30)
    out = job_outputs(state, seen, 0)
    assert out[-1]["state"] == "completed" and out[at] == 1
    again = job_outputs(state, out[-1], 1, force=True)
    assert again[at] != 2  # counted once
    finished, pick = reg.get("train.finished"), reg.get("generate.lora")
    deps = app.config["dependencies"]
    assert any([finished._id, "change"] in [list(t) for t in d["targets"]] and pick._id in d["outputs"]
               for d in deps)


def test_dataset_messages_point_to_the_pages_buttons():
    from app.ui.tabs.dataset import gui_words
    text = "undo replace: 1 caption(s) changed (backup: x; undo with `lorastudio captions DIR --undo`)"
    assert "Undo last edit" in gui_words(text) and "lorastudio captions" not in gui_words(text)


def test_every_handler_gets_its_progress_bar_and_its_outputs(built):
    """gradio hands gr.Progress only to a positional parameter (after *args it stays a dead default), and a guarded
    handler's error path returns as many values as the event has outputs."""
    import inspect

    import gradio as gr
    _, app, _ = built
    for block_fn in app.fns.values():
        fn = getattr(block_fn, "fn", None)
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if isinstance(p.default, gr.Progress):
                assert p.kind is p.POSITIONAL_OR_KEYWORD, f"{fn.__name__}: progress after *args"
        n = getattr(fn, "__wrapped_outputs__", None)
        if n is not None:
            assert n == len(block_fn.outputs), f"{fn.__name__}: guarded({n}) but {len(block_fn.outputs)} outputs"
