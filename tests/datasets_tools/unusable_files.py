"""A dataset folder with one file of each unusable kind beside two good images, for the tests that captioning and
caption edits never write a caption for a file the scan calls unusable."""

from __future__ import annotations

import io
from pathlib import Path

from tests.fixtures.dataset_images import pattern_image

#: file -> the scan's verdict
UNUSABLE = {"truncated.png": "truncated", "truncated.jpg": "truncated", "empty.png": "empty",
            "text.jpg": "not_an_image"}
GOOD = ("good_a.png", "good_b.jpg")


def make_unusable_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    pattern_image(64, 48, 1).save(root / "good_a.png")
    pattern_image(48, 64, 2).save(root / "good_b.jpg", quality=90)
    png, jpg = io.BytesIO(), io.BytesIO()
    pattern_image(96, 96, 3).save(png, format="PNG")
    pattern_image(96, 96, 4).save(jpg, format="JPEG", quality=90)
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file, not a picture", encoding="utf-8")
    return root


def captions_of(root: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(root).glob("*.txt"))}


def assert_names_every_unusable(text: str) -> None:
    assert f"skipped {len(UNUSABLE)} unusable files" in text, text
    for name, kind in UNUSABLE.items():
        assert f"{name} ({kind.replace('_', ' ')})" in text, (name, text)
