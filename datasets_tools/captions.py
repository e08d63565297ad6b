"""Caption file edits (prefix, replace, remove, dedupe), tag frequencies, and the backup that makes each undoable."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable

from .errors import DatasetError
from .folder import Problem, caption_path, check_folder, is_image_file, read_caption, repeats_for, walk_files

BACKUP_DIR = ".lorastudio_backup"
_MANIFEST = "manifest.json"

Transform = Callable[[str], str]


# ----------------------------------------------------------------------------------------------- file writing
def _new_file_mode(path: Path) -> int:
    # mkstemp creates 0600 files; keep an existing file's mode, else what a plain open() would give.
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename over the target: readers never see half a file."""
    path = Path(path)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def ensure_writable(dirs: set[Path] | list[Path]) -> None:
    """Prove each folder accepts a new file (a real probe: permission bits say nothing when running as root)."""
    for d in sorted(set(dirs)):
        try:
            fd, probe = tempfile.mkstemp(dir=d, prefix=".lorastudio_probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise DatasetError(f"cannot write captions in {d}: {e.strerror or e} (read-only folder?); "
                               f"nothing was changed", path=str(d)) from None


# ----------------------------------------------------------------------------------------------- tags
def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def prefix_transform(prefix: str) -> Transform:
    """Put the trigger first; an existing copy elsewhere moves to the front rather than appearing twice."""
    prefix = prefix.strip().strip(",").strip()
    if not prefix:
        raise DatasetError("prefix is empty", field="--add-prefix")

    def fn(caption: str) -> str:
        tags = split_tags(caption)
        if tags and tags[0] == prefix:
            return caption
        return join_tags([prefix] + [t for t in tags if t != prefix])
    return fn


def parse_replacement(spec: str) -> tuple[str, str]:
    """'find=>replacement' -> (find, replacement); the replacement may be empty (delete)."""
    if "=>" not in spec:
        raise DatasetError(f"replacement '{spec}' must look like 'find=>replacement'", field="--replace")
    find, repl = spec.split("=>", 1)
    if not find.strip():
        raise DatasetError(f"replacement '{spec}' has nothing to find", field="--replace")
    return find.strip(), repl.strip()


