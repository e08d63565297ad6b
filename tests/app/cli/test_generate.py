"""`lorastudio generate / grid / inspect` in-process: outputs, PNG parameters, and one-line errors with no file written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from app.cli import main
from tests.fixtures.lora_files import make_lora

IMG = ["--steps", "2", "--width", "64", "--height", "64", "--cfg", "5"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
