"""Shared fixtures: offline environment, tiny models saved like real ones, drawn image folders."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["LORASTUDIO_NO_BAR"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import io
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """User presets and caches go to a temporary home, never the real one."""
    home = tmp_path_factory.mktemp("lorastudio_home")
    os.environ["LORASTUDIO_HOME"] = str(home)
    yield home


def _tiny_dir(tmp_path_factory, family: str) -> Path:
    from trainer.tiny_models import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{family}") / "model", family)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    return _tiny_dir(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    return _tiny_dir(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return _tiny_dir(tmp_path_factory, "sdxl")


def draw_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rnd = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rnd.randint(150, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rnd.randint(0, w // 2), rnd.randint(0, h // 2)
        d.ellipse([x0, y0, x0 + rnd.randint(8, w // 2), y0 + rnd.randint(8, h // 2)],
                  fill=tuple(rnd.randint(0, 200) for _ in range(3)))
    return img.convert(mode) if mode != "RGB" else img


def make_image_folder(root: Path, n: int = 6, *, sizes=None, captions=True, broken=False, repeats_dir=None,
                      seed: int = 0) -> Path:
    """A folder of drawn images with captions; optionally the awkward cases real folders have."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = sizes or [(128, 128), (160, 96), (96, 160), (128, 96), (200, 200), (96, 128)]
    target = root / repeats_dir if repeats_dir else root
    target.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        p = target / f"img{i:03d}.png"
        draw_image(w, h, seed + i).save(p)
        if captions:
            p.with_suffix(".txt").write_text(f"zxq style, picture {i}, shapes", encoding="utf-8")
    if broken:
        (root / "empty.png").write_bytes(b"")
        (root / "notes.jpg").write_text("this is not an image")
        buf = io.BytesIO()
        draw_image(128, 128, 99).save(buf, format="JPEG")
        (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        draw_image(128, 96, 7, "L").save(root / "gray.png")
        draw_image(96, 128, 8, "RGBA").save(root / "rgba.png")
        draw_image(128, 128, 9, "P").save(root / "palette.png")
        draw_image(128, 128, 10, "CMYK").save(root / "cmyk.jpg")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 CW on display
        draw_image(160, 96, 11).save(root / "rotated.jpg", exif=exif.tobytes())
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "messy", n=4, broken=True)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