def replace_transform(find: str, repl: str) -> Transform:
    """Replace `find` where it stands as whole words ('1girl' does not touch '1girls'), then tidy commas."""
    left = r"(?<!\w)" if re.match(r"\w", find[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", find[-1]) else ""
    pattern = re.compile(left + re.escape(find) + right)

    def fn(caption: str) -> str:
        out = pattern.sub(lambda _: repl, caption)
        if out == caption:
            return caption
        if "," in caption:  # tag list: drop tags the replacement emptied
            return join_tags(split_tags(out))
        return " ".join(out.split())
    return fn


def _norm_tag(tag: str) -> str:
    # Booru tags are written both as 'long_hair' and 'long hair'; treat them as one tag when matching.
    return " ".join(tag.replace("_", " ").lower().split())


def remove_tags_transform(tags: list[str]) -> Transform:
    drop = {_norm_tag(t) for t in tags if t.strip()}
    if not drop:
        raise DatasetError("no tags given to remove", field="--remove-tags")

    def fn(caption: str) -> str:
        kept = [t for t in split_tags(caption) if _norm_tag(t) not in drop]
        return caption if kept == split_tags(caption) else join_tags(kept)
    return fn


def add_tags_transform(tags: Iterable[str]) -> Transform:
    """Append the tags a caption lacks, in the order given (matched as remove_tags matches: case, '_' and spaces
    alike); an empty caption becomes the tags. Each item may itself be a comma-separated list."""
    add: list[str] = []
    for t in (x for item in tags for x in split_tags(item)):
        if _norm_tag(t) not in {_norm_tag(a) for a in add}:
            add.append(t)
    if not add:
        raise DatasetError("no tags given to add", field="--add-tags")

    def fn(caption: str) -> str:
        have = {_norm_tag(t) for t in split_tags(caption)}
        new = [t for t in add if _norm_tag(t) not in have]
        return caption if not new else join_tags(split_tags(caption) + new)
    return fn


def caption_matches(caption: str, *, tags: Iterable[str] = (), text: str = "", name: str = "") -> bool:
    """The caption carries every tag in ``tags`` (matched as remove_tags matches) and ``text`` occurs in the
    caption or in the file's ``name`` (case-insensitive); empty criteria match everything."""
    have = {_norm_tag(t) for t in split_tags(caption)}
    if any(_norm_tag(t) not in have for t in tags if t.strip()):
        return False
    text = " ".join(text.lower().split())
    return not text or text in " ".join(caption.lower().split()) or text in name.lower()


def dedupe_transform() -> Transform:
    def fn(caption: str) -> str:
        seen, kept = set(), []
        for t in split_tags(caption):
            if _norm_tag(t) not in seen:
                seen.add(_norm_tag(t))
                kept.append(t)
        return caption if kept == split_tags(caption) else join_tags(kept)
    return fn


# ----------------------------------------------------------------------------------------------- edits + backup
@dataclass
class EditResult:
    operation: str
    changed: list[str] = field(default_factory=list)  # caption files rewritten (relative to root)
    created: list[str] = field(default_factory=list)  # caption files that did not exist before
    deleted: list[str] = field(default_factory=list)  # only undo deletes: files an edit had created
    backup: str | None = None  # backup folder, None when nothing changed
    skipped: list[Problem] = field(default_factory=list)  # images the scan calls unusable: captions left alone

    def summary(self) -> str:
        from .scan import describe_skipped

        parts = [f"{self.operation}: {len(self.changed)} caption(s) changed"]
        if self.created:
            parts.append(f"{len(self.created)} created")
        if self.deleted:
            parts.append(f"{len(self.deleted)} removed")
        text = ", ".join(parts)
        if self.backup:
            text += f" (backup: {self.backup}; undo with `lorastudio captions DIR --undo`)"
        if self.skipped:
            text += "; " + describe_skipped(self.skipped)
        return text


def image_caption_pairs(root: Path, caption_extension: str = ".txt") -> list[tuple[Path, Path]]:
    """(image, caption file) for every image under root, whether the caption file exists or not."""
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    return [(f, caption_path(f, caption_extension)) for f in walk_files(root) if is_image_file(f)]


def _new_backup_dir(root: Path) -> Path:
    base = root / BACKUP_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):  # two edits in one second get -01, -02: names must sort in creation order
        d = base / f"{stamp}-{n:02d}"
        if not d.exists() and not (base / f"{stamp}-{n:02d}.undone").exists():
            return d
    raise DatasetError(f"too many backups this second in {base}")


class CaptionWriter:
    """Writes caption texts in as many batches as needed under one backup, so one undo reverts them all.

    Each batch is backed up before it is written and each file is replaced atomically; a failure part-way
    through a batch restores that batch's files and raises a one-line DatasetError. Files whose text would
    not change are left alone, and no backup folder is made until something changes.
    """

    def __init__(self, root: str | os.PathLike, *, operation: str):
        self.root = check_folder(root).resolve()
        self.result = EditResult(operation)
        self.backup: Path | None = None
        self.manifest = {"operation": operation, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": {}}
        self._checked: set[Path] = set()

    def check(self, dirs) -> None:
        """Probe folders before doing slow work (captioning) that would otherwise end in a write error."""
        todo = {Path(d).resolve() for d in dirs} - self._checked
        ensure_writable(todo | ({self.root} - self._checked))
        self._checked |= todo | {self.root}

    def write(self, texts: dict[Path, str]) -> list[str]:
        changes: dict[Path, str] = {}
        for path, text in texts.items():
            path = Path(path).resolve()
            if path.is_file():
                try:
                    if read_caption(path) == text.strip():  # a trailing newline is no reason to rewrite
                        continue
                except (OSError, UnicodeDecodeError):
                    pass  # unreadable captions get replaced (and backed up as raw bytes)
            changes[path] = text
        if not changes:
            return []
        self.check({p.parent for p in changes})
        if self.backup is None:
            self.backup = _new_backup_dir(self.root)
        files_dir = self.backup / "files"
        try:
            for path in sorted(changes):
                rel = path.relative_to(self.root).as_posix()
                if rel in self.manifest["files"]:
                    continue  # written earlier in this edit: the backup already holds the original
                existed = path.is_file()
                self.manifest["files"][rel] = existed
                if existed:
                    dest = files_dir / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest)
            self.backup.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.backup / _MANIFEST, json.dumps(self.manifest, indent=1, ensure_ascii=False))
        except OSError as e:
            raise DatasetError(f"cannot back up captions into {self.backup}: {e.strerror or e}; "
                               f"nothing more was changed") from None
        written: list[Path] = []
        try:
            for path in sorted(changes):
                atomic_write_text(path, changes[path])
                written.append(path)
        except OSError as e:
            _restore(self.root, self.backup, only=written)
            raise DatasetError(f"writing {path} failed ({e.strerror or e}); this batch's captions were restored",
                               path=str(path)) from None
        rels = []
        for path in sorted(changes):
            rel = path.relative_to(self.root).as_posix()
            rels.append(rel)
            if rel not in self.result.changed:
                self.result.changed.append(rel)
                if not self.manifest["files"][rel]:
                    self.result.created.append(rel)
        self.result.backup = str(self.backup)
        return rels


