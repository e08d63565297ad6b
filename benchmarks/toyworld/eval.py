"""Figures for docs/toyworld.md: the toy base's content accuracy (with and without an unseen trigger word)
and how much of each style's statistic its VAE keeps (stripes, dots, outline, shadow, paper).

    python -m benchmarks.toyworld.eval --n 200 --json outputs/toyworld_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from datasets_tools import toyworld as tw
from benchmarks.threads import add_threads_option, use_threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="toy base folder (default: the committed one)")
    ap.add_argument("--n", type=int, default=200, help="samples per condition")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--trigger", default="zxq style")
    add_threads_option(ap)
    ap.add_argument("--conditions", default="plain,start,end,templates",
                    help="comma list of: plain, start, end (trigger position), templates (random templates)")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)

    use_threads(args.threads)
    from benchmarks.toyworld.pretrain import DEFAULT_OUT, generate, load_toyworld, roundtrip

    pipe = load_toyworld(args.model or DEFAULT_OUT)
    results: dict = {"n": args.n, "steps": args.steps, "guidance": args.guidance, "trigger": args.trigger,
                     "accuracy": {}, "vae": {}}
    rng = np.random.default_rng(7)
    for cond in args.conditions.split(","):
        if cond == "templates":
            ps = [(tw.caption((c, s), rng), c, s) for _, c, s in tw.prompts(args.n, seed=3)]
        else:
            ps = tw.prompts(args.n, seed=0, trigger=None if cond == "plain" else args.trigger,
                            position="start" if cond == "plain" else cond)
        t = time.time()
        imgs = generate(pipe, [p for p, _, _ in ps], seed=0, steps=args.steps, guidance=args.guidance)
        dt = time.time() - t
        r = tw.score_images(imgs, [(c, s) for _, c, s in ps])
        r["seconds"] = round(dt, 1)
        r["example_prompt"] = ps[0][0]
        r["style_statistics"] = {st: round(tw.mean_style_statistic(imgs, st), 2) for st in tw.STYLES}
        results["accuracy"][cond] = r
        print(f"{cond:10s} colour {r['colour']:.3f} shape {r['shape']:.3f} both {r['both']:.3f} "
              f"({dt:.0f} s; e.g. {ps[0][0]!r}) stats {r['style_statistics']} misses {r['misses']}", flush=True)

    for style in tw.ALL_STYLES:
        d_rng = np.random.default_rng(11)
        drawings = [tw.sample_drawing(d_rng) for _ in range(60)]
        imgs = [tw.render(d, style, d_rng) for d in drawings]
        raw = tw.mean_style_statistic(imgs, style)
        rec_imgs = roundtrip(pipe.vae, imgs)
        rec = tw.mean_style_statistic(rec_imgs, style)
        content = tw.score_images(rec_imgs, [(d.colour, d.shape) for d in drawings])
        mse = float(np.mean([(np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2
                             for a, b in zip(imgs, rec_imgs)]))
        results["vae"][style] = {"raw": round(raw, 2), "roundtrip": round(rec, 2), "ratio": round(rec / raw, 3),
                                 "psnr_db": round(10 * np.log10(255 ** 2 / mse), 2),
                                 "content_after_roundtrip": content["both"], "colour_after_roundtrip": content["colour"],
                                 "shape_after_roundtrip": content["shape"]}
        print(f"vae {style:8s} raw {raw:.1f} round trip {rec:.1f} ({rec / raw:.0%}), "
              f"PSNR {results['vae'][style]['psnr_db']} dB, content kept {content['colour']:.0%} colour / "
              f"{content['shape']:.0%} shape", flush=True)
    d_rng = np.random.default_rng(12)
    plain = [tw.render(tw.sample_drawing(d_rng), None, d_rng) for _ in range(60)]
    rec = roundtrip(pipe.vae, plain)
    mse = float(np.mean([(np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2 for a, b in zip(plain, rec)]))
    results["vae"]["plain_psnr_db"] = round(10 * np.log10(255 ** 2 / mse), 2)
    print(f"vae plain PSNR {results['vae']['plain_psnr_db']} dB")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
