"""Toy world: the style suite (issue 19). One recipe, every style: train a style LoRA per style through the normal
`lorastudio train` path, sample it through the generation engine and score it against what the VAE can show.

    python -m benchmarks.toyworld.suite --work DIR [--styles a,b | --held-out | --all] [--set KEY=VALUE ...]
                                        [--jobs 2] [--n 30] [--reuse] [--json F] [--markdown F] [--label TEXT]

Per style (``datasets_tools.toyworld.STYLE_KINDS``): 30 style pictures with the trigger first and the same 30
plain regularisation pictures, the shipped preset (``presets/toyworld-style.toml``) plus any ``--set``; then the
style's statistic on n samples with and without the trigger, the content (colour, shape), the steps and the
training time. "learned" is the statistic with the trigger as a share of the VAE ceiling (the statistic of drawn
pictures after an encode/decode round trip). The held-out styles (``HELD_OUT``) run only with ``--held-out`` or
``--all``: they were designed with the others but are not looked at while the recipe is tuned.
Runs go ``--jobs`` at a time, one thread each (two 1-thread runs on 2 cores finish sooner than two 2-thread runs
one after the other).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from datasets_tools import toyworld as tw
from benchmarks.threads import add_threads_option, use_threads

REPO = Path(__file__).resolve().parents[2]
#: The issue's bars: with the trigger at least this share of the VAE ceiling (goal 0.8), content at least this.
LEARN_BAR, LEARN_GOAL, COLOUR_BAR, SHAPE_BAR = 0.6, 0.8, 0.9, 0.85
LEAK_BAR = 0.1  # without the trigger, at most the base's level plus this share of the ceiling
TUNING = tuple(s for s in tw.STYLE_KINDS if s not in tw.HELD_OUT)


def trigger_for(style: str) -> str:
    from benchmarks.toyworld import harness as tl
    return tl.TRIGGERS.get(style, "zxq style")


def train_style(work: Path, style: str, sets: dict, reuse: bool, tag: str) -> dict:
    """Train one style's LoRA (or reuse it); its file, steps and wall time."""
    from benchmarks.toyworld import harness as tl
    name = f"{style}-{tag}" if tag else style
    lora = work / "runs" / name / f"{name}.safetensors"
    t0 = time.time()
    if not (reuse and lora.is_file()):
        data = work / "sets" / style
        if not (data / "00000.png").exists():
            tl.make_style_set(data, style, 30, trigger=trigger_for(style))
        lora = tl.train_style_lora(data, work / "runs", name, reg_dir=work / "sets" / "reg", overrides=sets,
                                   threads=1)
    from safetensors import safe_open
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata() or {}
    seconds = time.time() - t0
    events = lora.parent / "events.jsonl"
    if events.is_file():  # the run's own clock (right for a reused run too): first event to last
        from trainer.train.events import read_events
        ev = read_events(events)
        if ev:
            seconds = ev[-1]["time"] - ev[0]["time"]
    return {"style": style, "lora": str(lora), "seconds": round(seconds, 1),
            "steps": int(meta.get("ss_steps", meta.get("lorastudio.steps", 0)) or 0), "reused": reuse}


