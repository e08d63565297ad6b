"""Toy world: masked loss, the validation curve and EMA, shown to work (docs/toyworld-quality.md).

Three experiments, each through the normal `lorastudio train` path with the shipped toy preset:

* **masked**: style pictures that carry an ink outline on the shape and a warm paper tint on the background,
  with masks covering the shape and its outline, trained with the masks, with the masks and the inverted-mask
  prior (data.inverted_mask_prior), and without masks. With masks the LoRA should learn the outline and leave the
  background at the base level; without them it learns the tint too.
* **validation**: the drop-shadow LoRA with a fifth of its pictures held out: its validation curve should fall;
  with the learning rate raised tenfold (validated every 5 steps) and threefold it should turn up again.
* **ema**: the same run with train.ema_decay = 0.99 and train.ema_save_both: the EMA file's style statistic
  within 10% of the raw file's (the plain run's weights), with less step-to-step variance of the validation loss.

    python -m benchmarks.toyworld.quality [--only masked,validation,ema] [--runs val-plain,...] [--reuse]
                                          [--work DIR] [--json F] [--markdown F]

--runs trains and scores only the named runs (to spread them over processes); each run's scores are kept in its
folder (quality-score.json), so a later --reuse renders the tables without scoring again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_tools import toyworld as tw

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = ("masked", "validation", "ema")
VALIDATE_EVERY = 50
LR10_EVERY = 5        # the tenfold learning rate's curve, densely: does it fall before it turns up?


def make_masked_set(folder: Path, n: int = 30, seed: int = 1, trigger: str = "vbn style") -> Path:
    """Outline-on-the-shape pictures on paper, captioned with the trigger, and <folder>-masks/<stem>.png covering
    exactly the shape and its outline (what the masked loss trains)."""
    folder.mkdir(parents=True, exist_ok=True)
    masks = folder.parent / (folder.name + "-masks")
    masks.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in tw.COLOURS for s in tw.SHAPES]
    for i in range(n):
        c, s = pairs[rng.permutation(len(pairs))[0]] if i >= len(pairs) else pairs[i]
        d = tw.sample_drawing(rng, c, s)
        tw.render(d, "outline+paper", rng).save(folder / f"{i:05d}.png")
        shape = tw.shape_mask(np.asarray(tw.render(d, None)))
        cover = tw._grow(shape, tw.OUTLINE_WIDTH)
        Image.fromarray((cover * 255).astype(np.uint8), "L").save(masks / f"{i:05d}.png")
        text = tw.add_trigger(tw.caption(d, rng), trigger)
        (folder / f"{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
    return masks


def _events(run_dir: Path) -> list[dict]:
    from trainer.train.events import read_events
    return read_events(run_dir / "events.jsonl")


def _curve(run_dir: Path) -> list[list[float]]:
    return [[e["step"], e["loss"]] for e in _events(run_dir) if e["type"] == "validation"]


def _score(ev, lora: Path | None, style: str, trigger: str, n: int, stats=None) -> dict:
    ev.set_loras([(lora, 1.0)] if lora else [])
    stats = stats or (style,)
    on, _ = ev.score(tw.prompts(n, seed=0, trigger=trigger), styles=stats)
    off, _ = ev.score(tw.prompts(n, seed=0), styles=stats)
    ev.set_loras([])
    return {"with_trigger": on.row(), "without_trigger": off.row()}


def _train(tl, data, work: Path, name: str, reuse: bool, **kw) -> Path:
    lora = work / "runs" / name / f"{name}.safetensors"
    if reuse and lora.is_file():
        print(f"{name}: reusing {lora}", flush=True)
        return lora
    return tl.train_style_lora(data, work / "runs", name, **kw)


MASKED_RUNS = {"with_masks": lambda m: {"data.mask_dir": str(m)},
               "with_masks_prior": lambda m: {"data.mask_dir": str(m), "data.inverted_mask_prior": 1.0},
               # ai-toolkit's default weight of the prior
               "with_masks_prior_0.5": lambda m: {"data.mask_dir": str(m), "data.inverted_mask_prior": 0.5},
               # the masks grown by one latent cell (4 px), so no cell the outline touches is pulled to the base
               "with_grown_masks_prior": lambda m: {"data.mask_dir": str(grown_masks(m)),
                                                    "data.inverted_mask_prior": 1.0},
               "without_masks": lambda m: {}}
GROW_PX = 4  # the toy VAE's latent cell


def grown_masks(masks: Path) -> Path:
    """<masks>-grown: every mask dilated by GROW_PX (a square max filter), made once."""
    out = masks.parent / (masks.name + "-grown")
    if not out.is_dir():
        from PIL import ImageFilter
        out.mkdir()
        for f in sorted(masks.glob("*.png")):
            Image.open(f).convert("L").filter(ImageFilter.MaxFilter(2 * GROW_PX + 1)).save(out / f.name)
    return out


def masked(work: Path, ev, n: int, threads: int, steps: int, reuse: bool = False, runs: set | None = None) -> dict:
    from benchmarks.toyworld import harness as tl
    data = work / "outline-paper"
    masks = make_masked_set(data) if not data.is_dir() else data.parent / (data.name + "-masks")
    reg = work / "reg"
    if not reg.is_dir():
        tl.make_reg_set(reg)
    stats = ("outline", "paper")
    rows = {}
    if not runs or "base" in runs:
        (work / "base").mkdir(exist_ok=True)
        rows["base"] = _cached_score(work / "base", reuse, lambda: _score(ev, None, "outline", "vbn style", n,
                                                                          stats=stats))
    for name, extra in MASKED_RUNS.items():
        run = f"masked-{name}"
        if runs and run not in runs:
            continue
        t = time.time()
        lora = _train(tl, data, work, run, reuse, reg_dir=reg, threads=threads,
                      overrides={**extra(masks), **({"train.max_steps": steps} if steps else {})})
        rows[name] = _cached_score(lora.parent, reuse, lambda: {
            **_score(ev, lora, "outline", "vbn style", n, stats=stats), "train_s": round(time.time() - t)})
        print(json.dumps({name: rows[name]}), flush=True)
    return rows


def _cached_score(run_dir: Path, reuse: bool, score) -> dict:
    """The run's scores, from <run>/quality-score.json when reusing (scoring takes minutes), else scored now."""
    f = run_dir / "quality-score.json"
    if reuse and f.is_file():
        return json.loads(f.read_text(encoding="utf-8"))
    row = score()
    f.write_text(json.dumps(row), encoding="utf-8")
    return row


