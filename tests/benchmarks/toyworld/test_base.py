"""The committed pretrained toy base: layout, loading, drawing what the prompt says, the VAE keeping styles."""

from __future__ import annotations

import pytest

from datasets_tools import toyworld as tw

from tests.fixtures.toyworld import BASE, drawn


# ---------------------------------------------------------------- the committed toy base

@pytest.fixture(scope="module")
def toy_pipe():
    pytest.importorskip("torch")
    from benchmarks.toyworld.pretrain import load_toyworld
    assert (BASE / "model_index.json").exists(), "committed toy base missing: python -m benchmarks.toyworld.pretrain"
    return load_toyworld(BASE)


def test_committed_base_is_small_fp16_diffusers_layout():
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (BASE / sub).is_dir(), sub
    weights = list(BASE.rglob("*.safetensors"))
    assert len(weights) == 3 and sum(w.stat().st_size for w in weights) < 12 * 2**20
    from safetensors import safe_open
    with safe_open(str(BASE / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.float16"
    assert (BASE / "tokenizer" / "vocab.json").exists() and (BASE / "tokenizer" / "merges.txt").exists()


def test_committed_base_loads_like_any_diffusers_model(toy_pipe):
    from diffusers import StableDiffusionPipeline
    assert isinstance(toy_pipe, StableDiffusionPipeline)
    assert toy_pipe.scheduler.config.prediction_type == "epsilon"
    assert toy_pipe.scheduler.config.beta_schedule == "scaled_linear"
    toks = toy_pipe.tokenizer.tokenize("zxq, a red circle")
    assert toks[-2:] == ["red</w>", "circle</w>"]  # caption words are single tokens, unseen words still work


def test_base_draws_what_the_prompt_says(toy_pipe):
    """>= 98% colour and >= 95% shape on 200 samples (DDIM 20 steps, guidance 5)."""
    from benchmarks.toyworld.pretrain import generate
    ps = tw.prompts(200, seed=0)
    imgs = generate(toy_pipe, [p for p, _, _ in ps], seed=0, steps=20, guidance=5.0)
    r = tw.score_images(imgs, [(c, s) for _, c, s in ps])
    assert r["colour"] >= 0.98 and r["shape"] >= 0.95, r


@pytest.mark.parametrize("style", [s for s in tw.ALL_STYLES if s not in tw.SHAPE_STYLES])
def test_vae_carries_the_styles(toy_pipe, style):
    """An encode/decode round trip keeps >= 80% of each style's statistic (the VAE can express it): the bar a
    style of the suite must clear before it counts (issue 19, item 1). The shape styles: the test below."""
    from benchmarks.toyworld.pretrain import roundtrip
    imgs, _ = drawn(30, style, seed=5)
    raw = tw.mean_style_statistic(imgs, style)
    rec = tw.mean_style_statistic(roundtrip(toy_pipe.vae, imgs), style)
    assert rec >= 0.8 * raw, (rec, raw)


def test_vae_keeps_content_under_shape_styles(toy_pipe):
    """After a round trip, shapes under an outline or a drop shadow (alone, or the shadow on paper) read right nearly
    always (under the pattern styles about half the time: docs/toyworld.md), and each style keeps >= 80% of its statistic
    (the bar a style must clear for the learning test). Drawn together, a drop shadow on paper keeps both marks:
    the pair of styles the mixing test uses."""
    from benchmarks.toyworld.pretrain import roundtrip
    shape_ok, kept = {}, {}
    for style in tw.SHAPE_STYLES + ("shadow+paper",):  # (an outline on paper keeps 78% of the outline)
        imgs, expected = drawn(45, style, seed=7)
        rec = roundtrip(toy_pipe.vae, imgs)
        shape_ok[style] = tw.score_images(rec, expected)["shape"]
        for st in style.split("+"):
            kept[(style, st)] = tw.mean_style_statistic(rec, st) / tw.mean_style_statistic(imgs, st)
    assert min(shape_ok.values()) >= 0.85, shape_ok
    assert min(kept.values()) >= 0.8, kept


@pytest.mark.slow
@pytest.mark.parametrize("position", ["start", "end"])
def test_base_ignores_an_unseen_trigger_word(toy_pipe, position):
    from benchmarks.toyworld.pretrain import generate
    ps = tw.prompts(60, seed=1, trigger="zxq style", position=position)  # 4 of each pair; 200 in docs
    imgs = generate(toy_pipe, [p for p, _, _ in ps], seed=1, steps=20, guidance=5.0)
    r = tw.score_images(imgs, [(c, s) for _, c, s in ps])
    assert r["colour"] >= 0.95 and r["shape"] >= 0.9, r
    assert tw.mean_style_statistic(imgs, "stripes") < 15


