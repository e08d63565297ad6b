"""Toy world, phase 2: make style sets, train style LoRAs through the normal `lorastudio train` path, and score them.

Used by the ablation table (``python -m benchmarks.toyworld.ablations``) and its tests in tests/benchmarks/toyworld/test_toyworld.py.
Images are sampled through the same generation engine as ``lorastudio generate`` (``trainer.generate.engine.Generator``),
so a LoRA that is written wrong, scaled wrong or whose text-encoder half is never applied scores wrong here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets_tools import toyworld as tw

REPO = Path(__file__).resolve().parents[2]
TOYWORLD_BASE = REPO / "trainer" / "assets" / "toyworld"
TOYWORLD_PRESET = REPO / "presets" / "toyworld-style.toml"
TRIGGERS = {"stripes": "zxq style", "dots": "vbn style", "shadow": "zxq style", "outline": "vbn style",
            "paper": "vbn style"}

EVAL_STEPS = 20        # DDIM steps and guidance of every toy-world figure (as in phase 1)
EVAL_GUIDANCE = 5.0


def make_style_set(folder: str | Path, style: str, n: int = 30, *, trigger: str | None = None,
                   position: str = "start", seed: int = 1) -> list[dict]:
    """n drawn pictures in `style`, balanced over the 15 colour-shape pairs, captioned with the trigger."""
    trigger = TRIGGERS.get(style, "zxq style") if trigger is None else trigger
    return tw.make_dataset(folder, n, style=style, trigger=trigger, seed=seed, position=position)


def make_reg_set(folder: str | Path, n: int = 30, *, seed: int = 2) -> list[dict]:
    """n plain pictures with ordinary captions: the prior-preservation (regularisation) set."""
    return tw.make_dataset(folder, n, style=None, trigger=None, seed=seed)


def train_style_lora(data_dir: str | Path, out_dir: str | Path, name: str, *, reg_dir: str | Path | None = None,
                     base: str | Path = TOYWORLD_BASE, preset: str | Path = TOYWORLD_PRESET,
                     overrides: dict | None = None, threads: int | None = None, quiet: bool = True) -> Path:
    """Train with `lorastudio train --config <preset> --set ...` in a subprocess; returns the LoRA file."""
    sets = {"model.base": str(base), "data.dir": str(data_dir), "output.dir": str(out_dir), "output.name": name}
    if reg_dir:
        sets["data.reg_dir"] = str(reg_dir)
    sets.update(overrides or {})
    cmd = [sys.executable, "-m", "app.cli", "train", "--config", str(preset), "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]  # --set parses the text by the key's type (True, 0.002, a path ...)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run(cmd, cwd=str(REPO), env=env, text=True,
                       stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    if r.returncode != 0:
        tail = (r.stdout or "")[-3000:] if quiet else ""
        raise RuntimeError(f"lorastudio train exited with {r.returncode}: {' '.join(cmd)}\n{tail}")
    out = Path(out_dir) / name / f"{name}.safetensors"
    if not out.is_file():
        raise RuntimeError(f"lorastudio train wrote no {out}")
    return out


@dataclass
class Scores:
    """Content accuracy and style statistics of a batch of generated pictures."""
    colour: float
    shape: float
    both: float
    style: dict = field(default_factory=dict)   # style name -> mean statistic
    n: int = 0
    seconds: float = 0.0

    def row(self) -> dict:
        return {"colour": round(self.colour, 3), "shape": round(self.shape, 3), "both": round(self.both, 3),
                **{f"{k}_stat": round(v, 1) for k, v in self.style.items()}, "n": self.n}


class Evaluator:
    """The toy base loaded once in the generation engine; LoRAs are swapped in with weights."""

    def __init__(self, base: str | Path = TOYWORLD_BASE):
        from trainer.config import default_config
        from trainer.generate.engine import Generator
        from trainer.models.loading import load_base_model
        cfg = default_config()
        cfg.model.base = str(base)
        self.model = load_base_model(cfg.model)
        self.gen = Generator(self.model)

    def set_loras(self, loras: list[tuple[str | Path, float]], mode: str = "fused") -> None:
        from trainer.generate.engine import LoraSpec
        self.gen.set_loras([LoraSpec(str(p), float(w)) for p, w in loras], mode=mode)

    def images(self, prompts: list[tuple[str, str, str]], seed: int = 0) -> list[np.ndarray]:
        """One picture per prompt; picture i uses seed*1000+i, whatever the LoRAs."""
        by_prompt: dict[str, list[int]] = {}
        for i, (p, _, _) in enumerate(prompts):
            by_prompt.setdefault(p, []).append(i)
        out: list = [None] * len(prompts)
        for p, idx in by_prompt.items():
            imgs = self.gen._generate(p, "", [seed * 1000 + i for i in idx], steps=EVAL_STEPS,
                                      guidance_scale=EVAL_GUIDANCE, width=tw.SIZE, height=tw.SIZE, sampler="ddim")
            for i, im in zip(idx, imgs):
                out[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return out

    def score(self, prompts: list[tuple[str, str, str]], seed: int = 0, styles=tw.STYLES) -> tuple[Scores, list]:
        t = time.time()
        imgs = self.images(prompts, seed)
        r = tw.score_images(imgs, [(c, s) for _, c, s in prompts])
        st = {s: float(tw.mean_style_statistic(imgs, s)) for s in styles}
        return Scores(r["colour"], r["shape"], r["both"], st, len(imgs), time.time() - t), imgs

    def vae_ceiling(self, style: str, n: int = 60, seed: int = 11, statistics: tuple[str, ...] | None = None) -> dict:
        """The style statistic of drawn pictures raw and after a VAE round trip, and the content that survives.
        ``style`` may combine ("shadow+paper"); ``statistics`` (default: the style's own) are measured too, in
        ``raw_stats`` / ``roundtrip_stats``."""
        from benchmarks.toyworld.pretrain import roundtrip
        rng = np.random.default_rng(seed)
        pairs = [(c, s) for c in tw.COLOURS for s in tw.SHAPES]
        drawings = [tw.sample_drawing(rng, *pairs[i % len(pairs)]) for i in range(n)]
        imgs = [tw.render(d, style, rng) for d in drawings]
        rec = roundtrip(self.model.vae, imgs)
        content = tw.score_images(rec, [(d.colour, d.shape) for d in drawings])
        stats = statistics or (style,)
        raw = {st: float(tw.mean_style_statistic(imgs, st)) for st in stats}
        rt = {st: float(tw.mean_style_statistic(rec, st)) for st in stats}
        return {"raw": raw[stats[0]], "roundtrip": rt[stats[0]], "raw_stats": raw, "roundtrip_stats": rt,
                "colour": content["colour"], "shape": content["shape"]}
