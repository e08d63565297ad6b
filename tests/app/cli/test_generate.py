"""`lorastudio generate / grid / inspect` in-process: outputs, PNG parameters, and one-line errors with no file written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from app.cli import main
from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401 (autouse: one torch thread)

IMG = ["--steps", "2", "--width", "64", "--height", "64", "--cfg", "5"]




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_loras")
    loras = d / "loras"
    loras.mkdir()
    a = make_lora(loras / "my-style.safetensors", "sd1", 1, output_name="zxq")
    b = make_lora(loras / "character.safetensors", "sd1", 2)
    xl = make_lora(d / "xl.safetensors", "sdxl", 3)
    bad = d / "corrupt.safetensors"
    bad.write_bytes(a.read_bytes()[:200])
    return {"a": a, "b": b, "xl": xl, "bad": bad, "dir": loras}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_two_loras_and_tags(tiny_sd1_dir, files, tmp_path, capsys):
    out = tmp_path / "castle.png"
    code, stdout, err = _run(capsys, "generate", "--model", tiny_sd1_dir, "--lora", f"{files['a']}:0.8",
                             "--lora", f"{files['b']}:0.6", "--prompt", "zxq style, a castle", "--seed", "1",
                             "--negative", "blurry", *IMG, "--out", out)
    assert code == 0, err
    params = Image.open(out).info["parameters"]
    assert params.startswith("zxq style, a castle <lora:my-style:0.8> <lora:character:0.6>\nNegative prompt: blurry\n")
    assert "Seed: 1" in params and "Lora hashes: \"my-style: " in params and "Lora mode: fused" in params
    # the same image from prompt tags with --lora-dir, unfused this time, as a batch of 2
    out2 = tmp_path / "tags.png"
    code, stdout, err = _run(capsys, "generate", "--model", tiny_sd1_dir, "--lora-dir", files["dir"], "--no-fuse",
                             "--prompt", "<lora:my-style:0.8> <lora:character:0.6> zxq style, a castle",
                             "--seed", "1", "--negative", "blurry", "--batch", "2", *IMG, "--out", out2)
    assert code == 0, err
    first, second = tmp_path / "tags-1.png", tmp_path / "tags-2.png"
    assert first.is_file() and second.is_file() and not out2.exists()
    import numpy as np
    diff = np.abs(np.asarray(Image.open(first), dtype=int) - np.asarray(Image.open(out), dtype=int)).max()
    assert diff <= 2
    assert "Seed: 2" in Image.open(second).info["parameters"]


def test_grid_weight_seed(tiny_sd1_dir, files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, err = _run(capsys, "grid", "--model", tiny_sd1_dir, "--lora-dir", files["dir"], "--lora",
                             "my-style", "--weights", "0,0.5,1", "--seeds", "1,2", "--prompt", "a castle", *IMG,
                             "--out", out)
    assert code == 0, err
    assert "2 rows x 3 columns" in stdout
    img = Image.open(out)
    assert img.size[0] > 3 * 64 and img.size[1] > 2 * 64
    assert 'Grid: "rows seed [1; 2], columns my-style weight [0; 0.5; 1]"' in img.info["parameters"]


def test_grid_checkpoints_and_prompts(tiny_sd1_dir, files, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for n in ("r-step00000002", "r-step00000004", "r"):
        shutil.copy(files["a"], run / f"{n}.safetensors")
    out = tmp_path / "ck.png"
    code, stdout, err = _run(capsys, "grid", "--model", tiny_sd1_dir, "--checkpoints", run, "--weights", "0.5,1",
                             "--prompt", "a castle", *IMG, "--out", out)
    assert code == 0, err
    assert "step 2; step 4; r (final)" in Image.open(out).info["parameters"]
    out = tmp_path / "pl.png"
    code, stdout, err = _run(capsys, "grid", "--model", tiny_sd1_dir, "--prompts", "a castle", "a dog", "--lora",
                             f"{files['a']}:0.7", "--lora", files["b"], *IMG, "--out", out)
    assert code == 0, err
    assert "columns LoRA [base; my-style 0.7; character]" in Image.open(out).info["parameters"]


def test_inspect_text_and_json(files, capsys):
    code, out, err = _run(capsys, "inspect", files["a"])
    assert code == 0, err
    assert "base family: SD1" in out and "ss_output_name: zxq" in out and "addnet hash:" in out
    code, out, err = _run(capsys, "inspect", files["xl"], "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == "sdxl" and set(info["components"]) == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("case", ["missing", "corrupt", "weight", "tag", "family", "inspect_missing", "out_ext"])
def test_bad_input_is_one_line_and_writes_nothing(tiny_sd1_dir, files, tmp_path, capsys, case):
    out = tmp_path / "out.png"
    gen = ["generate", "--model", tiny_sd1_dir, "--prompt", "a castle", *IMG, "--out", out]
    argv, expect = {
        "missing": (gen + ["--lora", tmp_path / "nope.safetensors:0.5"], "not found"),
        "corrupt": (gen + ["--lora", f"{files['bad']}:0.5"], "corrupt.safetensors"),
        "weight": (gen + ["--lora", f"{files['a']}:abc"], "'abc'"),
        "tag": (gen[:-1] + [out, "--lora-dir", files["dir"], "--prompt", "<lora:nobody:1> a castle"],
                "'nobody' is not in the LoRA folder"),
        "family": (gen + ["--lora", files["xl"]], "SDXL"),
        "inspect_missing": (["inspect", tmp_path / "nope.safetensors"], "not found"),
        "out_ext": (gen[:-1] + [tmp_path / "out.jpg"], ".png"),
    }[case]
    code, stdout, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "Traceback" not in err
    assert not any(tmp_path.glob("*.png")) and not any(tmp_path.glob("*.tmp"))


def _over(fi):
    """A value just past a setting's limit, as command-line text."""
    if fi.choices:
        return "no-such-" + str(fi.choices[0])
    step = fi.multiple_of or 1
    return str(int(fi.max) + step) if fi.type is int else str(fi.max + 0.5)