def apply_caption_texts(root: str | os.PathLike, texts: dict[Path, str], *, operation: str) -> EditResult:
    """Write new caption texts as one undoable edit; nothing is written unless every folder is writable."""
    writer = CaptionWriter(root, operation=operation)
    writer.write(texts)  # probes every target folder before the first byte is written
    return writer.result


def _restore(root: Path, backup: Path, only: list[Path] | None = None) -> tuple[list[str], list[str]]:
    manifest = json.loads((backup / _MANIFEST).read_text(encoding="utf-8"))
    restored, deleted = [], []
    wanted = None if only is None else {p.relative_to(root).as_posix() for p in only}
    for rel, existed in sorted(manifest["files"].items()):
        if wanted is not None and rel not in wanted:
            continue
        target = root / rel
        if existed:
            atomic_write_bytes(target, (backup / "files" / rel).read_bytes())
            restored.append(rel)
        elif target.exists():
            target.unlink()
            deleted.append(rel)
    return restored, deleted


def list_backups(root: str | os.PathLike) -> list[Path]:
    """Backups that can still be undone, oldest first."""
    base = check_folder(root) / BACKUP_DIR
    if not base.is_dir():
        return []
    return sorted(d for d in base.iterdir() if d.is_dir() and not d.name.endswith(".undone")
                  and (d / _MANIFEST).is_file())