def score_style(ev, style: str, lora: str | None, n: int, ceiling: dict | None = None,
                trigger: str | None = None, template: int | str = 2) -> dict:
    """`lora` scored on `style` with its trigger (the suite's per style unless given) and without, on prompts in
    caption ``template`` (datasets_tools.toyworld.caption; 2 is "a {c} {s}"; the suite trains on random forms)."""
    ceiling = ceiling or ev.vae_ceiling(style, n=n)
    trig = trigger or trigger_for(style)
    with_trigger = tw.prompts(n, seed=3, template=template, trigger=trig)
    ev.set_loras([])
    base_on, _ = ev.score(with_trigger, styles=(style,))
    ev.set_loras([(lora, 1.0)])
    on, _ = ev.score(with_trigger, styles=(style,))
    off, _ = ev.score(tw.prompts(n, seed=3, template=template), styles=(style,))
    ev.set_loras([])
    c = ceiling["roundtrip"]
    learned = on.style[style] / c if c else 0.0
    leak = (off.style[style] - base_on.style[style]) / c if c else 0.0
    # The content bar, of what the VAE itself keeps: under a pattern drawn over the shape (stripes, dots) the toy VAE
    # reads back only about 2/3 of the shapes right, so no LoRA can show 85% there (docs/toyworld-suite.md).
    shape_bar = SHAPE_BAR * min(1.0, ceiling["shape"] / 0.95)
    ok = (learned >= LEARN_BAR and on.colour >= COLOUR_BAR and on.shape >= shape_bar and leak <= LEAK_BAR)
    return {"ceiling": round(c, 1), "raw": round(ceiling["raw"], 1), "base": round(base_on.style[style], 1),
            "with_trigger": round(on.style[style], 1), "without_trigger": round(off.style[style], 1),
            "learned": round(learned, 3), "leak": round(leak, 3), "colour": on.colour, "shape": on.shape,
            "colour_off": off.colour, "shape_off": off.shape, "shape_bar": round(shape_bar, 3), "passes": ok}


