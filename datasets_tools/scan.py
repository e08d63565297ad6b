"""Scan a training folder without changing it: per-image facts, buckets and crops, and every problem found."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .bucketing import assign_bucket, crop_plan, make_buckets
from .folder import Problem, collect_with_headers
from .images import ImageError, load_rgb

# Problems that make the trainer skip the file; everything else is a warning.
ERROR_KINDS = {"truncated", "empty", "not_an_image", "unreadable"}
# Hamming distance (of 64 bits) at or below which two perceptual hashes count as the same picture: re-encodes
# and small resizes land within ~4, different photos of one subject are usually above 12.
NEAR_DUPLICATE_BITS = 6
# Upscaling more than this (linear) is "too small for the target resolution".
TOO_SMALL_SCALE = 2.0
# The centre crop keeping less than this share of the image means the aspect ratio is extreme for the buckets.
MIN_CROP_KEEP = 0.8


@dataclass
class ImageRecord:
    path: str  # relative to the scanned root, '/'-separated
    width: int  # upright size
    height: int
    mode: str
    format: str
    orientation: int
    file_size: int
    has_caption: bool
    repeats: int
    subset: str
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    upscaled: bool
    crop_keep: float  # share of the image area the crop keeps


@dataclass
class ScanReport:
    root: str
    settings: dict
    images: list[ImageRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    buckets: dict[str, dict] = field(default_factory=dict)  # "WxH" -> {"images": n, "samples": n*repeats}
    warnings: list[str] = field(default_factory=list)
    duplicates: dict[str, list[list[str]]] = field(default_factory=lambda: {"exact": [], "near": []})
    elapsed_s: float = 0.0

    def problems_by_file(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for p in self.problems:
            out[p.path].append(p.kind)
        return dict(out)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    def unusable(self) -> dict[str, Problem]:
        """Files the trainer skips (relative path -> the problem that says why): the scan's verdict."""
        out: dict[str, Problem] = {}
        for p in self.problems:
            if p.kind in ERROR_KINDS:
                out.setdefault(p.path, p)
        return out

    def usable_images(self) -> list[ImageRecord]:
        bad = self.unusable()
        return [r for r in self.images if r.path not in bad]

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "settings": self.settings,
            "summary": {"images": len(self.images), "usable_images": len(self.usable_images()),
                        "problems": self.counts(), "elapsed_s": round(self.elapsed_s, 3)},
            "buckets": self.buckets,
            "warnings": self.warnings,
            "duplicates": self.duplicates,
            "problems_by_file": self.problems_by_file(),
            "problems": [p.to_dict() for p in self.problems],
            "images": [asdict(r) for r in self.images],
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        from .captions import atomic_write_text  # one atomic writer for the package

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")

    def summary(self, max_files: int = 5) -> str:
        return format_summary(self, max_files=max_files)


