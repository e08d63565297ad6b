"""Read image headers fast and decode images to upright 8-bit RGB, turning every failure into an ImageError."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (same table as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Leading bytes of the formats we accept: a file that starts like an image but will not open is truncated,
# not "not an image".
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(DatasetError):
    """An image that cannot be used; ``reason`` is one of 'truncated', 'empty', 'not an image', 'unreadable'."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.reason = reason
        msg = f"{path}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(msg, path=str(path))
        self.path = str(path)


@dataclass
class ImageHeader:
    """What the header says, with width/height already swapped for EXIF orientations 5-8."""

    path: str
    width: int
    height: int
    mode: str
    format: str
    orientation: int = 1
    file_size: int = 0
    tail_ok: bool = True  # False: the file's last bytes suggest truncation (see check_tail); decode to confirm


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _open_error(path: Path, e: Exception) -> ImageError:
    if isinstance(e, FileNotFoundError):
        return ImageError(path, "unreadable", "file not found")
    if isinstance(e, PermissionError):
        return ImageError(path, "unreadable", "permission denied")
    if isinstance(e, IsADirectoryError):
        return ImageError(path, "unreadable", "is a directory")
    if isinstance(e, Image.DecompressionBombError):
        return ImageError(path, "unreadable", "too many pixels")
    try:
        if os.path.getsize(path) == 0:
            return ImageError(path, "empty")
    except OSError as e2:
        return ImageError(path, "unreadable", type(e2).__name__)
    if _looks_like_image(path):
        return ImageError(path, "truncated", "header cut short")
    if isinstance(e, UnidentifiedImageError):
        return ImageError(path, "not an image")
    return ImageError(path, "unreadable", str(e) or type(e).__name__)


def _orientation(img: Image.Image) -> int:
    # PNG keeps EXIF either before IDAT (already parsed) or after it; asking Pillow for the late one decodes
    # the whole image, which would defeat header-only scanning, so only the early one counts (load_rgb uses
    # the same rule, so header and pixels always agree).
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block must not make a good image unusable
        return 1
    return value if value in _TRANSPOSE else 1


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Open lazily and read size, mode, format and EXIF orientation without decoding pixels.

    The same open file also yields the size and a cheap tail check, so a scan touches each file once.
    """
    try:
        f = open(path, "rb")
    except Exception as e:
        raise _open_error(Path(path), e) from None
    with f:
        try:
            img = Image.open(f)
            w, h = img.size
            orient = _orientation(img)
            mode, fmt = img.mode, img.format or ""
        except Exception as e:
            raise _open_error(Path(path), e) from None
        size = os.fstat(f.fileno()).st_size
        tail_ok = _tail_ok(f, size, fmt)
    if w <= 0 or h <= 0:
        raise ImageError(path, "unreadable", f"size {w}x{h}")
    if orient in (5, 6, 7, 8):
        w, h = h, w
    return ImageHeader(os.fspath(path), w, h, mode, fmt, orient, size, tail_ok)


def _tail_ok(f, size: int, fmt: str) -> bool:
    try:
        if fmt in ("JPEG", "MPO"):
            f.seek(max(0, size - 2048))
            return b"\xff\xd9" in f.read()
        if fmt == "PNG":
            f.seek(max(0, size - 256))
            return b"IEND" in f.read()
        if fmt == "GIF":
            f.seek(max(0, size - 1))
            return f.read(1) == b";"
        if fmt == "WEBP":
            f.seek(0)
            head = f.read(8)
            return len(head) == 8 and struct.unpack("<I", head[4:8])[0] + 8 <= size
        if fmt == "BMP":
            f.seek(0)
            head = f.read(6)
            declared = struct.unpack("<I", head[2:6])[0] if len(head) == 6 else 0
            return declared == 0 or declared <= size
    except OSError:
        return False
    return True  # TIFF and others: strips can sit anywhere, only a decode can tell


def check_tail(path: str | os.PathLike, fmt: str) -> bool:
    """Cheap completeness test from the file's last bytes; False means "maybe truncated: decode to be sure".

    Files may carry trailing data (phones append videos to JPEGs), so a False here is only a hint.
    """
    try:
        with open(path, "rb") as f:
            return _tail_ok(f, os.fstat(f.fileno()).st_size, fmt)
    except OSError:
        return False


def _to_rgb(img: Image.Image) -> Image.Image:
    import numpy as np

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        # Pillow's own I;16 -> L conversion clips at 255 (a 16-bit image turns almost white); scale instead.
        arr = np.asarray(img).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1.0:
            arr = arr * 255.0  # float images usually hold 0..1
        elif lo >= 0 and hi <= 255:
            pass
        elif lo >= 0 and hi <= 65535:
            arr = arr / 257.0  # 16-bit data stored as 32-bit int (older TIFF/PNG paths)
        else:
            arr = (arr - lo) * (255.0 / (hi - lo))
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in ("P", "PA", "RGBA", "RGBa", "LA", "La"):
        rgba = img.convert("RGBA")
        # Transparent pixels often hold black or garbage colour; white is what viewers show and what
        # taggers expect.
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, HSV


def load_rgb(path: str | os.PathLike, *, draft_px: int | None = None) -> Image.Image:
    """Decode fully, rotate upright per EXIF, and convert to 8-bit RGB; raises ImageError if unusable.

    draft_px: only a preview is needed; JPEGs then decode at a reduced scale (at least draft_px per side).
    """
    p = Path(path)
    try:
        f = open(p, "rb")
    except Exception as e:
        raise _open_error(p, e) from None
    with f:
        try:
            img = Image.open(f)
        except Exception as e:
            raise _open_error(p, e) from None
        try:
            orient = _orientation(img)
            if draft_px:
                img.draft("RGB", (draft_px, draft_px))
            img.load()
        except Image.DecompressionBombError:
            raise ImageError(p, "unreadable", "too many pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as e:
            raise ImageError(p, "truncated", str(e) or type(e).__name__) from None
    if orient in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orient])
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as e:
        raise ImageError(p, "unreadable", f"mode {img.mode}: {e}") from None