def undo(root: str | os.PathLike) -> EditResult:
    """Restore the captions saved by the last edit (and delete the ones it created); repeatable step by step."""
    root = check_folder(root).resolve()
    backups = list_backups(root)
    if not backups:
        raise DatasetError(f"nothing to undo: no caption backups in {root / BACKUP_DIR}")
    last = backups[-1]
    try:
        manifest = json.loads((last / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"backup {last} is unreadable ({e}); restore by hand from {last / 'files'}") from None
    ensure_writable({(root / rel).parent for rel in manifest["files"]} | {root / BACKUP_DIR})
    try:
        restored, deleted = _restore(root, last)
    except OSError as e:
        raise DatasetError(f"undo from {last} failed part-way ({e.strerror or e}); run undo again") from None
    # Renamed, not deleted: the restored files stay recoverable, and the next undo goes one step further back.
    last.rename(last.with_name(last.name + ".undone"))
    return EditResult(f"undo {manifest.get('operation', '')}".strip(), changed=restored + deleted, deleted=deleted)


def edit_captions(root: str | os.PathLike, transforms: list[Transform], *, operation: str,
                  caption_extension: str = ".txt", create_missing: bool = False, dry_run: bool = False,
                  only: Collection[str] | None = None) -> EditResult:
    """Run transforms over every image's caption (in order) and write the results as one undoable edit.

    only: image paths relative to root (as ``a/b.png``) to edit; None edits every image.
    create_missing: images without a caption file get one when the transforms produce text from "".
    dry_run: report what would change, write nothing.
    Images the scan calls unusable (truncated, empty, not an image) are skipped, caption and all, and listed
    in ``skipped``: the trainer would not use them, so an edit must not create or change their captions.
    """
    from .scan import unusable_files

    root = check_folder(root).resolve()
    unusable = unusable_files(root, caption_extension=caption_extension)
    texts: dict[Path, str] = {}
    skipped: list[Problem] = []
    wanted = None if only is None else set(only)
    for img, cap in image_caption_pairs(root, caption_extension):
        if wanted is not None and img.relative_to(root).as_posix() not in wanted:
            continue
        bad = unusable.get(img.relative_to(root).as_posix())
        if bad is not None:
            skipped.append(bad)
            continue
        if cap.is_file():
            try:
                old = read_caption(cap)
            except (OSError, UnicodeDecodeError) as e:
                raise DatasetError(f"{cap}: caption not readable as UTF-8 text ({type(e).__name__})",
                                   path=str(cap)) from None
        elif create_missing:
            old = ""
        else:
            continue
        new = old
        for fn in transforms:
            new = fn(new)
        if new != old:
            texts[cap] = new
    if dry_run:
        pairs = sorted((p.relative_to(root).as_posix(), p) for p in texts)
        return EditResult(f"{operation} (dry run)", changed=[r for r, _ in pairs],
                          created=[r for r, p in pairs if not p.exists()], skipped=skipped)
    result = apply_caption_texts(root, texts, operation=operation)
    result.skipped = skipped
    return result


def add_prefix(root, prefix: str, *, caption_extension: str = ".txt", create_missing: bool = True,
               dry_run: bool = False) -> EditResult:
    """Put the trigger word first in every caption (no duplicates); images without captions get one."""
    return edit_captions(root, [prefix_transform(prefix)], operation=f"add prefix '{prefix}'",
                         caption_extension=caption_extension, create_missing=create_missing, dry_run=dry_run)


def replace_text(root, find: str, repl: str, *, caption_extension: str = ".txt", dry_run: bool = False) -> EditResult:
    return edit_captions(root, [replace_transform(find, repl)], operation=f"replace '{find}' => '{repl}'",
                         caption_extension=caption_extension, dry_run=dry_run)


def remove_tags(root, tags: list[str], *, caption_extension: str = ".txt", dry_run: bool = False,
                only: Collection[str] | None = None) -> EditResult:
    return edit_captions(root, [remove_tags_transform(tags)],
                         operation=f"remove tags {', '.join(tags)}" + _on(only),
                         caption_extension=caption_extension, dry_run=dry_run, only=only)


def add_tags(root, tags: list[str], *, caption_extension: str = ".txt", create_missing: bool = True,
             dry_run: bool = False, only: Collection[str] | None = None) -> EditResult:
    """Append tags to the captions that lack them (all images, or ``only`` these); images without captions get one."""
    return edit_captions(root, [add_tags_transform(tags)], operation=f"add tags {', '.join(tags)}" + _on(only),
                         caption_extension=caption_extension, create_missing=create_missing, dry_run=dry_run,
                         only=only)


def _on(only: Collection[str] | None) -> str:
    return "" if only is None else f" on {len(set(only))} picture(s)"


def dedupe_tags(root, *, caption_extension: str = ".txt", dry_run: bool = False) -> EditResult:
    return edit_captions(root, [dedupe_transform()], operation="dedupe tags", caption_extension=caption_extension,
                         dry_run=dry_run)


# ----------------------------------------------------------------------------------------------- statistics
def tag_frequency(root: str | os.PathLike, *, caption_extension: str = ".txt") -> dict[str, dict[str, int]]:
    """{folder: {tag: images carrying it}} in the shape of kohya's ss_tag_frequency metadata.

    Folders are the dataset's sub-sets ('10_zxq' for kohya layouts; the root folder's own name for images
    directly inside it), counted once per image (repeats do not multiply).
    """
    root = check_folder(root).resolve()
    freq: dict[str, Counter] = {}
    for img, cap in image_caption_pairs(root, caption_extension):
        if not cap.is_file():
            continue
        try:
            tags = split_tags(read_caption(cap))
        except (OSError, UnicodeDecodeError):
            continue
        _, subset = repeats_for(img, root)
        key = root.name if subset == "." else subset
        freq.setdefault(key, Counter()).update(tags)
    return {k: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for k, c in sorted(freq.items())}


def total_frequency(freq: dict[str, dict[str, int]]) -> list[tuple[str, int]]:
    total: Counter = Counter()
    for tags in freq.values():
        total.update(tags)
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))


def format_frequency(freq: dict[str, dict[str, int]], top: int = 40) -> str:
    rows = total_frequency(freq)
    if not rows:
        return "No caption tags found."
    width = max(len(t) for t, _ in rows[:top])
    lines = [f"{len(rows)} distinct tag(s) in {len(freq)} folder(s); top {min(top, len(rows))}:"]
    lines += [f"  {t:<{width}}  {n}" for t, n in rows[:top]]
    return "\n".join(lines)
