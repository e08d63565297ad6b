"""Walk a training folder: images with their captions, kohya 'N_name' repeats and sizes, plus the problems found."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError
from .images import IMAGE_EXTENSIONS, ImageError, ImageHeader, read_header

CACHE_DIR_NAMES = {".lorastudio_cache", ".lorastudio_backup", "__MACOSX"}
_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageItem:
    path: Path
    caption: str
    has_caption: bool
    repeats: int
    subset: str  # folder the image counts under: its nearest 'N_name' folder, else its own folder ('.' = root)
    width: int  # upright size (after EXIF orientation)
    height: int


@dataclass
class Problem:
    path: str
    kind: str  # missing_caption, truncated, empty, not_an_image, unreadable, unreadable_caption, caption_without_image
    message: str

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "message": self.message}


def check_folder(root: str | os.PathLike) -> Path:
    """The folder as a Path, or a one-line DatasetError when it is missing, not a folder or not readable."""
    p = Path(root).expanduser()
    if not p.exists():
        raise DatasetError(f"dataset folder not found: {p}", path=str(p))
    if not p.is_dir():
        raise DatasetError(f"not a folder: {p}", path=str(p))
    if not os.access(p, os.R_OK | os.X_OK):
        raise DatasetError(f"dataset folder is not readable: {p}", path=str(p))
    return p


def walk_files(root: Path) -> list[Path]:
    """Every non-hidden file under root, sorted by relative path; hidden and cache folders skipped.

    Hidden files are skipped too: macOS '._name.jpg' resource forks carry image extensions but no image.
    Folder symlinks are followed once (users link sub-sets in), loops are cut by real path.
    """
    out: list[Path] = []
    seen: set[str] = set()

    def walk(d: Path) -> None:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return  # reported by the caller only for root; unreadable sub-folders are skipped
        for e in entries:
            if e.name.startswith(".") or e.name in CACHE_DIR_NAMES:
                continue
            try:
                if e.is_dir():
                    walk(Path(e.path))
                elif e.is_file():
                    out.append(Path(e.path))
            except OSError:
                continue

    walk(root)
    return out


def repeats_for(path: Path, root: Path, default_repeats: int = 1) -> tuple[int, str]:
    """(repeats, subset) from the nearest 'N_name' folder between root (excluded) and the file."""
    rel_parent = path.parent.relative_to(root)
    parts = rel_parent.parts
    for i in range(len(parts) - 1, -1, -1):
        m = _REPEATS_DIR.match(parts[i])
        if m and int(m.group(1)) >= 1:
            return int(m.group(1)), Path(*parts[: i + 1]).as_posix()
    return default_repeats, rel_parent.as_posix() or "."


def caption_path(image: Path, caption_extension: str = ".txt") -> Path:
    return image.with_name(image.stem + caption_extension)


def read_caption(path: Path) -> str:
    # utf-8-sig: Windows editors prepend a BOM that would otherwise end up inside the first tag.
    return path.read_text(encoding="utf-8-sig").strip()


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_images(root: str | os.PathLike, *, caption_extension: str = ".txt", default_caption: str = "",
                   default_repeats: int = 1) -> tuple[list[ImageItem], list[Problem]]:
    """Images under root (recursive, sorted) with captions and repeats; bad files are skipped and reported."""
    items, _, problems = collect_with_headers(root, caption_extension=caption_extension,
                                              default_caption=default_caption, default_repeats=default_repeats)
    return items, problems


def collect_with_headers(root: str | os.PathLike, *, caption_extension: str = ".txt", default_caption: str = "",
                         default_repeats: int = 1) -> tuple[list[ImageItem], list[ImageHeader], list[Problem]]:
    """collect_images plus each item's full header (mode, format, orientation), for the scan report."""
    root = check_folder(root)
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    files = walk_files(root)
    images = [f for f in files if is_image_file(f)]
    items: list[ImageItem] = []
    headers: list[ImageHeader] = []
    problems: list[Problem] = []
    for path in images:
        try:
            head = read_header(path)
        except ImageError as e:
            problems.append(Problem(str(path), e.reason.replace(" ", "_"), str(e)))
            continue
        repeats, subset = repeats_for(path, root, default_repeats)
        cap_file = caption_path(path, caption_extension)
        caption, has_caption = default_caption, False
        if cap_file.is_file():
            try:
                caption, has_caption = read_caption(cap_file), True
            except (OSError, UnicodeDecodeError) as e:
                problems.append(Problem(str(cap_file), "unreadable_caption",
                                        f"{cap_file}: caption not readable as UTF-8 text ({type(e).__name__}); "
                                        f"using the default caption"))
        else:
            problems.append(Problem(str(path), "missing_caption",
                                    f"{path}: no {caption_extension} caption; using "
                                    + (f"'{default_caption}'" if default_caption else "an empty caption")))
        items.append(ImageItem(path, caption, has_caption, repeats, subset, head.width, head.height))
        headers.append(head)
    image_stems = {(f.parent, f.stem) for f in images}
    for f in files:
        if (f.name.endswith(caption_extension) and not is_image_file(f)
                and (f.parent, f.name[: -len(caption_extension)]) not in image_stems):
            problems.append(Problem(str(f), "caption_without_image", f"{f}: caption file without a matching image"))
    return items, headers, problems