def _settings_with_limits():
    from app.cli.generate import GENERATE_FLAGS, GRID_FLAGS
    from trainer.generate.settings import GENERATE_FIELDS, GRID_FIELDS
    out = [("generate", GENERATE_FLAGS[n], fi) for n, fi in GENERATE_FIELDS.items() if fi.max is not None or fi.choices]
    out += [("grid", GRID_FLAGS[n], fi) for n, fi in GRID_FIELDS.items() if fi.max is not None or fi.choices]
    return out


@pytest.mark.parametrize("command,flag,fi", _settings_with_limits(), ids=lambda v: getattr(v, "key", v))
def test_every_flag_has_the_settings_limit(tmp_path, capsys, command, flag, fi):
    """The flags are the settings: one past any limit (the GUI's too) is a one-line error naming the flag,
    before any file or model is touched."""
    out = tmp_path / "x.png"
    code, stdout, err = _run(capsys, command, "--model", tmp_path / "no-model", "--prompt", "p", flag, _over(fi),
                             "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: "), err
    assert not out.exists()


def test_batch_and_grid_limits_match_the_gui(files, tmp_path, capsys):
    from trainer.generate.limits import MAX_BATCH, MAX_GRID_CELLS
    from trainer.generate.settings import GENERATE_FIELDS, GRID_FIELDS
    assert GENERATE_FIELDS["batch"].max == MAX_BATCH == 16 and GRID_FIELDS["max_cells"].max == MAX_GRID_CELLS == 100
    code, _, err = _run(capsys, "generate", "--model", tmp_path / "m", "--prompt", "p", "--batch", "17")
    assert code == 2 and err.strip() == "error: --batch: 17 is above the maximum 16"
    code, _, err = _run(capsys, "generate", "--model", tmp_path / "m", "--prompt", "p", "--clip-skip", "13")
    assert code == 2 and err.strip() == "error: --clip-skip: 13 is above the maximum 12"
    weights = ",".join(str(i / 10) for i in range(11))
    grid = ["grid", "--model", tmp_path / "m", "--lora", files["a"], "--prompt", "p", "--weights", weights]
    code, _, err = _run(capsys, *grid, "--seeds", ",".join(map(str, range(10))), "--out", tmp_path / "g.png")
    assert code == 2 and err.strip() == "error: grid: 110 pictures is too many for one grid (at most 100)", err
    code, _, err = _run(capsys, *grid[:-2], "--weights", "0,1", "--seeds", "1,2,3", "--max-cells", "5")
    assert code == 2 and "6 pictures is too many for one grid (at most 5)" in err
    code, _, err = _run(capsys, *grid[:-2], "--seeds", "-3")
    assert code == 2 and "--seeds" in err and "below the minimum 0" in err
    assert not any(tmp_path.glob("*.png"))


def test_settings_command_lists_every_setting(capsys):
    from trainer.generate.settings import GENERATE_FIELDS, GRID_FIELDS
    code, out, _ = _run(capsys, "settings")
    assert code == 0
    for fi in [*GENERATE_FIELDS.values(), *GRID_FIELDS.values()]:
        assert fi.label in out
    assert "--cfg" in out and "[1..16]" in out
