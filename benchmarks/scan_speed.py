"""Header-only scan + bucketing speed on generated images, as images/s and as a ratio to full decoding.

    python benchmarks/scan_speed.py [--count 10000] [--keep DIR]

Generates small images in mixed formats, sizes, modes and EXIF orientations (with captions for most),
then times, on the same files in the same run:
  1. collect_images + plan_image: what the trainer does before training (headers only);
  2. scan_folder header-only: adds tail truncation checks and exact-duplicate hashing of size collisions;
  3. baseline: fully decoding a sample with load_rgb (what a scanner that opens every image would do);
  4. scan_folder with near duplicates (thumbnail decode) on the same sample, for scale.
Files are freshly written, so the page cache is warm: these are best-case disk numbers.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from datasets_tools.bucketing import make_buckets, plan_image  # noqa: E402
from datasets_tools.folder import collect_images  # noqa: E402
from datasets_tools.images import load_rgb  # noqa: E402
from datasets_tools.scan import scan_folder  # noqa: E402

FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP"), ("tif", "TIFF"), ("gif", "GIF")]


def generate(root: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    base = Image.effect_noise((256, 256), 40).convert("RGB")
    for i in range(count):
        sub = root / (f"{rng.randint(1, 20)}_set{i % 7}" if i % 3 else f"plain{i % 5}")
        sub.mkdir(parents=True, exist_ok=True)
        ext, fmt = FORMATS[i % len(FORMATS)]
        w, h = rng.randint(48, 320), rng.randint(48, 320)
        img = base.resize((w, h), Image.Resampling.NEAREST)
        if i % 11 == 0:
            img = img.convert("L")
        kw = {}
        if fmt == "JPEG":
            kw["quality"] = 80
            if i % 4 == 0:
                exif = Image.Exif()
                exif[0x0112] = 6
                kw["exif"] = exif
        img.save(sub / f"img{i:05d}.{ext}", fmt, **kw)
        if i % 10:
            (sub / f"img{i:05d}.txt").write_text(f"zxq, tag{i % 13}", encoding="utf-8")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=1000, help="images fully decoded for the baseline")
    ap.add_argument("--keep", help="generate into this folder and keep it")
    args = ap.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorastudio_scan_bench_"))
    try:
        if not any(root.rglob("*.png")):
            _, gen_s = timed(lambda: generate(root, args.count))
            print(f"generated {args.count} images in {gen_s:.1f}s under {root}")
        buckets = make_buckets(512)

        def trainer_path():
            items, problems = collect_images(root)
            return [plan_image(it.width, it.height, resolution=512, buckets=buckets) for it in items], items

        (plans, items), t_collect = timed(trainer_path)
        n = len(items)
        report, t_scan = timed(lambda: scan_folder(root, resolution=512, batch_size=4, near_duplicates=False))
        sample = [it.path for it in items[:: max(1, n // args.sample)]][: args.sample]
        _, t_decode = timed(lambda: [load_rgb(p) for p in sample])
        decode_rate = len(sample) / t_decode

        sample_root = Path(tempfile.mkdtemp(prefix="lorastudio_scan_bench_near_"))
        for i, p in enumerate(sample):
            shutil.copy(p, sample_root / f"{i:05d}{p.suffix}")
        near, t_near = timed(lambda: scan_folder(sample_root, near_duplicates=True))
        shutil.rmtree(sample_root, ignore_errors=True)

        collect_rate, scan_rate = n / t_collect, n / t_scan
        print(f"images: {n} ({len(report.buckets)} buckets, {len(report.problems)} problems reported)")
        print(f"collect_images + plan_image (headers only): {t_collect:6.2f}s  {collect_rate:8.0f} images/s")
        print(f"scan_folder header-only (+tail, exact dups): {t_scan:6.2f}s  {scan_rate:8.0f} images/s")
        print(f"baseline full decode (load_rgb, {len(sample)} imgs):  {t_decode:6.2f}s  {decode_rate:8.0f} images/s")
        print(f"scan_folder + near duplicates ({len(sample)} imgs):  {t_near:6.2f}s  {len(sample) / t_near:8.0f} "
              f"images/s")
        print(f"ratio header-only scan / full decode: {scan_rate / decode_rate:.1f}x")
        print(f"goal > 2000 images/s header-only: {'met' if scan_rate > 2000 else 'NOT met'}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
