"""Toy world: the drop-shadow style trained as LoHa and LoKr (issue 14, item 5), scored as the LoRA is, and a LoHa
shadow mixed with a plain paper-tint LoRA at (1, 1).

    python -m benchmarks.toyworld.lycoris --work DIR [--types loha,lokr] [--mix-type loha] [--set KEY=VALUE ...]
                                          [--train-only] [--reuse] [--n 45] [--label TEXT] [--json F] [--markdown F]

Each adapter is trained through `lorastudio train --config presets/toyworld-style.toml` (the shipped toy preset:
1,000 steps, batch 16, rank 8, conv rank 8, ...) with only ``lora.type`` changed (plus any ``--set``), in the
style suite's layout (``benchmarks.toyworld.suite``: DIR/sets, DIR/runs/shadow-<type>[-label]), and scored with the
suite's ``score_style``: the shadow statistic with the trigger as a share of the VAE ceiling, leakage without the
trigger, content colour and shape. The mix (``benchmarks.toyworld.mixing.measure``) pairs the ``--mix-type`` shadow
with the paper tint trained as a plain LoRA at the same preset (DIR/runs/paper-lora[-steps], ``--paper-steps``). ``--train-only`` trains and
stops (run one process per adapter to use both CPU slots); ``--reuse`` scores the files already in DIR and keeps
scores already made (DIR/scores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.threads import add_threads_option, use_threads

#: Issue 14's bars: with the trigger at least this share of the VAE ceiling; at (1, 1) each statistic keeps this.
LEARN_BAR, MIX_KEEP_BAR = 0.75, 0.6


def _tag(kind: str, label: str) -> str:
    return f"{kind}-{label}" if label else kind


def train_all(work: Path, types: list[str], mix_type: str, sets: dict, reuse: bool, label: str,
              paper_steps: int = 0) -> dict:
    from benchmarks.toyworld import harness as tl
    from benchmarks.toyworld import suite
    if not (work / "sets" / "reg" / "00000.png").exists():
        tl.make_reg_set(work / "sets" / "reg", 30)
    out = {}
    for kind in types:
        over = {**sets, "lora.type": kind}
        out[kind] = suite.train_style(work, "shadow", over, reuse, _tag(kind, label))
    if mix_type:
        over = {"lora.type": "lora", **({"train.max_steps": paper_steps} if paper_steps else {})}
        out["paper"] = suite.train_style(work, "paper", over, True, _tag("lora", str(paper_steps or "")))
    return out


def render(res: dict) -> str:
    per_step = {k: r["seconds"] / max(1, r["steps"]) for k, r in res["trained"].items()}
    ref = per_step.get("lora") or per_step.get("paper")
    lines = ["| adapter | ceiling | base | with trigger | learned | without trigger | leak | content (colour / shape) | "
             "steps | train s | s per step (x LoRA) | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in res["rows"].items():
        t = res["trained"][kind]
        ok = r["learned"] >= LEARN_BAR and r["leak"] <= r["leak_bar"]
        lines.append(f"| {kind} | {r['ceiling']} | {r['base']} | {r['with_trigger']} | {r['learned']:.0%} | "
                     f"{r['without_trigger']} | {r['leak']:+.1%} | {r['colour']:.0%} / {r['shape']:.0%} | "
                     f"{t['steps']} | {t['seconds']:.0f} | {per_step[kind]:.2f}{f' ({per_step[kind] / ref:.2f}x)' if ref else ''} | "
                     f"{'pass' if ok else 'FAIL'} |")
    m = res.get("mix")
    if m:
        rows = m["rows"]
        keep = {st: rows["mix"][f"{st}_stat"] / rows[st][f"{st}_stat"] for st in ("shadow", "paper")}
        lines += ["", f"Mixed at (1, 1): the {res['mix_type']} shadow and the paper-tint LoRA, both triggers, "
                  f"{m['n']} samples:", "",
                  "| adapters | shadow | paper | colour | shape |", "|---|---|---|---|---|"]
        for key in ("base", "shadow", "paper", "mix", "mix_unfused", "mix_no_trigger"):
            v = rows[key]
            lines.append(f"| {v['label'].replace('shadow LoRA', 'shadow ' + res['mix_type'])} | {v['shadow_stat']} | "
                         f"{v['paper_stat']} | {v['colour']:.0%} | {v['shape']:.0%} |")
        lines += ["", f"At (1, 1) the shadow keeps **{keep['shadow']:.0%}** and the paper tint **{keep['paper']:.0%}** "
                  f"of its single value (bar {MIX_KEEP_BAR:.0%}); fused and unfused differ by at most "
                  f"{m['fused_vs_unfused_max_pixel_diff']} of 255 levels (first 10 pictures)."]
        res["mix_keep"] = keep
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.toyworld import suite
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder (sets, runs); kept for --reuse")
    ap.add_argument("--types", default="loha,lokr", help="comma list of lora.type values for the shadow "
                    "(add 'lora' for a reference run in the same conditions)")
    ap.add_argument("--mix-type", default="loha", help="the shadow adapter mixed with the paper LoRA ('' = no mix)")
    ap.add_argument("--paper-steps", type=int, default=0,
                    help="the paper LoRA's train.max_steps (0 = the preset's; the CI mixing test uses 500)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting over the preset")
    ap.add_argument("--label", default="", help="tag for the run names (several settings in one --work)")
    ap.add_argument("--n", type=int, default=45, help="samples per condition")
    add_threads_option(ap, default=1)  # scoring; the trainings run one thread each
    ap.add_argument("--train-only", action="store_true", help="train what is missing and stop")
    ap.add_argument("--reuse", action="store_true", help="score the files already in --work")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args(argv)
    from trainer.config.schema import ADAPTER_TYPES
    types = [t for t in args.types.split(",") if t]
    bad = [t for t in types + ([args.mix_type] if args.mix_type else []) if t not in ADAPTER_TYPES]
    if bad:
        print(f"error: --types/--mix-type: unknown type(s) {', '.join(bad)}; choose from {', '.join(ADAPTER_TYPES)}",
              file=sys.stderr)
        return 2
    if args.mix_type and args.mix_type not in types:
        types.append(args.mix_type)
    work = Path(args.work)
    sets = suite.parse_sets(args.set)
    t0 = time.time()
    trained = train_all(work, types, args.mix_type, sets, args.reuse, args.label, args.paper_steps)
    if args.train_only:
        print(json.dumps(trained, indent=1))
        return 0
    use_threads(args.threads)
    from benchmarks.toyworld import harness as tl
    from benchmarks.toyworld import mixing
    ev = tl.Evaluator()
    ceiling = ev.vae_ceiling("shadow", n=args.n)
    rows = {}
    for kind in types:
        cache = work / "scores" / f"shadow-{_tag(kind, args.label)}-n{args.n}.json"
        if args.reuse and cache.is_file():  # scored before (same file, same n)
            r = json.loads(cache.read_text(encoding="utf-8"))
        else:
            r = suite.score_style(ev, "shadow", trained[kind]["lora"], args.n, ceiling)
            r["leak_bar"] = suite.LEAK_BAR
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(r), encoding="utf-8")
        rows[kind] = r
        print(f"{kind:5s} learned {r['learned']:.0%} (with {r['with_trigger']} / ceiling {r['ceiling']}, base "
              f"{r['base']}, without {r['without_trigger']}) content {r['colour']:.0%}/{r['shape']:.0%}", flush=True)
    res = {"sets": sets, "label": args.label, "n": args.n, "trained": {k: trained[k] for k in types},
           "rows": rows, "mix_type": args.mix_type}
    if args.mix_type:
        res["mix"] = mixing.measure(ev, {"shadow": Path(trained[args.mix_type]["lora"]),
                                         "paper": Path(trained["paper"]["lora"])}, args.n, full=False)
        res["trained"]["paper"] = trained["paper"]
    md = render(res)
    res["wall_s"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