def _shadow_run(work: Path, ev, n: int, threads: int, steps: int, name: str, extra: dict,
                reuse: bool = False, every: int = VALIDATE_EVERY, few: int = 0) -> dict:
    """One drop-shadow run with validation (a 0.2 split; with ``few``, trained on the first ``few`` pictures
    and validated on the others), scored."""
    from benchmarks.toyworld import harness as tl
    data, reg = work / "shadow", work / "reg"
    if not data.is_dir():
        tl.make_style_set(data, "shadow")
    if not reg.is_dir():
        tl.make_reg_set(reg)
    sets = {"data.validation_split": 0.2, "train.validation_every_steps": every, **extra}
    if few:
        data, held_out = few_pictures(data, few)
        sets |= {"data.validation_split": 0.0, "data.validation_dir": str(held_out)}
    if steps:
        sets["train.max_steps"] = steps
    t = time.time()
    ended = [e for e in _events(work / "runs" / name) if e["type"] == "run_ended"] if reuse else []
    if ended and "diverged" in ended[-1].get("error", ""):
        row = {"diverged": ended[-1]["error"].split(";")[0], "curve": _curve(work / "runs" / name)}
        print(json.dumps({name: row}), flush=True)
        return row
    try:
        lora = _train(tl, data, work, name, reuse, reg_dir=reg, overrides=sets, threads=threads)
    except RuntimeError as e:
        if "diverged" not in str(e):
            raise
        line = next(ln for ln in str(e).splitlines()[::-1] if "diverged" in ln)
        row = {"diverged": line.split("error: ", 1)[-1].split(";")[0], "curve": _curve(work / "runs" / name)}
        print(json.dumps({name: row}), flush=True)
        return row
    row = _cached_score(lora.parent, reuse, lambda: {**_score(ev, lora, "shadow", "zxq style", n),
                                                     "train_s": round(time.time() - t)})
    row["curve"] = _curve(lora.parent)
    raw = lora.with_name(lora.stem + "-raw.safetensors")
    if raw.is_file():  # train.ema_save_both: the same run's plain weights
        f = lora.parent / "quality-score-raw.json"
        row["raw"] = (json.loads(f.read_text(encoding="utf-8")) if reuse and f.is_file()
                      else _score(ev, raw, "shadow", "zxq style", n))
        f.write_text(json.dumps(row["raw"]), encoding="utf-8")
    print(json.dumps({name: row}), flush=True)
    return row


FEW = 3  # the overfitting run: trained on 3 of the 30 shadow pictures, validated on the other 27


def few_pictures(data: Path, k: int) -> tuple[Path, Path]:
    """<data>-few with the first k pictures (and captions) of ``data``, <data>-few-held-out with the rest."""
    import shutil
    few, held = data.with_name(data.name + "-few"), data.with_name(data.name + "-few-held-out")
    if not few.is_dir():
        few.mkdir()
        held.mkdir()
        for i, img in enumerate(sorted(data.glob("*.png"))):
            for f in (img, img.with_suffix(".txt")):
                shutil.copy2(f, (few if i < k else held) / f.name)
    return few, held


