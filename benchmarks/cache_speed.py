"""Latent caching speed: pictures per second with data.cache_batch_size 1 against 8, same process.

Full-size SD1.5 VAE architecture with random weights (no download), 16 pictures of one bucket, encoded through
the trainer's own LatentCache.build.

    python -m benchmarks.cache_speed [--n 16] [--resolution 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL

    from benchmarks.train_speed import make_images
    from trainer import config as C
    from trainer.train.data import LatentCache, build_data
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    tmp = Path(tempfile.mkdtemp(prefix="lorastudio-cache-bench-"))
    make_images(tmp / "data", args.n, args.resolution)
    cfg = C.load_config(None, [f"data.dir={tmp / 'data'}", f"data.resolution={args.resolution}",
                               f"data.min_bucket_px={args.resolution}", f"data.max_bucket_px={args.resolution}"])
    data = build_data(cfg, lambda w: None)
    rates = {}
    for batch in (1, args.batch, 1):  # batch 1 twice: the first warms the kernels up
        cache = LatentCache(data, vae, device=torch.device("cpu"), dtype=torch.float32, disk_dir=None, flip=False)
        t = time.perf_counter()
        cache.build(list(range(len(data.examples))), lambda d, n: True, lambda i, why: None, batch_size=batch)
        rates[batch] = len(data.examples) / (time.perf_counter() - t)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.n} pictures at {args.resolution} px")
    print(f"batch 1: {rates[1]:.2f} pictures/s   batch {args.batch}: {rates[args.batch]:.2f} pictures/s   "
          f"ratio {rates[args.batch] / rates[1]:.2f}x (batching must help: > 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
