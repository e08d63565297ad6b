"""`lorastudio prepare --captioner vlm/florence2` as a user runs it, on tiny random models saved to a folder."""

from __future__ import annotations

import pytest
from tests.app.cli.test_dataset import assert_one_line_error, run_cli
from tests.datasets_tools.test_captioners import build_tiny_wd14
from tests.datasets_tools.tiny_vlms import build_florence2, build_llava
from tests.fixtures.dataset_images import pattern_image


@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(3):
        pattern_image(32, 32, i).save(root / f"img{i}.png")
    (root / "img2.txt").write_text("hand written", encoding="utf-8")
    return root


def test_prepare_with_a_chat_vlm_and_a_picture_it_cannot_read(ds, tmp_path):
    model = build_llava(tmp_path / "llava", resize=False)  # fixed 32 px: a 48x40 picture cannot be read
    pattern_image(48, 40, 7).save(ds / "odd.png")
    r = run_cli("prepare", ds, "--captioner", "joycaption", "--model", model, "--trigger", "zxq",
                "--instruction", "Name the colour.", "--caption-batch-size", "2", "--max-new-tokens", "8",
                "--device", "cpu", "--dtype", "float32", "--no-near-duplicates")
    assert r.returncode == 0, r.stderr
    assert "LlavaForConditionalGeneration" in r.stderr and "on cpu in float32" in r.stderr
    assert "warning: odd.png: vlm could not read it: " in r.stderr and "Traceback" not in r.stderr
    assert "captioned 2 image(s), kept 1 existing caption(s)" in r.stdout
    assert "1 not captioned (no file written): odd.png" in r.stdout
    assert (ds / "img0.txt").read_text(encoding="utf-8").startswith("zxq, ")
    assert (ds / "img2.txt").read_text(encoding="utf-8") == "hand written" and not (ds / "odd.txt").exists()


def test_prepare_with_florence2_task(ds, tmp_path):
    model = build_florence2(tmp_path / "florence")
    r = run_cli("prepare", ds, "--captioner", "florence2", "--model", model, "--task", "caption", "--overwrite",
                "--max-new-tokens", "12", "--num-beams", "1", "--no-near-duplicates")
    assert r.returncode == 0, r.stderr
    assert "Florence2ForConditionalGeneration" in r.stderr and "captioned 3 image(s)" in r.stdout
    assert (ds / "img2.txt").read_text(encoding="utf-8") != "hand written"  # replaced (and backed up)
    assert run_cli("captions", ds, "--undo").returncode == 0
    assert (ds / "img2.txt").read_text(encoding="utf-8") == "hand written"


def test_prepare_vlm_bad_models_are_one_line(ds, tmp_path):
    assert_one_line_error(run_cli("prepare", ds, "--captioner", "vlm", "--model", build_tiny_wd14(tmp_path / "wd")),
                          "WD14 tagger folder", "--captioner wd14")
    no_template = build_llava(tmp_path / "plain", chat_template=None)
    assert_one_line_error(run_cli("prepare", ds, "--captioner", "vlm", "--model", no_template),
                          "has no chat template", str(no_template))
    assert not list(ds.glob("img[01].txt"))
