"""`lorastudio lora resize | merge | extract` from the command line: what it prints, what it writes, and bad input
as one line with exit code 2 (also through a real `python -m app.cli` process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401
from trainer.lora.io import read_lora
from tests.fixtures.waits import HANG_S

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_loras")
    return (make_lora(d / "a.safetensors", "sd1", seed=1, rank=4),
            make_lora(d / "b.safetensors", "sd1", seed=2, rank=2, te=False))


def test_resize_prints_each_module_and_the_whole_file(loras, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert main(["lora", "resize", str(loras[0]), "--rank", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    n = len(read_lora(loras[0]).modules)
    module_lines = [x for x in lines if x.startswith("  ")]
    assert len(module_lines) == n and all("rank 4 -> 2, keeps " in x and x.endswith("%") for x in module_lines)
    assert lines[-1].startswith(f"wrote {out} ({n} modules, ") and "rank 2: " in lines[-1]
    assert "the whole file keeps " in lines[-1]
    assert {m.rank for m in read_lora(out).modules.values()} == {2}


def test_resize_dynamic(loras, tmp_path, capsys):
    out = tmp_path / "dyn.safetensors"
    assert main(["lora", "resize", str(loras[0]), "--dynamic", "sv_fro=0.8", "--out", str(out)]) == 0
    ranks = {m.rank for m in read_lora(out).modules.values()}
    assert ranks <= {1, 2, 3, 4} and len(ranks) > 1


def test_merge_svd_and_concat(loras, tmp_path, capsys):
    a, b = map(str, loras)
    out = tmp_path / "m.safetensors"
    assert main(["lora", "merge", f"{a}:0.8", f"{b}:0.5", "--rank", "6", "--out", str(out)]) == 0
    assert "wrote " in capsys.readouterr().out
    out2 = tmp_path / "c.safetensors"
    assert main(["lora", "merge", a, b, "--concat", "--out", str(out2)]) == 0
    assert {m.rank for m in read_lora(out2).modules.values()} == {4, 6}


def test_extract_of_a_model_from_itself_finds_nothing(tiny_sd1_dir, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code = main(["lora", "extract", "--tuned", str(tiny_sd1_dir), "--base", str(tiny_sd1_dir), "--rank", "4",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "differs from model in no layer" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("argv, says", [
    (["resize", "{a}", "--rank", "0", "--out", "{out}"], "--rank: the rank must be at least 1"),
    (["resize", "{a}", "--rank", "99", "--out", "{out}"], "--rank 99 is above the size of module "),
    (["resize", "{a}", "--dynamic", "sv_fro", "--out", "{out}"], "--dynamic: 'sv_fro' is not MODE=VALUE"),
    (["resize", "{missing}", "--rank", "2", "--out", "{out}"], "LoRA file not found: "),
    (["merge", "{a}", "{b}", "--out", "{out}"], "give --rank R"),
    (["merge", "{a}", "{xl}", "--rank", "2", "--out", "{out}"], "they cannot be merged"),
    (["resize", "{a}", "--rank", "2", "--out", "{exists}"], "exists; give --overwrite to replace it"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(loras, tmp_path, capsys, argv, says):
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"mine")
    names = {"a": loras[0], "b": loras[1], "out": tmp_path / "out.safetensors", "exists": exists,
             "missing": tmp_path / "missing.safetensors"}
    if "{xl}" in argv:
        names["xl"] = make_lora(tmp_path / "xl.safetensors", "sdxl", seed=1, rank=2)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["lora"] + [x.format(**names) for x in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file left
    assert exists.read_bytes() == b"mine"


def test_overwrite_replaces(loras, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    assert main(["lora", "resize", str(loras[0]), "--rank", "3", "--out", str(out), "--overwrite"]) == 0
    assert {m.rank for m in read_lora(out).modules.values()} == {3}


def test_lora_without_a_tool_shows_help(capsys):
    assert main(["lora"]) == 2
    out = capsys.readouterr().out
    assert "resize" in out and "merge" in out and "extract" in out


def test_a_real_process_prints_one_line_naming_the_bad_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    out = tmp_path / "out.safetensors"
    env = dict(os.environ, LORASTUDIO_NO_BAR="1")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "lora", "resize", str(bad), "--rank", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=HANG_S)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]