def _rel(path: Path | str, root: Path | str) -> str:
    path, root = os.fspath(path), os.fspath(root).rstrip(os.sep)
    if path.startswith(root + os.sep):
        return path[len(root) + 1:].replace(os.sep, "/")
    return path


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash: sign of the low 8x8 DCT coefficients of a 32x32 grey thumbnail vs their median."""
    a = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    n = 32
    k = np.arange(n)
    dct = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # DCT-II basis, rows = frequencies
    coeffs = (dct @ a @ dct.T)[:8, :8].ravel()
    bits = coeffs[1:] > np.median(coeffs[1:])  # drop DC: it only says how bright the image is
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def thumbnail_hash(path: Path, orientation: int = 1) -> int:
    """phash of the upright image decoded at reduced size (JPEG draft mode decodes at 1/8 scale directly).

    orientation is accepted for callers that have it; load_rgb applies the file's own EXIF rotation.
    """
    return phash(load_rgb(path, draft_px=64))


def _groups_from_pairs(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def near_pairs(hashes: list[int], max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
    """(i, j, distance) for all i < j with Hamming distance <= max_bits, vectorised in row blocks."""
    if len(hashes) < 2:
        return []
    h = np.array(hashes, dtype=np.uint64)
    out = []
    for start in range(0, len(h), 1024):
        block = h[start:start + 1024]
        dist = np.bitwise_count(block[:, None] ^ h[None, :])
        rows, cols = np.nonzero(dist <= max_bits)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c > i:
                out.append((i, c, int(dist[r, c])))
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan_folder(root: str | os.PathLike, *, resolution: int = 512, min_px: int = 256, max_px: int = 1024,
                step: int = 64, no_upscale: bool = False, batch_size: int = 1, caption_extension: str = ".txt",
                default_repeats: int = 1, exact_duplicates: bool = True, near_duplicates: bool = True,
                near_bits: int = NEAR_DUPLICATE_BITS, full_decode: bool = False, mask_dir: str | None = None,
                progress=None) -> ScanReport:
    """Scan root read-only and report images, buckets, crops, problems and warnings.

    Header-only by default: a truncation check reads each file's last bytes and decodes only suspects
    (full_decode=True decodes everything). Exact duplicates hash only files whose sizes collide; near
    duplicates decode small thumbnails (JPEG at 1/8 scale), so they cost most and can be turned off.
    ``mask_dir`` (data.mask_dir): also report each usable image's mask that is missing, of another size, empty
    or unreadable (warnings: the trainer refuses a wrong size, and trains an image without a mask everywhere).
    ``progress(done, total, stage)`` is called now and then for front-ends.
    """
    t0 = time.perf_counter()
    settings = {"resolution": resolution, "min_px": min_px, "max_px": max_px, "step": step,
                "no_upscale": no_upscale, "batch_size": batch_size, "caption_extension": caption_extension,
                "near_duplicates": near_duplicates, "near_bits": near_bits, "full_decode": full_decode,
                "mask_dir": str(mask_dir or "")}
    buckets = make_buckets(resolution, min_px, max_px, step)
    items, headers, problems = collect_with_headers(root, caption_extension=caption_extension,
                                                    default_repeats=default_repeats)
    root_p = Path(root).expanduser().absolute()
    report = ScanReport(str(root_p.resolve()), settings)
    for p in problems:
        p.path = _rel(p.path, root_p)
        p.message = p.message.replace(str(root_p) + os.sep, "")
    report.problems = problems
    total = len(items)

    def add(path: str, kind: str, message: str) -> None:
        report.problems.append(Problem(path, kind, message))

    sizes: dict[int, list[int]] = defaultdict(list)
    for n, (item, head) in enumerate(zip(items, headers)):
        rel = _rel(item.path, root_p)
        file_size = head.file_size
        if full_decode or not head.tail_ok:
            try:
                load_rgb(item.path)
            except ImageError as e:
                add(rel, e.reason.replace(" ", "_"), f"{rel}: {e.reason}")
        bucket = assign_bucket(item.width, item.height, buckets, no_upscale=no_upscale, resolution=resolution,
                               step=step)
        plan = crop_plan(item.width, item.height, bucket)
        keep = (bucket[0] * bucket[1]) / (plan.resized[0] * plan.resized[1])
        report.images.append(ImageRecord(rel, item.width, item.height, head.mode, head.format, head.orientation,
                                         file_size, item.has_caption, item.repeats, item.subset, bucket,
                                         plan.resized, plan.box, plan.upscaled, round(keep, 4)))
        sizes[file_size].append(n)
        # "Too small" is judged against the full-size bucket even with no_upscale: the image then trains
        # at a lower resolution than asked for, which is the same problem in another form.
        full_bucket = bucket if not no_upscale else assign_bucket(item.width, item.height, buckets)
        scale = max(full_bucket[0] / item.width, full_bucket[1] / item.height)
        if scale > TOO_SMALL_SCALE:
            add(rel, "too_small", f"{rel}: {item.width}x{item.height} is too small for resolution {resolution} "
                f"(needs {scale:.1f}x upscaling to bucket {full_bucket[0]}x{full_bucket[1]})")
        if keep < MIN_CROP_KEEP:
            ar = max(item.width / item.height, item.height / item.width)
            add(rel, "extreme_aspect", f"{rel}: aspect ratio {ar:.2f}:1; the {bucket[0]}x{bucket[1]} crop keeps "
                f"only {keep:.0%} of the image")
        if progress and n % 256 == 0:
            progress(n, total, "headers")

    records = report.images
    bad = {p.path for p in report.problems if p.kind in ERROR_KINDS}
    if exact_duplicates:
        by_digest: dict[str, list[int]] = defaultdict(list)
        for idxs in sizes.values():
            if len(idxs) > 1:  # equal bytes need equal sizes: hash only where sizes collide
                for i in idxs:
                    try:
                        by_digest[_file_digest(items[i].path)].append(i)
                    except OSError:
                        continue
        for idxs in sorted(by_digest.values()):
            if len(idxs) > 1:
                group = [records[i].path for i in sorted(idxs)]
                report.duplicates["exact"].append(group)
                for other in group[1:]:
                    add(other, "exact_duplicate", f"{other}: same bytes as {group[0]}")
    if near_duplicates:
        exact_of = {p: g[0] for g in report.duplicates["exact"] for p in g[1:]}
        idx, hashes = [], []
        for n, r in enumerate(records):
            if r.path in bad or r.path in exact_of:
                continue
            try:
                hashes.append(thumbnail_hash(items[n].path, r.orientation))
                idx.append(n)
            except ImageError as e:
                add(r.path, e.reason.replace(" ", "_"), f"{r.path}: {e.reason}")
                bad.add(r.path)
            if progress and n % 64 == 0:
                progress(n, total, "thumbnails")
        pairs = near_pairs(hashes, near_bits)
        dist = {(a, b): d for a, b, d in pairs}
        for group in _groups_from_pairs(len(hashes), [(a, b) for a, b, _ in pairs]):
            paths = [records[idx[i]].path for i in group]
            report.duplicates["near"].append(paths)
            for i in group[1:]:
                d = dist.get((group[0], i))
                how = f" (distance {d}/64)" if d is not None else ""
                add(records[idx[i]].path, "near_duplicate",
                    f"{records[idx[i]].path}: looks like {paths[0]}{how}")

    bad = {p.path for p in report.problems if p.kind in ERROR_KINDS}
    if mask_dir:
        from .masks import check_masks
        mroot = Path(mask_dir).expanduser()
        if not mroot.is_dir():
            report.warnings.append(f"mask folder not found: {mroot}")
        else:
            for mp in check_masks([(r.path, (r.width, r.height)) for r in records if r.path not in bad], mroot):
                add(mp.path, mp.kind, mp.message.replace(str(root_p) + os.sep, ""))
    counts: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    upscaled = 0
    for r in records:
        if r.path in bad:
            continue
        counts[r.bucket][0] += 1
        counts[r.bucket][1] += r.repeats
        upscaled += r.upscaled
    report.buckets = {f"{w}x{h}": {"images": c[0], "samples": c[1]} for (w, h), c in sorted(counts.items())}
    for name, c in report.buckets.items():
        if c["samples"] < batch_size:
            report.warnings.append(f"bucket {name} has {c['samples']} sample(s) per epoch, fewer than the batch "
                                   f"size {batch_size}: its batches will be smaller (kept, not dropped)")
    if upscaled:
        report.warnings.append(f"{upscaled} image(s) will be upscaled to their bucket"
                               + ("" if no_upscale else " (use no_upscale to train them at their own size)"))
    report.problems.sort(key=lambda p: (p.path, p.kind))
    report.elapsed_s = time.perf_counter() - t0
    if progress:
        progress(total, total, "done")
    return report


def unusable_files(root: str | os.PathLike, *, caption_extension: str = ".txt",
                   full_decode: bool = False) -> dict[str, Problem]:
    """The files of root that the scan calls unusable (truncated, empty, not an image, unreadable), relative path
    -> Problem.

    Captioning and caption edits ask this, so a file gets a caption exactly when the scan (and therefore the
    trainer) would use it: there is one verdict, not a second check. Duplicate searches are off: they never
    make a file unusable.
    """
    report = scan_folder(root, caption_extension=caption_extension, exact_duplicates=False, near_duplicates=False,
                         full_decode=full_decode)
    return report.unusable()


def describe_skipped(skipped: list[Problem], max_files: int = 10) -> str:
    """'skipped 2 unusable files: cut.png (truncated), empty.jpg (empty)' for a summary line; '' for none."""
    if not skipped:
        return ""
    names = [f"{p.path} ({p.kind.replace('_', ' ')})" for p in skipped[:max_files]]
    more = f", and {len(skipped) - max_files} more" if len(skipped) > max_files else ""
    return (f"skipped {len(skipped)} unusable file{'s' if len(skipped) != 1 else ''}: "
            + ", ".join(names) + more)


_KIND_TITLES = {
    "truncated": "truncated (skipped)", "empty": "empty file (skipped)", "not_an_image": "not an image (skipped)",
    "unreadable": "unreadable (skipped)", "too_small": "too small for the target resolution",
    "exact_duplicate": "exact duplicate", "near_duplicate": "near duplicate", "extreme_aspect": "extreme aspect ratio",
    "missing_caption": "no caption file", "unreadable_caption": "caption file unreadable",
    "caption_without_image": "caption without an image",
    "mask_missing": "no mask (trains everywhere)", "mask_size": "mask of another size (training refuses it)",
    "mask_empty": "empty mask (trains nothing)", "mask_unreadable": "mask unreadable",
}


def format_summary(report: ScanReport, max_files: int = 5) -> str:
    """A readable terminal summary: totals, bucket table, problems by kind (a few files each), warnings."""
    usable = report.usable_images()
    lines = [f"Scanned {report.root}: {len(report.images)} image(s), {len(usable)} usable, "
             f"{sum(r.repeats for r in usable)} sample(s) per epoch with repeats ({report.elapsed_s:.2f}s)"]
    if report.buckets:
        lines.append("Buckets (WxH: images / samples per epoch):")
        for name, c in report.buckets.items():
            lines.append(f"  {name:>10}: {c['images']:>6} / {c['samples']}")
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in report.problems:
        by_kind[p.kind].append(p)
    if by_kind:
        lines.append("Problems:")
        order = sorted(by_kind, key=lambda k: (k not in ERROR_KINDS, k))
        for kind in order:
            probs = by_kind[kind]
            lines.append(f"  {_KIND_TITLES.get(kind, kind)}: {len(probs)}")
            for p in probs[:max_files]:
                lines.append(f"    {p.message}")
            if len(probs) > max_files:
                lines.append(f"    ... and {len(probs) - max_files} more (see the JSON report)")
    else:
        lines.append("No problems found.")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
