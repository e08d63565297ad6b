"""Training masks: find an image's mask, read it (or the image's alpha channel), and check it.

A mask is a greyscale picture the size of its (upright) image: white = train, black = ignore, grey = a weight
in between. Masks live in one folder and are named after the images' file stems (``cat.jpg`` ->
``masks/cat.png``; any image extension). The trainer, the scan and the previews use these functions, so a
mask means the same thing everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS, ImageError, _open_error, _orientation, _TRANSPOSE

#: A mask whose brightest pixel is at most this (of 255) counts as empty: its image would train nothing.
EMPTY_MASK_MAX = 8


@dataclass(frozen=True)
class MaskProblem:
    path: str       # the image the problem is about
    kind: str       # mask_missing | mask_size | mask_empty | mask_unreadable
    message: str


def mask_index(mask_dir: str | os.PathLike) -> dict[str, Path]:
    """Stem -> mask file of every image file directly in mask_dir (a stem that appears twice keeps the first
    in name order, so the answer does not depend on the file system)."""
    out: dict[str, Path] = {}
    root = Path(mask_dir)
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            out.setdefault(p.stem, p)
    return out


def _open_upright(path: Path) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            orient = _orientation(img)
            img.load()
    except FileNotFoundError as e:
        raise _open_error(path, e) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(path, "unreadable", str(e) or type(e).__name__) from None
    if orient in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orient])
    return img


def load_mask(path: str | os.PathLike) -> Image.Image:
    """A mask file as an 8-bit greyscale image ('L'); colour masks are read by luminance, an 'LA'/'RGBA'
    mask by its grey values (its transparency is ignored)."""
    img = _open_upright(Path(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float32)
        arr = arr / 257.0 if arr.max() > 255 else arr
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("LA", "La"):
        return img.getchannel("L")
    return img.convert("RGB").convert("L") if img.mode != "L" else img


def load_alpha(path: str | os.PathLike) -> Image.Image | None:
    """An image's own alpha channel as a mask ('L', upright), or None if the image has no transparency."""
    img = _open_upright(Path(path))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    return None


def check_mask(mask: Path, image_size: tuple[int, int], image_name: str) -> MaskProblem | None:
    """A mask of the wrong size or with nothing white in it, as a problem naming both files."""
    try:
        m = load_mask(mask)
    except ImageError as e:
        return MaskProblem(image_name, "mask_unreadable", f"{mask}: the mask cannot be read ({e.reason})")
    if m.size != tuple(image_size):
        return MaskProblem(image_name, "mask_size", f"{mask}: the mask is {m.size[0]}x{m.size[1]} but its image "
                           f"{image_name} is {image_size[0]}x{image_size[1]}")
    if int(np.asarray(m).max()) <= EMPTY_MASK_MAX:
        return MaskProblem(image_name, "mask_empty", f"{mask}: the mask is black everywhere, so {image_name} "
                           "would train nothing")
    return None


def check_masks(images: list[tuple[str, tuple[int, int]]], mask_dir: str | os.PathLike) -> list[MaskProblem]:
    """Problems of the masks of (image path, upright size) pairs: missing, wrong size, empty, unreadable."""
    index = mask_index(mask_dir)
    out = []
    for path, size in images:
        stem = Path(path).stem
        if stem not in index:
            out.append(MaskProblem(path, "mask_missing", f"{path}: no mask named {stem}.* in {mask_dir}"))
            continue
        problem = check_mask(index[stem], size, path)
        if problem is not None:
            out.append(problem)
    return out


#: The colour of what a mask leaves out in previews (the bucket contact sheet's tint).
MASKED_OUT_TINT = (40, 90, 255)


def tint_masked_out(img: Image.Image, mask: Image.Image, strength: float = 0.6) -> Image.Image:
    """An RGB picture with what its mask (an 'L' image of the same size) leaves out tinted blue, grey in
    between: what the masked loss ignores, at a glance."""
    tinted = Image.blend(img, Image.new("RGB", img.size, MASKED_OUT_TINT), strength)
    return Image.composite(img, tinted, mask)
