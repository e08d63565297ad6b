"""Folder scan: every problem kind reported by file, buckets and crops, nothing changed on disk."""

from __future__ import annotations

import json

import pytest
from tests.fixtures.dataset_images import make_dataset, pattern_image

from datasets_tools.errors import DatasetError
from datasets_tools.scan import near_pairs, phash, scan_folder


def _tree(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*"))


def test_scan_reports_everything_and_changes_nothing(tmp_path):
    root = make_dataset(tmp_path / "ds")
    before = _tree(root)
    report = scan_folder(root, resolution=512, batch_size=4)
    assert _tree(root) == before  # read-only: nothing written, moved or deleted
    by_file = report.problems_by_file()
    assert by_file["extra/empty.jpg"] == ["empty"]
    assert by_file["extra/notes.png"] == ["not_an_image"]
    assert "truncated" in by_file["extra/cut.png"]
    assert "too_small" in by_file["tiny.bmp"]
    assert "extreme_aspect" in by_file["extra/wide.gif"]
    assert "exact_duplicate" in by_file["extra/b_copy.png"] or "exact_duplicate" in by_file["10_zxq/b.png"]
    assert "near_duplicate" in by_file.get("extra/a_again.png", []) + by_file.get("10_zxq/a.jpg", [])
    assert by_file["extra/orphan.txt"] == ["caption_without_image"]
    assert "missing_caption" in by_file["c.webp"]
    assert report.duplicates["exact"] == [["10_zxq/b.png", "extra/b_copy.png"]]

    recs = {r.path: r for r in report.images}
    a = recs["10_zxq/a.jpg"]
    assert (a.width, a.height, a.format, a.repeats, a.subset, a.has_caption) == (640, 480, "JPEG", 10, "10_zxq", True)
    assert a.bucket[0] > a.bucket[1] and a.crop_box[2] - a.crop_box[0] == a.bucket[0]
    assert recs["tiny.bmp"].upscaled
    assert "extra/cut.png" not in {r.path for r in report.usable_images()}
    # Bucket counts cover usable images only; samples include kohya repeats.
    assert sum(c["images"] for c in report.buckets.values()) == len(report.usable_images())
    assert sum(c["samples"] for c in report.buckets.values()) == sum(r.repeats for r in report.usable_images())
    assert any("fewer than the batch size" in w for w in report.warnings)
    assert any("upscaled" in w for w in report.warnings)

    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"]["images"] == len(report.images)
    assert data["problems_by_file"]["extra/empty.jpg"] == ["empty"]
    text = report.summary()
    assert "Buckets" in text and "truncated" in text and "near duplicate" in text


def test_report_json_written_atomically(tmp_path):
    root = make_dataset(tmp_path / "ds")
    out = report_path = tmp_path / "r.json"
    scan_folder(root, near_duplicates=False).write_json(report_path)
    data = json.loads(out.read_text())
    assert data["settings"]["resolution"] == 512 and data["images"]


def test_header_only_mode_still_finds_truncation(tmp_path):
    root = make_dataset(tmp_path / "ds")
    report = scan_folder(root, near_duplicates=False, exact_duplicates=False)
    kinds = report.problems_by_file()
    assert "truncated" in kinds["extra/cut.png"]
    assert not any(k in ("near_duplicate", "exact_duplicate") for ks in kinds.values() for k in ks)


def test_no_upscale_scan(tmp_path):
    root = make_dataset(tmp_path / "ds")
    report = scan_folder(root, no_upscale=True, near_duplicates=False)
    tiny = next(r for r in report.images if r.path == "tiny.bmp")
    assert not tiny.upscaled and tiny.bucket == (64, 64)
    assert "too_small" in report.problems_by_file()["tiny.bmp"]


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        scan_folder(tmp_path / "missing")


def test_phash_robust_to_resize_and_distinct_otherwise():
    a = phash(pattern_image(640, 480, 1))
    b = phash(pattern_image(320, 240, 1))
    c = phash(pattern_image(640, 480, 9))
    assert bin(a ^ b).count("1") <= 4
    assert bin(a ^ c).count("1") > 12
    assert near_pairs([a, b, c]) == [(0, 1, bin(a ^ b).count("1"))]


def test_unlistable_subfolder_is_reported(tmp_path, monkeypatch):
    import os as _os

    root = make_dataset(tmp_path / "ds")
    real_scandir = _os.scandir

    def scandir(path):
        if str(path).endswith("extra"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr("datasets_tools.folder.os.scandir", scandir)
    report = scan_folder(root, near_duplicates=False)
    assert report.problems_by_file()["extra"] == ["unreadable"]
    assert not any(r.path.startswith("extra/") for r in report.images)
