"""Toy world: the GUI's first-run demo, measured per style (issue 19, item 5). For each demo style, what a user
gets who presses "Create the demo" with that style, captions with the template captioner and the trigger, and
trains the `demo` preset: the demo folders and preset made by ``app.demo.create_demo``, the captions by
`lorastudio prepare --captioner template --trigger`, the training by `lorastudio train --preset demo` (the
demo's own step budget, ``app.demo.DEMO_STEPS``), the file scored as the style suite scores a LoRA
(``benchmarks.toyworld.suite.score_style``: n samples with and without the trigger, DDIM 20, guidance 5, in
the demo's caption form ``app.demo.CAPTION_FORM``, "zxq style, red circle": a LoRA trained on one form answers it).

    python -m benchmarks.toyworld.demo --work DIR [--styles shadow,outline] [--jobs 2] [--n 30] [--reuse]
                                       [--max-steps N] [--json F] [--markdown F]

Runs go ``--jobs`` at a time, one thread each; each style has its own LORASTUDIO_HOME under DIR (the `demo` user
preset is per home), so styles can train side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.threads import add_threads_option, use_threads

REPO = Path(__file__).resolve().parents[2]


def _cli(args: list[str], home: Path, threads: int = 1) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", LORASTUDIO_HOME=str(home), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=str(REPO), env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"lorastudio {' '.join(args)} exited with {r.returncode}:\n{r.stdout[-3000:]}")


def make_demo(work: Path, style: str) -> Path:
    """The demo as a user makes it in `style`: folders and preset (in this style's own LORASTUDIO_HOME), then template
    captions with the trigger. One at a time: create_demo reads the home from the environment."""
    from app.demo import TRIGGER, create_demo
    root = work / style
    old = os.environ.get("LORASTUDIO_HOME")
    os.environ["LORASTUDIO_HOME"] = str(root / "home")  # create_demo saves the `demo` user preset there
    try:
        info = create_demo(root, style=style)
    finally:
        if old is None:
            os.environ.pop("LORASTUDIO_HOME", None)
        else:
            os.environ["LORASTUDIO_HOME"] = old
    _cli(["prepare", info.images, "--captioner", "template", "--trigger", TRIGGER], root / "home")
    return root


def train_demo(work: Path, style: str, reuse: bool, max_steps: int = 0) -> dict:
    """Train the demo preset of `style` (unless --reuse finds its file); its file, steps and the run's own clock.
    ``max_steps`` cuts the run (a smoke test); 0 keeps the demo's own budget."""
    from app.demo import PRESET_NAME
    root = work / style
    lora = root / "outputs" / "demo-lora" / "demo-lora.safetensors"
    if not (reuse and lora.is_file()):
        cut = ["--set", f"train.max_steps={max_steps}"] if max_steps else []
        _cli(["train", "--preset", PRESET_NAME, "--overwrite", *cut], root / "home")
    from trainer.train.events import read_events
    ev = [e for e in read_events(lora.parent / "events.jsonl") if e.get("type") == "step"]
    return {"style": style, "lora": str(lora), "steps": max((e["step"] for e in ev), default=0),
            "seconds": round(ev[-1]["time"] - ev[0]["time"], 1) if ev else 0.0}


def render(rows: list[dict]) -> str:
    out = ["| style | learned (share of the VAE ceiling) | with trigger / ceiling | without trigger (base) | "
           "content (colour / shape) | steps | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['style']}` | {r['learned']:.0%} | {r['with_trigger']} / {r['ceiling']} | "
                   f"{r['without_trigger']} ({r['base']}) | {r['colour']:.0%} / {r['shape']:.0%} | {r['steps']} | "
                   f"{r['seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from app.demo import CAPTION_FORM, DEMO_STYLES, TRIGGER
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="scratch folder (one demo root per style); kept for --reuse")
    ap.add_argument("--styles", default=",".join(DEMO_STYLES), help="comma list of demo styles")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--n", type=int, default=30, help="samples per condition")
    ap.add_argument("--reuse", action="store_true", help="score demo LoRAs already in --work")
    ap.add_argument("--max-steps", type=int, default=0, help="cut each run to N steps (a smoke run; 0: the demo's)")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", default="")
    add_threads_option(ap)
    args = ap.parse_args(argv)
    styles = [s for s in args.styles.split(",") if s]
    bad = [s for s in styles if s not in DEMO_STYLES]
    if bad:
        print(f"error: --styles: {', '.join(bad)} is not a demo style ({', '.join(DEMO_STYLES)})", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for st in styles:
        if not (args.reuse and (work / st / "outputs").is_dir()):
            make_demo(work, st)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        trained = list(pool.map(lambda st: train_demo(work, st, args.reuse, args.max_steps), styles))
    print(f"trained {len(trained)} demo LoRAs in {time.time() - t0:.0f} s")
    use_threads(args.threads)
    from benchmarks.toyworld import harness as tl
    from benchmarks.toyworld.suite import score_style
    ev = tl.Evaluator()
    rows = []
    for t in trained:
        rows.append({**t, **score_style(ev, t["style"], t["lora"], args.n, trigger=TRIGGER,
                                          template=CAPTION_FORM)})
        print(rows[-1])
    text = render(rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
