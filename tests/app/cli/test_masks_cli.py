"""`lorastudio masks` as a user runs it: masks on disk, kept on a second run, a preview, one-line errors, and the
same option ranges as the Dataset tab's sliders (both made from MASK_OPTIONS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_tools.mask_maker import MASK_OPTIONS
from tests.app.cli.test_dataset import run_cli
from tests.datasets_tools.unusable_files import UNUSABLE, make_unusable_folder
from tests.fixtures.tiny_clipseg import save_tiny_clipseg


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory):
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg") / "tiny-clipseg")


def test_masks_from_a_prompt_with_a_preview_then_kept(tmp_path, clipseg):
    root = make_unusable_folder(tmp_path / "ds")
    sheet = tmp_path / "sheet.png"
    r = run_cli("masks", root, "--prompt", "the character", "--model", clipseg, "--grow", "-2", "--blur", "1",
                "--batch-size", "2", "--preview", sheet)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for name in UNUSABLE:  # each unreadable file one line, the rest go on
        assert sum(line.startswith(f"skipped: {name}: ") for line in r.stderr.splitlines()) == 1, r.stderr
    assert f"wrote 2 mask(s) in {root / 'masks'}, kept 0 existing; skipped {len(UNUSABLE)}" in r.stdout
    assert f"train with: --set data.mask_dir={root / 'masks'}" in r.stdout
    for name, size in (("good_a", (64, 48)), ("good_b", (48, 64))):
        m = Image.open(root / "masks" / f"{name}.png")
        assert m.mode == "L" and m.size == size
    assert Image.open(sheet).size[0] > 0 and f"preview: {sheet}" in r.stdout

    before = (root / "masks" / "good_a.png").read_bytes()
    again = run_cli("masks", root, "--prompt", "the character", "--model", clipseg, "--invert")
    assert again.returncode == 0 and "wrote 0 mask(s)" in again.stdout and "kept 2 existing" in again.stdout
    assert "--overwrite" in again.stdout and (root / "masks" / "good_a.png").read_bytes() == before


def test_from_alpha_and_invert_in_process(tmp_path, capsys):
    from app.cli import main
    root = tmp_path / "cut"
    root.mkdir()
    alpha = np.zeros((20, 30), np.uint8)
    alpha[4:16, 6:20] = 255
    img = Image.new("RGBA", (30, 20), (200, 40, 40, 255))
    img.putalpha(Image.fromarray(alpha, "L"))
    img.save(root / "cut.png")
    assert main(["masks", str(root), "--from-alpha", "--invert", "--out", str(tmp_path / "m")]) == 0
    assert (np.asarray(Image.open(tmp_path / "m" / "cut.png")) == 255 - alpha).all()
    assert "wrote 1 mask(s)" in capsys.readouterr().out


@pytest.mark.parametrize("args, needles", [
    (["--model", "{tmp}/nowhere"], ["CLIPSeg model not found", "nowhere"]),
    (["--model", "{tmp}"], ["is not a CLIPSeg model folder or hub id"]),
    (["--model", "CIDAS/clipseg-rd64-refined"], ["cannot fetch the CLIPSeg model CIDAS/clipseg-rd64-refined"]),
    (["--model", "{clipseg}", "--threshold", "1.5"], ["--threshold", "maximum 1"]),
    ([], ["--model"]),
    pytest.param(["--model", "{clipseg}", "--device", "cuda"], ["--device cuda"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_one_line(tmp_path, clipseg, capsys, args, needles):
    from app.cli import main
    root = make_unusable_folder(tmp_path / "ds")
    code = main(["masks", str(root), "--prompt", "x", *[a.format(tmp=tmp_path, clipseg=clipseg) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(n in err[0] for n in needles), err
    assert not (root / "masks").exists()


def test_no_prompt_and_no_alpha_says_what_to_do(tmp_path, capsys):
    from app.cli import main
    root = make_unusable_folder(tmp_path / "ds")
    assert main(["masks", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompt" in err[0] and "--from-alpha" in err[0]


@pytest.mark.parametrize("option", [o for o in MASK_OPTIONS if o.type is not bool], ids=lambda o: o.name)
def test_cli_flags_and_gui_sliders_share_each_range(option, tmp_path):
    """The flag accepts the option's ends and refuses one step past them; the Dataset tab's slider has the same
    ends and default."""
    import gradio as gr

    from app.cli import build_parser
    from app.ui.tabs.dataset_masks import mask_slider
    from trainer.errors import UserError

    flag = "--" + option.name.replace("_", "-")
    base = ["masks", str(tmp_path), "--prompt", "p"]
    for end in (option.min, option.max):
        value = int(end) if option.type is int else end
        assert getattr(build_parser().parse_args(base + [flag, str(value)]), option.name) == value
    for past in (option.min - 1, option.max + 1):
        with pytest.raises(UserError, match=flag):
            build_parser().parse_args(base + [flag, str(int(past) if option.type is int else past)])
    with gr.Blocks():
        slider = mask_slider(option.name)
    assert (slider.minimum, slider.maximum, slider.value) == (option.min, option.max, option.default)


def test_the_docs_option_table_is_current():
    from app.cli.masks import options_table
    doc = (Path(__file__).resolve().parents[3] / "docs" / "masks.md").read_text(encoding="utf-8")
    start = doc.index("-->\n", doc.index("<!-- options:")) + len("-->\n")
    assert doc[start:doc.index("<!-- /options -->")] == options_table(), \
        "docs/masks.md's option table is stale: paste app.cli.masks.options_table() between the markers"
