"""Masks made by a prompt (a tiny random CLIPSeg loaded through the real loading code) or from the alpha channel:
one PNG per picture at its upright size, the threshold/grow/blur/invert semantics, existing masks kept, bad input
one line with the rest going on, and the trainer's data.mask_dir and the scan reading exactly these files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets_tools.errors import DatasetError
from datasets_tools.mask_maker import (MASK_MARKER, MASK_OPTIONS, OPTIONS, check_option, dilate, make_masks,
                                       mask_contact_sheet, mask_overlay, shape_mask)
from datasets_tools.masks import check_masks, load_mask
from datasets_tools.scan import scan_folder

from tests.datasets_tools.unusable_files import UNUSABLE, make_unusable_folder
from tests.fixtures.dataset_images import pattern_image
from tests.fixtures.tiny_clipseg import save_tiny_clipseg

PROMPT = ["the character"]


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory):
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg") / "tiny-clipseg")


def _rotated_jpeg(path, w, h, seed):
    """A JPEG stored w x h with EXIF orientation 6: upright it is h x w."""
    exif = Image.Exif()
    exif[0x0112] = 6
    pattern_image(w, h, seed).save(path, quality=90, exif=exif.tobytes())


@pytest.fixture
def pictures(tmp_path):
    root = tmp_path / "data"
    (root / "3_hero").mkdir(parents=True)
    pattern_image(64, 48, 1).save(root / "a.png")
    pattern_image(40, 90, 2).save(root / "3_hero" / "b.png")
    _rotated_jpeg(root / "c.jpg", 80, 50, 3)
    return root


UPRIGHT = {"a": (64, 48), "b": (40, 90), "c": (50, 80)}


def _arr(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_prompt_masks_are_one_binary_png_per_picture_at_its_upright_size(pictures, clipseg):
    calls = []
    run = make_masks(pictures, prompts=PROMPT, model=str(clipseg), batch_size=2,
                     progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)]  # batches of 2, each reported
    out = pictures / "masks"
    assert sorted(run.written) == ["a.png", "b.png", "c.png"] and not run.skipped and not run.kept
    for stem, size in UPRIGHT.items():
        img = Image.open(out / f"{stem}.png")
        assert img.mode == "L" and img.size == size, (stem, img.mode, img.size)
        assert set(np.unique(np.asarray(img))) <= {0, 255}  # a threshold and no blur: white or black
    assert (out / MASK_MARKER).is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert "CLIPSegForImageSegmentation" in run.source


def test_the_trainer_and_the_scan_read_exactly_these_masks(pictures, clipseg, tmp_path):
    """data.mask_dir takes the files as written: every picture gets its own mask, no size or read problem."""
    from trainer import config as C
    from trainer.train.data import build_data, load_mask as trainer_mask

    out = tmp_path / "masks"
    make_masks(pictures, prompts=PROMPT, model=str(clipseg), mask_dir=out, threshold=0.5, blur=1.0)
    report = scan_folder(pictures, mask_dir=str(out), near_duplicates=False)
    assert not [p for p in report.problems if p.kind.startswith("mask_")], report.problems
    sizes = [(str(pictures / r.path), (r.width, r.height)) for r in report.usable_images()]
    assert len(sizes) == 3 and not check_masks(sizes, out)

    cfg = C.load_config(None, [f"data.dir={pictures}", f"data.mask_dir={out}", "data.resolution=128",
                               "data.min_bucket_px=64", "data.max_bucket_px=256"])
    warnings = []
    data = build_data(cfg, warnings.append)
    assert not [w for w in warnings if "mask" in w], warnings
    got = {e.path.stem: e.mask for e in data.examples}
    assert got == {s: out / f"{s}.png" for s in UPRIGHT}
    for e in data.examples:
        m = trainer_mask(e)
        assert m is not None and 0.0 <= float(m.min()) <= float(m.max()) <= 1.0


def test_the_default_mask_folder_is_not_walked_as_pictures(pictures, clipseg):
    make_masks(pictures, prompts=PROMPT, model=str(clipseg))
    report = scan_folder(pictures, mask_dir=str(pictures / "masks"), near_duplicates=False)
    assert sorted(r.path for r in report.images) == ["3_hero/b.png", "a.png", "c.jpg"]


def test_invert_is_255_minus_the_mask_and_the_threshold_cuts_as_it_says(pictures, clipseg, tmp_path):
    plain, inverted = tmp_path / "plain", tmp_path / "inv"
    make_masks(pictures, prompts=PROMPT, model=str(clipseg), mask_dir=plain, grow=2, blur=1.5)
    make_masks(pictures, prompts=PROMPT, model=str(clipseg), mask_dir=inverted, grow=2, blur=1.5, invert=True)
    for stem in UPRIGHT:
        a, b = _arr(plain / f"{stem}.png").astype(int), _arr(inverted / f"{stem}.png").astype(int)
        assert (b == 255 - a).all(), stem
    # threshold 0 trains everywhere
    make_masks(pictures, prompts=PROMPT, model=str(clipseg), mask_dir=tmp_path / "t0", threshold=0.0)
    assert all(_arr(tmp_path / "t0" / f"{s}.png").min() == 255 for s in UPRIGHT)
    lo, hi = tmp_path / "lo", tmp_path / "hi"
    make_masks(pictures, prompts=PROMPT, model=str(clipseg), mask_dir=lo, threshold=0.3)
    make_masks(pictures, prompts=PROMPT, model=str(clipseg), mask_dir=hi, threshold=0.7)
    for s in UPRIGHT:  # a higher threshold keeps a subset of the white pixels
        lo_w, hi_w = _arr(lo / f"{s}.png") == 255, _arr(hi / f"{s}.png") == 255
        assert not (hi_w & ~lo_w).any() and hi_w.sum() <= lo_w.sum()


def test_shape_mask_threshold_grow_blur_on_a_known_map():
    prob = np.zeros((21, 21), np.float32)
    prob[10, 10] = 0.9
    prob[0, 0] = 0.39
    m = np.asarray(shape_mask(prob, threshold=0.4))
    assert m[10, 10] == 255 and m[0, 0] == 0 and m.sum() == 255
    grown = np.asarray(shape_mask(prob, threshold=0.4, grow=3))
    ys, xs = np.nonzero(grown)
    assert ((ys - 10) ** 2 + (xs - 10) ** 2 <= 9).all() and len(ys) == 29  # a disc of radius 3: 29 pixels
    shrunk = np.asarray(shape_mask(np.asarray(grown, np.float32) / 255, threshold=0.5, grow=-3))
    assert shrunk.sum() == 255 and shrunk[10, 10] == 255  # erosion by the same disc gives the centre back
    soft = np.asarray(shape_mask(prob, threshold=None))
    assert soft[10, 10] == round(0.9 * 255) and soft[0, 0] == round(0.39 * 255)
    blurred = np.asarray(shape_mask(prob, threshold=0.4, grow=3, blur=2))
    assert 0 < blurred[10, 14] < 255 and blurred[10, 10] < 255  # soft edges


def test_dilate_is_an_exact_disc_on_random_grey_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    for r in (1, 2, 5):
        ref = np.zeros_like(a)
        for y in range(13):
            for x in range(17):
                ref[y, x] = max(a[yy, xx] for yy in range(13) for xx in range(17)
                                if (yy - y) ** 2 + (xx - x) ** 2 <= r * r)
        assert (dilate(a, r) == ref).all(), r


def test_from_alpha_copies_the_alpha_exactly(tmp_path):
    root = tmp_path / "cut"
    root.mkdir()
    rgba = pattern_image(30, 20, 5).convert("RGBA")
    alpha = np.zeros((20, 30), np.uint8)
    alpha[5:15, 8:22] = 255
    alpha[5:15, 8] = 128  # a soft edge stays grey
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(root / "cut.png")
    pattern_image(16, 16, 6).save(root / "opaque.png")
    run = make_masks(root, from_alpha=True)
    assert run.written == ["cut.png"] and (_arr(root / "masks" / "cut.png") == alpha).all()
    assert [(p.path, p.kind) for p in run.skipped] == [("opaque.png", "no_alpha")]
    assert "opaque.png: has no alpha channel" in run.skipped[0].message
    # with a threshold and invert: the alpha is cut, then inverted
    make_masks(root, from_alpha=True, threshold=0.6, invert=True, overwrite=True)
    assert (_arr(root / "masks" / "cut.png") == np.where(alpha >= 0.6 * 255, 0, 255)).all()


def test_existing_masks_are_kept_unless_overwrite(pictures, clipseg):
    out = pictures / "masks"
    out.mkdir()
    Image.new("L", UPRIGHT["a"], 77).save(out / "a.png")
    Image.new("L", UPRIGHT["b"], 99).save(out / "b.jpg")  # any image type with the stem counts
    run = make_masks(pictures, prompts=PROMPT, model=str(clipseg))
    assert run.written == ["c.png"] and sorted(run.kept) == ["3_hero/b.png", "a.png"]
    assert _arr(out / "a.png").max() == 77
    again = make_masks(pictures, prompts=PROMPT, model="/no/model/needed")  # nothing to do: no model loaded
    assert not again.written and len(again.kept) == 3
    run = make_masks(pictures, prompts=PROMPT, model=str(clipseg), overwrite=True)
    assert sorted(run.written) == ["a.png", "b.png", "c.png"]
    assert not (out / "b.jpg").exists()  # else the trainer would read the old b.jpg first
    assert set(np.unique(_arr(out / "a.png"))) <= {0, 255}


def test_unreadable_pictures_are_named_and_the_rest_get_masks(tmp_path, clipseg):
    root = make_unusable_folder(tmp_path / "mixed")
    run = make_masks(root, prompts=PROMPT, model=str(clipseg))
    assert sorted(run.written) == ["good_a.png", "good_b.png"]
    named = {p.path for p in run.skipped}
    assert named == set(UNUSABLE), run.skipped
    assert all(p.message.startswith(p.path + ": ") and "\n" not in p.message for p in run.skipped)


def test_a_picture_that_fails_to_decode_is_skipped_by_name(pictures, clipseg):
    data = (pictures / "a.png").read_bytes()
    (pictures / "a.png").write_bytes(data[: len(data) - 40])  # cut short: no picture to read
    run = make_masks(pictures, prompts=PROMPT, model=str(clipseg))
    assert "c.png" in run.written and "b.png" in run.written
    assert [p.path for p in run.skipped] == ["a.png"] and not (pictures / "masks" / "a.png").exists()


@pytest.mark.parametrize("make, says", [
    (lambda tmp: tmp / "nothing-here", "CLIPSeg model not found: "),
    (lambda tmp: tmp, "is not a CLIPSeg model folder or hub id"),
])
def test_a_wrong_model_is_one_line_and_writes_nothing(pictures, tmp_path, make, says):
    with pytest.raises(DatasetError, match=says) as e:
        make_masks(pictures, prompts=PROMPT, model=str(make(tmp_path)))
    assert "\n" not in str(e.value) and not (pictures / "masks").exists()


def test_a_model_of_another_kind_is_named(pictures, tmp_path):
    from transformers import CLIPConfig, CLIPModel
    other = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2),
                         vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8),
                         projection_dim=8)).save_pretrained(other)
    with pytest.raises(DatasetError, match=r"is a 'clip' model, not CLIPSeg"):
        make_masks(pictures, prompts=PROMPT, model=str(other))


def test_options_are_checked_and_modes_exclusive(pictures, clipseg):
    with pytest.raises(DatasetError, match="threshold: 1.5 is outside 0..1"):
        make_masks(pictures, prompts=PROMPT, model=str(clipseg), threshold=1.5)
    with pytest.raises(DatasetError, match="grow: "):
        make_masks(pictures, prompts=PROMPT, model=str(clipseg), grow=OPTIONS["grow"].max + 1)
    with pytest.raises(DatasetError, match="choose one"):
        make_masks(pictures, prompts=PROMPT, from_alpha=True)
    with pytest.raises(DatasetError, match="--prompt"):
        make_masks(pictures)
    assert check_option("batch_size", 3) == 3
    assert [o.name for o in MASK_OPTIONS] == ["threshold", "grow", "blur", "batch_size", "invert"]


def test_preview_draws_the_masks_over_the_pictures(pictures, clipseg, tmp_path):
    make_masks(pictures, prompts=PROMPT, model=str(clipseg))
    sheet = mask_contact_sheet(pictures, tmp_path / "sheet.png")
    img = Image.open(sheet)
    assert img.size[0] > 100 and img.size[1] > 100
    over = mask_overlay(pictures / "a.png", pictures / "masks" / "a.png", thumb_px=64)
    mask = np.asarray(load_mask(pictures / "masks" / "a.png").resize(over.size))
    base = np.asarray(pattern_image(64, 48, 1).resize(over.size)).astype(int)
    diff = np.abs(np.asarray(over).astype(int) - base).sum(-1)
    if (mask == 255).any():
        assert diff[mask == 255].max() == 0  # trained: the picture as it is
    if (mask == 0).any():
        assert diff[mask == 0].min() > 0  # left out: tinted
