"""`lorastudio lora bake` through ``app.cli.main``: the checkpoint written and the lines printed, one-line errors with
exit code 2 and no file written, and one real ``python -m app.cli`` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401 (autouse: one torch thread)
from tests.fixtures.waits import HANG_S

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bake_cli")
    return {"a": make_lora(d / "style_a.safetensors", "sd1", 1),
            "b": make_lora(d / "char_b.safetensors", "sd1", 2, rank=8, alpha=8.0),
            "xl": make_lora(d / "xl.safetensors", "sdxl", 3)}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _meta(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def test_bake_two_loras_into_a_checkpoint(tiny_sd1_dir, files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, stdout, err = _run(capsys, "lora", "bake", "--model", tiny_sd1_dir, "--lora", f"{files['a']}:0.8",
                             "--lora", f"{files['b']}:0.3:0.6", "--out", out)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote checkpoint {out} (") and "fp16, sd1, epsilon" in lines[0], stdout
    assert "style_a.safetensors at 0.8:" in lines[1] and "modules fused" in lines[1], stdout
    assert "char_b.safetensors at te 0.3 unet 0.6:" in lines[2], stdout
    meta = _meta(out)
    assert meta["lorastudio_tool"] == "bake" and meta["lorastudio_dtype"] == "fp16"
    assert [x["file"] for x in json.loads(meta["lorastudio_loras"])] == ["style_a.safetensors", "char_b.safetensors"]
    from trainer.models.single_file import load_single_file
    assert load_single_file(out).family == "sd1"


def test_bake_to_a_diffusers_folder_in_fp32(tiny_sd1_dir, files, tmp_path, capsys):
    folder = tmp_path / "merged"
    code, stdout, err = _run(capsys, "lora", "bake", "--model", tiny_sd1_dir, "--lora", files["a"],
                             "--diffusers", folder, "--dtype", "fp32")
    assert code == 0, err
    assert stdout.startswith(f"wrote diffusers folder {folder} (") and "fp32" in stdout
    assert (folder / "model_index.json").is_file() and (folder / "lorastudio_bake.json").is_file()


def test_bad_input_is_one_line_exit_2_and_no_file(tiny_sd1_dir, files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, stdout, err = _run(capsys, "lora", "bake", "--model", tiny_sd1_dir, "--lora", f"{files['xl']}:0.5",
                             "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "xl.safetensors" in lines[0], err
    assert "SDXL" in lines[0] and not out.exists() and list(tmp_path.iterdir()) == []

    out.write_bytes(b"an older file")
    code, _, err = _run(capsys, "lora", "bake", "--model", tiny_sd1_dir, "--lora", files["a"], "--out", out)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == b"an older file"
    code, _, err = _run(capsys, "lora", "bake", "--model", tiny_sd1_dir, "--lora", files["a"], "--out", out,
                        "--overwrite")
    assert code == 0, err
    assert _meta(out)["lorastudio_tool"] == "bake"


def test_a_weight_that_is_not_a_number(tiny_sd1_dir, files, tmp_path, capsys):
    code, _, err = _run(capsys, "lora", "bake", "--model", tiny_sd1_dir, "--lora", f"{files['a']}:strong",
                        "--out", tmp_path / "m.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "strong" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_real_subprocess_prints_one_line_naming_the_file(tiny_sd1_dir, tmp_path):
    lora = tmp_path / "broken.safetensors"
    lora.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    out = tmp_path / "merged.safetensors"
    args = ["lora", "bake", "--model", str(tiny_sd1_dir), "--lora", f"{lora}:0.8", "--out", str(out)]
    cmd = [sys.executable, "-m", "app.cli", *args]
    env = dict(os.environ, LORASTUDIO_NO_BAR="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.safetensors" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
