"""Walk a training folder: images with their captions, kohya 'N_name' repeats and sizes, plus the problems found."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError
from .images import IMAGE_EXTENSIONS, ImageError, ImageHeader, read_header

CACHE_DIR_NAMES = {".lorastudio_cache", ".lorastudio_backup", "__MACOSX"}
#: A folder holding this file is a mask folder (``lorastudio masks`` writes it): its files are masks, not pictures.
MASK_MARKER = ".lorastudio_masks"
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
    """The folder as an absolute Path, or a one-line DatasetError when it is missing, not a folder or unreadable."""
    p = Path(root).expanduser().absolute()
    if not p.exists():
        raise DatasetError(f"dataset folder not found: {p}", path=str(p))
    if not p.is_dir():
        raise DatasetError(f"not a folder: {p}", path=str(p))
    if not os.access(p, os.R_OK | os.X_OK):
        raise DatasetError(f"dataset folder is not readable: {p}", path=str(p))
    return p


def walk_paths(root: str | os.PathLike, errors: list[tuple[str, str]] | None = None) -> list[str]:
    """Every non-hidden file under root as a path string, sorted by relative path; hidden and cache folders skipped.

    Hidden files are skipped too: macOS '._name.jpg' resource forks carry image extensions but no image.
    Folder symlinks are followed once (users link sub-sets in), loops are cut by real path. Strings, not
    Paths: on 10,000 files pathlib's parsing alone costs more than reading every header. Sub-folders that
    cannot be listed are skipped and, when ``errors`` is given, appended to it as (path, reason).
    """
    out: list[str] = []
    seen: set[str] = set()

    def walk(d: str) -> None:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if errors is not None:
                errors.append((d, e.strerror or type(e).__name__))
            return
        if d != root_s and any(e.name == MASK_MARKER for e in entries):
            return  # a mask folder inside the dataset (DIR/masks): not more pictures
        for e in entries:
            if e.name.startswith(".") or e.name in CACHE_DIR_NAMES:
                continue
            try:
                if e.is_dir():
                    walk(e.path)
                elif e.is_file():
                    out.append(e.path)
            except OSError:
                continue

    root_s = str(root)
    walk(root_s)
    return out


def walk_files(root: str | os.PathLike) -> list[Path]:
    """walk_paths as Path objects."""
    return [Path(p) for p in walk_paths(root)]


def _repeats_for_rel_dir(rel_dir: str, default_repeats: int) -> tuple[int, str]:
    parts = [p for p in rel_dir.split("/") if p and p != "."]
    for i in range(len(parts) - 1, -1, -1):
        m = _REPEATS_DIR.match(parts[i])
        if m and int(m.group(1)) >= 1:
            return int(m.group(1)), "/".join(parts[: i + 1])
    return default_repeats, "/".join(parts) or "."


def repeats_for(path: str | os.PathLike, root: str | os.PathLike, default_repeats: int = 1) -> tuple[int, str]:
    """(repeats, subset) from the nearest 'N_name' folder between root (excluded) and the file."""
    rel_dir = os.path.relpath(os.path.dirname(os.fspath(path)), os.fspath(root)).replace(os.sep, "/")
    return _repeats_for_rel_dir(rel_dir, default_repeats)


def caption_path(image: Path, caption_extension: str = ".txt") -> Path:
    return image.with_name(image.stem + caption_extension)


def read_caption(path: str | os.PathLike) -> str:
    # utf-8-sig: Windows editors prepend a BOM that would otherwise end up inside the first tag.
    with open(path, encoding="utf-8-sig") as f:
        return f.read().strip()


def is_image_file(path: str | os.PathLike) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def collect_images(root: str | os.PathLike, *, caption_extension: str = ".txt", default_caption: str = "",
                   default_repeats: int = 1) -> tuple[list[ImageItem], list[Problem]]:
    """Images under root (recursive, sorted) with captions and repeats; bad files are skipped and reported."""
    items, _, problems = collect_with_headers(root, caption_extension=caption_extension,
                                              default_caption=default_caption, default_repeats=default_repeats)
    return items, problems


def collect_with_headers(root: str | os.PathLike, *, caption_extension: str = ".txt", default_caption: str = "",
                         default_repeats: int = 1) -> tuple[list[ImageItem], list[ImageHeader], list[Problem]]:
    """collect_images plus each item's full header (mode, format, orientation, file size, tail check)."""
    root = check_folder(root)
    root_s = os.fspath(root)
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    walk_errors: list[tuple[str, str]] = []
    files = walk_paths(root_s, walk_errors)
    file_set = set(files)  # caption lookups by set membership instead of one stat per image
    items: list[ImageItem] = []
    headers: list[ImageHeader] = []
    problems = [Problem(d, "unreadable", f"{d}: folder cannot be listed ({why}); its images are skipped")
                for d, why in walk_errors]
    repeats_cache: dict[str, tuple[int, str]] = {}
    image_stems: set[str] = set()
    for path in files:
        stem, ext = os.path.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        image_stems.add(stem)
        try:
            head = read_header(path)
        except ImageError as e:
            problems.append(Problem(path, e.reason.replace(" ", "_"), str(e)))
            continue
        d = os.path.dirname(path)
        if d not in repeats_cache:
            rel_dir = os.path.relpath(d, root_s).replace(os.sep, "/")
            repeats_cache[d] = _repeats_for_rel_dir(rel_dir, default_repeats)
        repeats, subset = repeats_cache[d]
        cap_file = stem + caption_extension
        caption, has_caption = default_caption, False
        if cap_file in file_set:
            try:
                caption, has_caption = read_caption(cap_file), True
            except (OSError, UnicodeDecodeError) as e:
                problems.append(Problem(cap_file, "unreadable_caption",
                                        f"{cap_file}: caption not readable as UTF-8 text ({type(e).__name__}); "
                                        f"using the default caption"))
        else:
            problems.append(Problem(path, "missing_caption",
                                    f"{path}: no {caption_extension} caption; using "
                                    + (f"'{default_caption}'" if default_caption else "an empty caption")))
        items.append(ImageItem(Path(path), caption, has_caption, repeats, subset, head.width, head.height))
        headers.append(head)
    for f in files:
        if (f.endswith(caption_extension) and not is_image_file(f)
                and f[: -len(caption_extension)] not in image_stems):
            problems.append(Problem(f, "caption_without_image", f"{f}: caption file without a matching image"))
    return items, headers, problems