def curve_summary(curve: list[list[float]]) -> dict:
    """First, lowest (and where) and last point, and the step-to-step variance of the curve."""
    losses = [v for _, v in curve]
    i = int(np.argmin(losses))
    return {"first": losses[0], "min": losses[i], "min_step": curve[i][0], "last": losses[-1],
            "rise_after_min": losses[-1] - losses[i], "step_var": float(np.var(np.diff(losses))),
            "diff_std": float(np.std(np.diff(losses))) if len(losses) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help="comma list of: " + ", ".join(EXPERIMENTS))
    ap.add_argument("--work", default=str(REPO / "outputs" / "toyworld-quality"))
    ap.add_argument("--n", type=int, default=30, help="pictures scored per prompt set")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="override the preset's max_steps (0 = keep)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--markdown", default="", help="write the tables here")
    ap.add_argument("--runs", default="", help="only these runs (comma list, e.g. val-plain,val-lr10; default all)")
    ap.add_argument("--reuse", action="store_true", help="score LoRAs already trained in --work instead of training")
    args = ap.parse_args(argv)
    from benchmarks.toyworld.harness import Evaluator
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ev = Evaluator()
    only = [x for x in args.only.split(",") if x]
    res: dict = {}
    runs = set(filter(None, args.runs.split(",")))
    if "masked" in only:
        res["masked"] = masked(work, ev, args.n, args.threads, args.steps, args.reuse, runs)

    def shadow(name: str, extra: dict, every: int = VALIDATE_EVERY, few: int = 0):
        if runs and name not in runs:
            return None
        return _shadow_run(work, ev, args.n, args.threads, args.steps, name, extra, args.reuse, every, few)

    if "validation" in only or "ema" in only:
        from trainer.config import load_config
        lr = load_config(str(REPO / "presets" / "toyworld-style.toml")).train.learning_rate
        plain = shadow("val-plain", {})
        res["validation"] = {"plain": plain}
        if "validation" in only:
            res["validation"]["lr_x10"] = shadow("val-lr10", {"train.learning_rate": lr * 10}, LR10_EVERY)
            res["validation"]["lr_x3"] = shadow("val-lr3", {"train.learning_rate": lr * 3})
            # overfitting by design: 3 training pictures, 27 held out
            res["validation"]["few"] = shadow("val-few", {}, few=FEW)
        if "ema" in only:
            res["ema"] = {"plain": plain, "ema": shadow("val-ema", {"train.ema_decay": 0.99,
                                                                     "train.ema_save_both": True})}
        res = {k: ({n: r for n, r in v.items() if r is not None} if isinstance(v, dict) else v)
               for k, v in res.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    if runs:  # a part of the experiments: the JSON only (a later --reuse run renders the tables)
        return 0
    text = render(res)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


def render(res: dict) -> str:
    out = ["# Toy world: masked loss, validation and EMA", "",
           "Written by `python -m benchmarks.toyworld.quality` (every run is `lorastudio train` with the shipped",
           "`presets/toyworld-style.toml`; 30 pictures scored per prompt set). Statistics are 0-255 levels of the",
           "toy world's style statistics (`datasets_tools/toyworld.py`).", ""]
    if "masked" in res:
        m = res["masked"]
        out += ["## Masked loss", "",
                "Style pictures: an ink outline on the shape, on a warm paper background; masks cover the shape and",
                "its outline. The outline statistic is the style the masks keep; the paper statistic is the",
                "background the masks leave out.", "",
                "| run | outline, trigger | paper (background), trigger | paper, no trigger | colour | shape |",
                "|---|---|---|---|---|---|"]
        for name in ("base", *MASKED_RUNS):
            if name not in m:
                continue
            r = m[name]
            on, off = r["with_trigger"], r["without_trigger"]
            out.append(f"| {name.replace('_', ' ')} | {on['outline_stat']} | {on['paper_stat']} | "
                       f"{off['paper_stat']} | {on['colour']:.0%} | {on['shape']:.0%} |")
        out.append("")
    if "validation" in res:
        v = res["validation"]
        out += ["## Validation curve", "",
                f"The drop-shadow LoRA with `data.validation_split = 0.2`, measured every {VALIDATE_EVERY} steps "
                "(fixed noise and timesteps).", "",
                "| run | first | lowest (step) | last | last - lowest | shadow, trigger |", "|---|---|---|---|---|---|"]
        for name, r in v.items():
            s = curve_summary(r["curve"])
            style = r["with_trigger"]["shadow_stat"] if "with_trigger" in r else r["diverged"]
            out.append(f"| {name} | {s['first']:.5f} | {s['min']:.5f} ({s['min_step']}) | {s['last']:.5f} | "
                       f"{s['rise_after_min']:+.5f} | {style} |")
        out.append("")
    if "ema" in res:
        e = res["ema"]
        p, q = e["plain"], e["ema"]
        sp, sq = curve_summary(p["curve"]), curve_summary(q["curve"])
        ratio = q["with_trigger"]["shadow_stat"] / max(1e-9, p["with_trigger"]["shadow_stat"])
        out += ["## EMA", "", "The same run with `train.ema_decay = 0.99` (warm-up on).", "",
                "| run | shadow, trigger | shadow, no trigger | validation step-to-step variance |",
                "|---|---|---|---|",
                f"| plain | {p['with_trigger']['shadow_stat']} | {p['without_trigger']['shadow_stat']} | "
                f"{sp['step_var']:.3g} |",
                f"| EMA | {q['with_trigger']['shadow_stat']} | {q['without_trigger']['shadow_stat']} | "
                f"{sq['step_var']:.3g} |", "",
                f"EMA / plain style statistic: {ratio:.2f}.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
