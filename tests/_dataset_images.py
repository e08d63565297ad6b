"""Helpers for dataset tests: small Pillow-drawn images with real content and a truly read-only folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image


def pattern_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture: distinct seeds give distinct perceptual hashes, resizes keep them."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    return img.convert(mode) if mode != "RGB" else img


def make_dataset(root: Path) -> Path:
    """A mixed folder: kohya repeats folder, captions, formats, broken files, duplicates, orphans."""
    (root / "10_zxq").mkdir(parents=True)
    (root / "extra").mkdir()
    pattern_image(640, 480, 1).save(root / "10_zxq" / "a.jpg", quality=92)
    (root / "10_zxq" / "a.txt").write_text("zxq, cat, cat, long_hair", encoding="utf-8")
    pattern_image(480, 640, 2).save(root / "10_zxq" / "b.png")
    (root / "10_zxq" / "b.txt").write_text("dog, long hair", encoding="utf-8")
    pattern_image(512, 512, 3).save(root / "c.webp")
    pattern_image(100, 80, 4).save(root / "tiny.bmp")  # too small for 512
    pattern_image(2000, 200, 5).save(root / "extra" / "wide.gif")  # extreme aspect ratio
    shutil.copy(root / "10_zxq" / "b.png", root / "extra" / "b_copy.png")  # exact duplicate
    pattern_image(600, 450, 1).save(root / "extra" / "a_again.png")  # near duplicate of a.jpg
    (root / "extra" / "empty.jpg").write_bytes(b"")
    (root / "extra" / "notes.png").write_text("not a picture")
    data = (root / "10_zxq" / "b.png").read_bytes()
    (root / "extra" / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "extra" / "orphan.txt").write_text("no image here", encoding="utf-8")
    return root


@contextlib.contextmanager
def read_only(path: Path):
    """Make a folder refuse new files even for root (chattr +i), else by permission bits."""
    path = Path(path)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                            capture_output=True).returncode != 0:
            import pytest
            pytest.skip("cannot make a folder read-only as root here (no chattr +i)")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=False)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(mode)
