"""The generator reads prompts the A1111 way: every token of a long prompt, (word:1.2) weights, BREAK, clip skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.generate.engine import Generator
from tests.fixtures.lora_files import one_torch_thread  # noqa: F401 (autouse: one torch thread)

SIZE = dict(width=64, height=64, steps=2, guidance_scale=5.0, seed=3)
WORDS = "red blue green cube ball star tree house river cloud stone glass paper metal wood".split()


def _base(model_dir: Path):
    from trainer.config import ModelConfig
    from trainer.models.loading import load_base_model
    return load_base_model(ModelConfig(base=str(model_dir)), dtype=torch.float32, device="cpu")


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def words(n: int, shift: int = 0) -> str:
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return _base(tiny_sd1_dir)


def test_tokens_after_75_change_the_image_and_plain_weights_do_not(sd1):
    g = Generator(sd1)
    first = _arr(g.generate(words(75), **SIZE)[0])
    longer = _arr(g.generate(words(75) + " " + words(30, shift=4), **SIZE)[0])
    assert np.abs(first - longer).max() > 0  # the second window is read, not cut off
    plain = _arr(g.generate("a red ball", **SIZE)[0])
    assert np.array_equal(_arr(g.generate("a (red:1) ball", **SIZE)[0]), plain)
    assert np.abs(_arr(g.generate("a (red:1.6) ball", **SIZE)[0]) - plain).max() > 0


def test_clip_skip_and_break_render(sd1):
    g = Generator(sd1)
    skip1 = _arr(g.generate("a red ball, blurry", **SIZE)[0])
    skip2 = g.generate("a red ball, blurry", clip_skip=2, **SIZE)[0]
    assert np.abs(_arr(skip2) - skip1).max() > 0 and "Clip skip: 2" in skip2.info["parameters"]
    broken = _arr(g.generate("a red ball BREAK blurry", **SIZE)[0])
    assert np.abs(broken - skip1).max() > 0  # "blurry" moved to its own window
