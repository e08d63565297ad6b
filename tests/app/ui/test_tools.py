"""The Tools tab without a browser: each tool's handler on tiny files (result line, file on disk, per-module table),
the command it shows is the one the CLI runs, default outputs under outputs/, and bad input as one line."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401 (autouse: one torch thread)
from trainer.errors import UserError


@pytest.fixture(scope="module")
def app_state(tmp_path_factory):
    from app.ui.app import build_blocks
    from app.ui.state import AppState
    root = tmp_path_factory.mktemp("tools_root")
    state = AppState(root)
    (root / "loras").mkdir()
    make_lora(root / "loras" / "a.safetensors", "sd1", seed=1, rank=4)
    make_lora(root / "loras" / "b.safetensors", "sd1", seed=2, rank=2, te=False)
    app, reg = build_blocks(state)
    return state, app, reg


def handler(app, name: str):
    """The page's event handler of that name (the guarded one a click calls)."""
    fns = [f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == name]
    assert len(fns) == 1, name
    return fns[0]


def parsed(command: str):
    from app.cli import build_parser
    argv = shlex.split(command)
    assert argv[:2] == ["lorastudio", "lora"], command
    return build_parser().parse_args(argv[1:])


def test_resize_merge_and_the_command_they_equal(app_state):
    from trainer.lora.io import read_lora
    from app.ui.tabs.tools import run_merge, run_resize
    state, _, _ = app_state
    line, command, table = run_resize(state, "loras/a.safetensors", 2, "off", None, "fp16", "", False)
    out = state.tools_out / "a-r2.safetensors"
    n = len(read_lora(out).modules)
    assert line.startswith(f"wrote outputs/lora-tools/a-r2.safetensors ({n} modules, ") and f"rank 2: {n}" in line
    assert "the whole file keeps " in line
    args = parsed(command)
    assert (args.lora_command, args.file, args.rank, Path(args.out)) == ("resize", str(state.root / "loras/a.safetensors"), 2, out)
    assert list(table.columns) == ["module", "rank before", "rank after", "keeps"] and len(table) == n
    assert set(table["rank after"]) == {2}

    line, command, _ = run_merge(state, f"loras/a.safetensors:0.8\n{state.root}/loras/b.safetensors", True, 8,
                                 "sv_fro", 0.9, "fp32", "mine/m.safetensors", False)
    assert line.startswith("wrote mine/m.safetensors (") and (state.root / "mine/m.safetensors").is_file()
    args = parsed(command)
    assert args.concat and args.rank is None and args.dynamic is None and args.precision == "fp32"
    assert args.sources == [f"{state.root}/loras/a.safetensors:0.8", f"{state.root}/loras/b.safetensors:1"]
    assert {m.rank for m in read_lora(state.root / "mine/m.safetensors").modules.values()} == {4, 6}
    # a tool's LoRA is offered with the runs' LoRAs
    assert str(out) in [v for _, v in state.lora_choices(str(state.default_lora_dir))]


def test_bake_then_extract_gives_the_lora_back(app_state, tiny_sd1_dir):
    from app.ui.tabs.tools import run_bake, run_extract
    state, _, _ = app_state
    line, command, table = run_bake(state, str(tiny_sd1_dir), "loras/a.safetensors:1", "fp32", "auto", False,
                                    False, "", False)
    baked = state.baked_out / f"{tiny_sd1_dir.name}+a.safetensors"
    assert line.startswith(f"wrote checkpoint outputs/baked/{baked.name} (") and baked.is_file()
    assert "fp32, sd1" in line and list(table["LoRA"]) == ["a.safetensors"]
    args = parsed(command)
    assert args.lora == [f"{state.root}/loras/a.safetensors:1"] and Path(args.out) == baked and args.dtype == "fp32"
    # the checkpoint is a base model, not a LoRA
    assert str(baked) in state.model_choices()
    assert str(baked) not in [v for _, v in state.lora_choices(str(state.default_lora_dir))]

    line, command, table = run_extract(state, str(baked), str(tiny_sd1_dir), 4, None, None, "off", None, "fp32", "",
                                       False)
    assert line.startswith(f"wrote outputs/lora-tools/{baked.stem}-extracted-r4.safetensors (") and "rank 4: " in line
    args = parsed(command)
    assert (args.tuned, args.base, args.rank, args.conv_rank) == (str(baked), str(tiny_sd1_dir), 4, None)
    assert len(table) > 0


def test_bad_input_is_one_line_in_the_pages_words(app_state):
    state, app, _ = app_state
    on_resize = handler(app, "on_resize")
    exists = state.tools_out / "taken.safetensors"
    exists.parent.mkdir(parents=True, exist_ok=True)
    exists.write_bytes(b"mine")
    status, command, table = on_resize("loras/a.safetensors", 2, "off", None, "fp16", str(exists), False)
    assert status["value"].startswith("⚠️ ") and "exists; tick Overwrite to replace it" in status["value"]
    assert "\n" not in status["value"] and exists.read_bytes() == b"mine"
    cases = [
        (("", 2, "off", None, "fp16", "", False), "pick a LoRA file first"),
        (("loras/a.safetensors", 0, "off", None, "fp16", "", False), "--rank: the rank must be at least 1"),
        (("loras/a.safetensors", 99, "off", None, "fp16", "", False), "--rank 99 is above the size of module"),
        (("loras/a.safetensors", None, "sv_fro", None, "fp16", "", False), "--dynamic: give a value for sv_fro"),
        (("loras/nope.safetensors", 2, "off", None, "fp16", "", False), "LoRA file not found"),
    ]
    for args, says in cases:
        status = on_resize(*args)[0]["value"]
        assert says in status and "\n" not in status, (args, status)
    status = handler(app, "on_merge")("", False, 4, "off", None, "fp16", "", False)[0]["value"]
    assert "add at least one LoRA" in status
    status = handler(app, "on_bake")("", "loras/a.safetensors", "fp16", "auto", False, False, "", False)[0]["value"]
    assert "--model: choose a model" in status
    from app.ui.tabs.tools import dynamic_text
    with pytest.raises(UserError):
        dynamic_text("sv_ratio", "")
