"""`lorastudio prepare/scan/captions` as a user runs them: subprocesses, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.datasets_tools.test_captioners import build_tiny_wd14, tiny_blip  # noqa: F401 (a fixture)
from tests.datasets_tools.unusable_files import assert_names_every_unusable, captions_of, make_unusable_folder
from tests.fixtures.dataset_images import make_dataset, read_only
from tests.fixtures.waits import HANG_S

REPO = Path(__file__).resolve().parents[3]


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=HANG_S)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def ds(tmp_path):
    return make_dataset(tmp_path / "ds")


def test_prepare_template_report_and_sheet(ds, tmp_path):
    r = run_cli("prepare", ds, "--captioner", "template", "--trigger", "zxq", "--report", tmp_path / "r.json",
                "--contact-sheet", tmp_path / "s.png", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert "Buckets" in r.stdout and "truncated" in r.stdout
    assert (ds / "c.txt").read_text() == "zxq, c"
    assert (ds / "10_zxq" / "a.txt").read_text() == "zxq, cat, cat, long_hair"  # kept: no --overwrite
    assert not (ds / "extra" / "empty.txt").exists()  # broken files get no caption
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["problems_by_file"]["extra/empty.jpg"] == ["empty"]
    assert (tmp_path / "s.png").stat().st_size > 0


def test_captions_edit_stats_undo(ds, tmp_path):
    before = (ds / "10_zxq" / "a.txt").read_text()
    r = run_cli("captions", ds, "--replace", "cat=>kitty", "--dedupe", "--add-prefix", "zxq style",
                "--stats", "--stats-json", tmp_path / "f.json")
    assert r.returncode == 0, r.stderr
    assert (ds / "10_zxq" / "a.txt").read_text() == "zxq style, zxq, kitty, long_hair"
    assert json.loads((tmp_path / "f.json").read_text())["10_zxq"]["zxq style"] == 2
    assert "kitty" in r.stdout
    r = run_cli("captions", ds, "--undo")
    assert r.returncode == 0, r.stderr
    assert (ds / "10_zxq" / "a.txt").read_text() == before
    assert not (ds / "c.txt").exists()


def test_missing_folder(tmp_path):
    assert_one_line_error(run_cli("prepare", tmp_path / "nope"), "not found", "nope")
    assert_one_line_error(run_cli("captions", tmp_path / "nope", "--stats"), "not found")


def test_bad_captioner_model_paths(ds, tmp_path):
    assert_one_line_error(run_cli("prepare", ds, "--captioner", "blip", "--model", tmp_path / "missing"),
                          "not found", "missing")
    (tmp_path / "notamodel").mkdir()
    assert_one_line_error(run_cli("prepare", ds, "--captioner", "wd14", "--model", tmp_path / "notamodel"),
                          "model.onnx")
    assert_one_line_error(run_cli("prepare", ds, "--captioner", "blip", "--model", tmp_path / "notamodel"),
                          "config.json")
    assert_one_line_error(run_cli("prepare", ds, "--captioner", "wd14"), "--model")
    assert not (ds / "c.txt").exists()  # nothing captioned


def test_unwritable_folder(ds):
    with read_only(ds / "extra"):
        r = run_cli("prepare", ds, "--captioner", "template")
    assert_one_line_error(r, "extra", "read-only")
    assert not (ds / "c.txt").exists()  # checked before anything was written
    with read_only(ds / "10_zxq"):
        r = run_cli("captions", ds, "--add-prefix", "zxq")
    assert_one_line_error(r, "10_zxq", "nothing was changed")
    assert (ds / "10_zxq" / "a.txt").read_text() == "zxq, cat, cat, long_hair"


def test_bad_caption_arguments(ds):
    assert_one_line_error(run_cli("captions", ds, "--replace", "no-arrow"), "=>")
    assert_one_line_error(run_cli("captions", ds), "nothing to do")
    assert_one_line_error(run_cli("captions", ds, "--undo"), "nothing to undo")
    assert_one_line_error(run_cli("prepare", ds, "--report", ds / "missing_dir" / "r.json"), "does not exist")


def test_remove_tags_space_or_comma_and_dry_run(ds):
    r = run_cli("captions", ds, "--remove-tags", "long hair", "dog,cat", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would change 10_zxq/a.txt" in r.stdout and "would change 10_zxq/b.txt" in r.stdout
    assert (ds / "10_zxq" / "a.txt").read_text() == "zxq, cat, cat, long_hair"  # dry run wrote nothing
    r = run_cli("captions", ds, "--remove-tags", "long hair", "dog,cat")
    assert r.returncode == 0, r.stderr
    assert (ds / "10_zxq" / "a.txt").read_text() == "zxq" and (ds / "10_zxq" / "b.txt").read_text() == ""


@pytest.mark.parametrize("captioner", ["template", "blip", "wd14"])
def test_prepare_never_captions_unusable_files(captioner, tmp_path, tiny_blip):
    """The scan's verdict decides: a truncated PNG/JPEG, an empty file and a text file named .jpg get no .txt from
    `prepare` with any offline captioner (even with --overwrite), and the output names each skipped file."""
    root = make_unusable_folder(tmp_path / "ds")
    model = {"template": [], "blip": ["--model", tiny_blip, "--max-new-tokens", "4"],
             "wd14": ["--model", build_tiny_wd14(tmp_path / "wd", size=32)]}[captioner]
    r = run_cli("prepare", root, "--captioner", captioner, *model, "--overwrite", "--no-near-duplicates")
    assert r.returncode == 0, r.stderr
    assert set(captions_of(root)) == {"good_a.txt", "good_b.txt"}, r.stdout
    assert "captioned 2 image(s)" in r.stdout
    assert_names_every_unusable(r.stdout)


def test_caption_edits_never_touch_unusable_files(tmp_path):
    root = make_unusable_folder(tmp_path / "ds")
    r = run_cli("captions", root, "--add-prefix", "zxq", "--replace", "a=>b")
    assert r.returncode == 0, r.stderr
    assert set(captions_of(root)) == {"good_a.txt", "good_b.txt"}
    assert_names_every_unusable(r.stdout)
    r = run_cli("prepare", root, "--captioner", "template")  # nothing left to caption: still says why
    assert r.returncode == 0, r.stderr
    assert "every usable image already has a caption" in r.stdout
    assert_names_every_unusable(r.stdout)
    assert set(captions_of(root)) == {"good_a.txt", "good_b.txt"}


def test_bucket_flags_are_the_data_settings(ds):
    """--resolution etc. are data.* config keys: the same ranges and choices, one-line errors naming the flag."""
    assert_one_line_error(run_cli("scan", ds, "--resolution", "5000"), "--resolution", "maximum 4096")
    assert_one_line_error(run_cli("scan", ds, "--bucket-step-px", "7"), "--bucket-step-px", "not one of")
    assert_one_line_error(run_cli("prepare", ds, "--batch-size", "0"), "--batch-size", "minimum 1")
    r = run_cli("scan", ds, "--help")
    assert "[64..4096]" in r.stdout and "{8,16,32,64,128}" in r.stdout
