"""Masks in the scan and the contact sheet: what is missing, wrong or empty is reported; masks are drawn."""

from __future__ import annotations

import numpy as np
from PIL import Image

from datasets_tools.masks import check_masks, load_alpha, load_mask
from datasets_tools.preview import bucket_preview, contact_sheet
from datasets_tools.scan import scan_folder

from tests.fixtures.images import make_image_folder


def _masks(folder, dest, sizes_override=None):
    dest.mkdir()
    for img in sorted(folder.glob("*.png")):
        w, h = Image.open(img).size
        a = np.zeros((h, w), np.uint8)
        a[:, : w // 2] = 255
        Image.fromarray(a, "L").save(dest / f"{img.stem}.png")
    return dest


def test_scan_reports_missing_wrong_size_and_empty_masks(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=4)
    masks = _masks(folder, tmp_path / "masks")
    (masks / "img001.png").unlink()                                     # missing
    Image.new("L", (5, 5), 255).save(masks / "img002.png")              # wrong size
    Image.new("L", Image.open(folder / "img003.png").size, 0).save(masks / "img003.png")  # empty
    report = scan_folder(folder, mask_dir=str(masks), near_duplicates=False)
    kinds = {(p.path, p.kind) for p in report.problems if p.kind.startswith("mask_")}
    assert kinds == {("img001.png", "mask_missing"), ("img002.png", "mask_size"), ("img003.png", "mask_empty")}
    assert "no mask (trains everywhere): 1" in report.summary()
    assert report.settings["mask_dir"] == str(masks)
    assert not [p for p in scan_folder(folder, near_duplicates=False).problems if p.kind.startswith("mask_")]


def test_contact_sheet_tints_what_the_mask_leaves_out(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (128, 128), (200, 200, 200)).save(folder / "a.png")
    masks = _masks(folder, tmp_path / "masks")
    plain = np.asarray(Image.open(contact_sheet(bucket_preview(folder, resolution=128, min_px=64),
                                                tmp_path / "plain.png", thumb_px=64)).convert("RGB")).astype(int)
    sheet = np.asarray(Image.open(contact_sheet(bucket_preview(folder, resolution=128, min_px=64,
                                                               mask_dir=masks),
                                                tmp_path / "masked.png", thumb_px=64)).convert("RGB")).astype(int)
    left, right = sheet[20:40, 10:20], sheet[20:40, 50:60]             # inside the 64 px thumbnail at (4, 4)
    assert np.abs(left - plain[20:40, 10:20]).max() == 0                 # white mask: the picture as it is
    assert right[..., 2].mean() > right[..., 0].mean() + 40              # black mask: tinted blue


def test_mask_files_of_any_mode_and_alpha(tmp_path):
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "rgb.png")
    Image.new("I;16", (8, 8), 65535).save(tmp_path / "deep.png")
    assert load_mask(tmp_path / "rgb.png").getextrema() == (255, 255)
    assert load_mask(tmp_path / "deep.png").getextrema() == (255, 255)
    Image.new("RGB", (8, 8)).save(tmp_path / "opaque.png")
    assert load_alpha(tmp_path / "opaque.png") is None
    rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_alpha(tmp_path / "clear.png").getextrema() == (0, 0)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    probs = check_masks([("x.png", (8, 8))], tmp_path)                  # no x.* mask at all
    assert probs[0].kind == "mask_missing"