def render_markdown(res: dict) -> str:
    out = ["| style | kind | ceiling | base | with trigger | learned | without | content (colour / shape) | steps | "
           "train s | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        held = " (held out)" if r["style"] in tw.HELD_OUT else ""
        out.append(f"| {r['style']}{held} | {tw.STYLE_KINDS[r['style']]} | {r['ceiling']} | {r['base']} | "
                   f"{r['with_trigger']} | {r['learned']:.0%} | {r['without_trigger']} | "
                   f"{r['colour']:.0%} / {r['shape']:.0%} | {r['steps']} | {r['seconds']:.0f} | "
                   f"{'pass' if r['passes'] else 'FAIL'} |")
    return "\n".join(out) + "\n"


def describe(n: int = 45) -> str:
    """The suite itself: each style's kind, its statistic raw and after a VAE round trip (the ceiling; a style
    counts only if it keeps >= 80%), the content after the round trip, and what every statistic reads on every
    style's drawn pictures (its own level on the diagonal; blind means small elsewhere)."""
    import numpy as np

    from benchmarks.toyworld.pretrain import load_toyworld, roundtrip
    from benchmarks.toyworld.harness import TOYWORLD_BASE
    vae = load_toyworld(TOYWORLD_BASE).vae
    rng_pairs = [(c, sh) for c in tw.COLOURS for sh in tw.SHAPES]
    styles = list(tw.STYLE_KINDS)
    drawn = {}
    for st in [None] + styles:
        rng = np.random.default_rng(6)
        ds = [tw.sample_drawing(rng, *rng_pairs[i % len(rng_pairs)]) for i in range(n)]
        drawn[st] = ([tw.render(d, st, rng) for d in ds], [(d.colour, d.shape) for d in ds])
    out = ["| style | kind | held out | raw | after the VAE | kept | content after the VAE (colour / shape) |",
           "|---|---|---|---|---|---|---|"]
    for st in styles:
        imgs, exp = drawn[st]
        rec = roundtrip(vae, imgs)
        raw, rt = tw.mean_style_statistic(imgs, st), tw.mean_style_statistic(rec, st)
        c = tw.score_images(rec, exp)
        out.append(f"| {st} | {tw.STYLE_KINDS[st]} | {'yes' if st in tw.HELD_OUT else ''} | {raw:.1f} | {rt:.1f} | "
                   f"{rt / raw:.0%} | {c['colour']:.0%} / {c['shape']:.0%} |")
    out += ["", "What each statistic (column) reads on pictures drawn in each style (row), " + str(n) + " pictures:", "",
            "| drawn in | " + " | ".join(styles) + " |", "|---|" + "---|" * len(styles)]
    for st in [None] + styles:
        imgs, _ = drawn[st]
        out.append(f"| {st or 'plain'} | " + " | ".join(f"{tw.mean_style_statistic(imgs, o):.1f}" for o in styles)
                   + " |")
    return "\n".join(out) + "\n"


def parse_sets(items: list[str]) -> dict:
    sets = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"error: --set {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        sets[k.strip()] = v.strip()
    return sets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="", help="scratch folder (sets, runs); kept for --reuse")
    ap.add_argument("--styles", default="", help="comma list (default: the tuning styles " + ", ".join(TUNING) + ")")
    ap.add_argument("--held-out", action="store_true", help="the held-out styles: " + ", ".join(tw.HELD_OUT))
    ap.add_argument("--all", action="store_true", help="every style of the suite")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting over the preset")
    ap.add_argument("--label", default="", help="tag for the run names (several recipes in one --work)")
    ap.add_argument("--jobs", type=int, default=2)
    add_threads_option(ap)
    ap.add_argument("--n", type=int, default=30, help="samples per condition")
    ap.add_argument("--reuse", action="store_true", help="score LoRAs already in --work instead of training")
    ap.add_argument("--score-every", type=int, default=0, metavar="N",
                    help="also save the LoRA every N steps and score each save (learning against steps)")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--describe", action="store_true",
                    help="print the suite itself (ceilings, cross-talk matrix) as markdown and stop")
    args = ap.parse_args(argv)
    if args.describe:
        print(describe(args.n if args.n != 30 else 45))
        return 0
    styles = (list(tw.STYLE_KINDS) if args.all else list(tw.HELD_OUT) if args.held_out else
              [s for s in args.styles.split(",") if s] or list(TUNING))
    bad = [s for s in styles if s not in tw.STYLE_KINDS]
    if bad:
        print(f"error: --styles: unknown style(s) {', '.join(bad)}; choose from {', '.join(tw.STYLE_KINDS)}",
              file=sys.stderr)
        return 2
    if not args.work:
        print("error: --work: a scratch folder is needed", file=sys.stderr)
        return 2
    sets = parse_sets(args.set)
    if args.score_every:
        sets["train.save_every_steps"] = str(args.score_every)
    work = Path(args.work)
    from benchmarks.toyworld import harness as tl
    if not (work / "sets" / "reg" / "00000.png").exists():
        tl.make_reg_set(work / "sets" / "reg", 30)
    t0 = time.time()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        trained = list(pool.map(lambda s: train_style(work, s, sets, args.reuse, args.label), styles))
    use_threads(args.threads)
    ev = tl.Evaluator()
    rows = []
    for t in trained:
        ceiling = ev.vae_ceiling(t["style"], n=args.n)
        rows.append({**t, **score_style(ev, t["style"], t["lora"], args.n, ceiling)})
        r = rows[-1]
        if args.score_every:
            final = Path(t["lora"])
            r["by_step"] = {}
            for f in sorted(final.parent.glob(f"{final.stem}-step*.safetensors")):
                st = int(f.stem.rsplit("-step", 1)[1])
                sc = score_style(ev, t["style"], str(f), args.n, ceiling)
                r["by_step"][st] = {k: sc[k] for k in ("learned", "leak", "colour", "shape", "passes")}
                print(f"  {t['style']} at step {st}: learned {sc['learned']:.0%} content {sc['colour']:.0%}/"
                      f"{sc['shape']:.0%}", flush=True)
        print(f"{r['style']:8s} learned {r['learned']:.0%} (with {r['with_trigger']} / ceiling {r['ceiling']}, "
              f"base {r['base']}, without {r['without_trigger']}) content {r['colour']:.0%}/{r['shape']:.0%} "
              f"{'pass' if r['passes'] else 'FAIL'}", flush=True)
    res = {"sets": sets, "label": args.label, "n": args.n, "rows": rows, "wall_s": round(time.time() - t0, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    md = render_markdown(res)
    if args.markdown:
        Path(args.markdown).write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
