"""Aspect-ratio buckets, the resize-and-crop each image gets, and same-size batches (shared by trainer and preview)."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from PIL import Image

from .errors import DatasetError


def _check(resolution: int, min_px: int, max_px: int, step: int) -> None:
    if step <= 0:
        raise DatasetError(f"bucket step must be positive, got {step}", field="data.bucket_step_px")
    if min_px > max_px:
        raise DatasetError(f"min bucket side {min_px} is larger than max bucket side {max_px}",
                           field="data.min_bucket_px")
    if resolution < step:
        raise DatasetError(f"resolution {resolution} is smaller than the bucket step {step}", field="data.resolution")


def make_buckets(resolution: int, min_px: int = 256, max_px: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    """All (w, h) with sides multiples of step in [min_px, max_px] and the largest height with w*h <= resolution^2.

    Same construction as kohya's make_bucket_resolutions: one bucket per width, so every aspect ratio
    the range allows is covered with an area as close to resolution^2 as the step permits.
    """
    _check(resolution, min_px, max_px, step)
    max_area = resolution * resolution
    lo = -(-min_px // step) * step  # min_px rounded up to the step
    hi = max_px // step * step
    side = min(resolution // step * step, hi)
    buckets = {(side, side)}
    w = lo
    while w <= hi:
        h = min(hi, max_area // w // step * step)
        if h >= lo:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


@functools.lru_cache(maxsize=64)
def _log_table(buckets: tuple[tuple[int, int], ...]) -> list[tuple[float, int, tuple[int, int]]]:
    return [(math.log(b[0] / b[1]), -b[0] * b[1], b) for b in buckets]


def _nearest(buckets: tuple[tuple[int, int], ...], log_ar: float) -> tuple[int, int]:
    # Log ratios make 2:1 and 1:2 equally far from square (a plain ratio difference favours portrait); ties go
    # to the larger area, then the smaller (w, h), so the choice never depends on list order.
    best = min(_log_table(buckets), key=lambda t: (abs(t[0] - log_ar), t[1], t[2]))
    return best[2]


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]], *, no_upscale: bool = False,
                  resolution: int = 512, step: int = 64) -> tuple[int, int]:
    """Bucket with the nearest aspect ratio (ties: larger area).

    With no_upscale the bucket never exceeds the image on either side: when the nearest bucket would
    need upscaling, the image gets its own bucket (its size, shrunk to the target area if larger,
    rounded down to the step, never below one step).
    """
    if width <= 0 or height <= 0:
        raise DatasetError(f"image size {width}x{height} is not valid")
    if not buckets:
        raise DatasetError("no buckets to assign from")
    best = _nearest(tuple(buckets), math.log(width / height))
    if not no_upscale or (best[0] <= width and best[1] <= height):
        return best
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    max_side = max(max(b) for b in buckets)
    scale = min(scale, max_side / max(width, height))  # keep extreme images within the largest bucket side
    w = max(step, int(width * scale) // step * step)
    h = max(step, int(height * scale) // step * step)
    return (w, h)


@dataclass
class CropPlan:
    """How one image becomes its bucket: resize to ``resized`` (covering the bucket), then crop ``box``."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    box: tuple[int, int, int, int]  # left, top, right, bottom in resized coordinates
    upscaled: bool

    def to_dict(self) -> dict:
        return {"bucket": list(self.bucket), "resized": list(self.resized), "box": list(self.box),
                "upscaled": self.upscaled}


def crop_plan(width: int, height: int, bucket: tuple[int, int]) -> CropPlan:
    """Scale to cover the bucket keeping the aspect ratio, then crop the centre."""
    bw, bh = int(bucket[0]), int(bucket[1])
    if width <= 0 or height <= 0 or bw <= 0 or bh <= 0:
        raise DatasetError(f"cannot crop a {width}x{height} image to bucket {bw}x{bh}")
    scale = max(bw / width, bh / height)
    rw = max(bw, round(width * scale))
    rh = max(bh, round(height * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return CropPlan((bw, bh), (rw, rh), (left, top, left + bw, top + bh), scale > 1.0 + 1e-9)


def apply_crop(img: Image.Image, plan: CropPlan, mode: str = "RGB") -> Image.Image:
    """Resize and crop in one resampling pass (Lanczos down, bicubic up) to a bucket-sized image of ``mode``
    (RGB for pictures, L for their masks: a mask goes through exactly its picture's plan)."""
    if img.mode != mode:
        img = img.convert(mode)
    w, h = img.size
    rw, rh = plan.resized
    sx, sy = w / rw, h / rh
    left, top, right, bottom = plan.box
    # Resampling only the source region that survives the crop avoids resizing pixels we then discard.
    src = (left * sx, top * sy, right * sx, bottom * sy)
    if plan.bucket == (w, h) and src == (0, 0, w, h):
        return img.copy()
    resample = Image.Resampling.BICUBIC if plan.upscaled else Image.Resampling.LANCZOS
    return img.resize(plan.bucket, resample, box=src)


def bucket_batches(buckets_per_item: list[tuple[int, int]], batch_size: int, *, seed: int, epoch: int,
                   shuffle: bool = True) -> list[list[int]]:
    """Batches of item indices, each from one bucket; every index once; the last partial batch per bucket kept.

    Deterministic for (seed, epoch): a string seed goes through random's SHA-512 seeding, independent
    of PYTHONHASHSEED.
    """
    if batch_size < 1:
        raise DatasetError(f"batch size must be at least 1, got {batch_size}", field="train.batch_size")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets_per_item):
        groups.setdefault((int(b[0]), int(b[1])), []).append(i)
    rng = random.Random(f"lorastudio-buckets:{seed}:{epoch}")
    batches: list[list[int]] = []
    for key in sorted(groups):
        idx = groups[key]
        if shuffle:
            rng.shuffle(idx)
        batches.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def plan_image(width: int, height: int, *, resolution: int = 512, min_px: int = 256, max_px: int = 1024,
               step: int = 64, no_upscale: bool = False, enable_bucket: bool = True,
               buckets: list[tuple[int, int]] | None = None) -> CropPlan:
    """Bucket and crop for one image from the data settings; the trainer and the preview both call this."""
    if not enable_bucket:  # bucketing off: every image is centre-cropped to one resolution x resolution square
        return crop_plan(width, height, (resolution, resolution))
    if buckets is None:
        buckets = make_buckets(resolution, min_px, max_px, step)
    bucket = assign_bucket(width, height, buckets, no_upscale=no_upscale, resolution=resolution, step=step)
    return crop_plan(width, height, bucket)
