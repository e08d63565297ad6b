"""Bucket preview matches the trainer's crop plan; the contact sheet draws each image with its crop box."""

from __future__ import annotations

import pytest
from tests.fixtures.dataset_images import make_dataset, pattern_image
from PIL import Image

from datasets_tools.bucketing import plan_image
from datasets_tools.errors import DatasetError
from datasets_tools.folder import collect_images
from datasets_tools.preview import bucket_preview, contact_sheet, format_preview
from datasets_tools.scan import scan_folder


def test_preview_uses_the_trainers_plan(tmp_path):
    root = make_dataset(tmp_path / "ds")
    preview = bucket_preview(root, resolution=512, batch_size=2)
    items, _ = collect_images(root)
    assert len(preview.rows) == len(items)
    for row, it in zip(preview.rows, items):
        plan = plan_image(it.width, it.height, resolution=512)
        assert (row.bucket, row.resized, row.box, row.upscaled) == (plan.bucket, plan.resized, plan.box, plan.upscaled)
    assert sum(c["images"] for c in preview.buckets.values()) == len(items)
    assert any("upscaled" in w for w in preview.warnings)
    assert "crop box" in format_preview(preview)


def test_preview_from_report_and_items_agree(tmp_path):
    root = make_dataset(tmp_path / "ds")
    report = scan_folder(root, resolution=512, near_duplicates=False)
    from_report = bucket_preview(report)
    from_folder = bucket_preview(root, resolution=512)
    usable = {r.path for r in report.usable_images()}
    rows = {r.path: r for r in from_folder.rows if r.path in usable}
    assert {r.path: (r.bucket, r.box) for r in from_report.rows} == {p: (r.bucket, r.box) for p, r in rows.items()}


def test_bucketing_off_is_square_center_crop():
    items = [type("I", (), {"path": "x.png", "width": 800, "height": 400, "repeats": 1})()]
    row = bucket_preview(items, enable_bucket=False, resolution=512).rows[0]
    assert row.bucket == (512, 512) and row.box_in_image() == (200.0, 0.0, 600.0, 400.0)


def test_contact_sheet_draws_crop_box(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    Image.new("RGB", (600, 100), (0, 200, 0)).save(root / "wide.png")  # will be cropped left and right
    pattern_image(300, 300, 1).save(root / "square.jpg")
    out = contact_sheet(root, tmp_path / "sheet.png", thumb_px=100, columns=2, resolution=256, min_px=128,
                        max_px=512)
    sheet = Image.open(out).convert("RGB")
    assert sheet.size == (2 * 108, 1 * 138)
    # The wide image: bucket 512x128 at resolution 256 keeps the middle; the dimmed sides stay darker than the
    # kept centre, and a yellow box outlines the kept region.
    rows = bucket_preview(root, resolution=256, min_px=128, max_px=512).rows
    wide = next(r for r in rows if r.path == "wide.png")
    order = sorted(rows, key=lambda r: (r.bucket, r.path))
    col = order.index(wide)
    x0 = col * 108 + 4
    y_mid = 4 + 50  # the 6:1 thumbnail is 17 px tall, centred in the 100 px cell
    left, _, right, _ = (v * 100 / 600 for v in wide.box_in_image())
    assert left > 5  # something is cropped
    side = sheet.getpixel((x0 + 1, y_mid))
    centre = sheet.getpixel((x0 + 50, y_mid))
    assert side[1] < centre[1] / 2
    edge = sheet.getpixel((x0 + round(left), y_mid))
    assert edge[0] > 200 and edge[1] > 150 and edge[2] < 80  # yellow outline
    assert not list(tmp_path.glob(".sheet.png.*"))  # written atomically, no temp left behind


def test_contact_sheet_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        contact_sheet(tmp_path / "empty", tmp_path / "s.png")
    root = make_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="does not exist"):
        contact_sheet(root, tmp_path / "nope" / "s.png")
