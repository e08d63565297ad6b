"""The learning test: style LoRAs trained with the shipped toy preset learn their style, only with the trigger, and mix.

Its own file so that CI's second worker runs the rest of the suite while this trains (pytest-xdist --dist loadfile)."""

from __future__ import annotations

import numpy as np
import pytest

from datasets_tools import toyworld as tw



# ---------------------------------------------------------------- the learning test (issue 7, items 2, 3, 5)

LEARN_BAR = 0.75   # issue 7, item 2 asks 80% of what the VAE can show; measured 83% here (120.9 of 144.8) and
                   # 86% on 45 samples (docs/toyworld-mixing.md); CI keeps a margin for other CPUs' arithmetic
PAPER_STEPS = 500  # the preset cut for the paper tint, which it learns sooner (1,000 steps overshoot: 150%)


@pytest.fixture(scope="module")
def style_loras(tmp_path_factory):
    """A drop-shadow LoRA (trigger `zxq style`) and a paper-tint LoRA (`vbn style`), each trained alone on the
    committed toy base through `lorastudio train` with the shipped toyworld-style preset (the paper cut to 500
    steps), 30 style pictures + 30 regularisation pictures. The two runs go side by side, one thread each (two
    1-thread runs on 2 cores finish sooner than two 2-thread runs one after the other)."""
    pytest.importorskip("torch")
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.toyworld import harness as tl
    w = tmp_path_factory.mktemp("styles")
    tl.make_reg_set(w / "reg", 30)
    for style in ("shadow", "paper"):
        tl.make_style_set(w / style, style, 30)
    jobs = {"shadow": {}, "paper": {"train.max_steps": PAPER_STEPS}}
    with ThreadPoolExecutor(2) as pool:
        futures = {st: pool.submit(tl.train_style_lora, w / st, w / "runs", st, reg_dir=w / "reg", overrides=over,
                                   threads=1) for st, over in jobs.items()}
        return {st: f.result() for st, f in futures.items()}


@pytest.fixture(scope="module")
def evaluator():
    pytest.importorskip("torch")
    from benchmarks.toyworld import harness as tl
    return tl.Evaluator()


def test_a_style_lora_learns_the_drop_shadow_and_only_with_its_trigger(style_loras, evaluator):
    """Issue 7, item 2, in CI: a style LoRA trained on the committed toy base through `lorastudio train` with the
    shipped toyworld-style preset, sampled through the generation engine and scored.

    Catches what random-weight tests cannot: a wrong noise target or loss (no shadow), a text-encoder half that is
    trained but not written or applied (the trigger does nothing), a LoRA that is applied at the wrong scale or
    leaks into every prompt (shadows without the trigger, content lost)."""
    ev, lora = evaluator, style_loras["shadow"]
    ceiling = ev.vae_ceiling("shadow", n=30)["roundtrip"]  # what the VAE can show of drawn shadows
    with_trigger = tw.prompts(30, seed=3, trigger="zxq style")
    without = tw.prompts(30, seed=3)
    ev.set_loras([])
    base_stat = tw.mean_style_statistic(ev.images(with_trigger), "shadow")
    base_few = ev.images(with_trigger[:6])  # the same call again at weight 0 (batching changes the last bits)
    assert base_stat < 0.05 * ceiling  # the base never draws shadows

    ev.set_loras([(lora, 1.0)])
    on, _ = ev.score(with_trigger, styles=("shadow",))
    off, _ = ev.score(without, styles=("shadow",))
    print(f"ceiling {ceiling:.1f}, base {base_stat:.1f}, with trigger {on.row()}, without {off.row()}")
    assert on.style["shadow"] >= LEARN_BAR * ceiling, (on.row(), ceiling)  # learned
    assert on.colour >= 0.85 and on.shape >= 0.80, on.row()                 # the content stays right
    assert off.style["shadow"] <= base_stat + 0.05 * ceiling, (off.row(), base_stat)  # no leakage
    assert off.colour >= 0.9 and off.shape >= 0.85, off.row()

    ev.set_loras([(lora, 0.0)])  # weight 0 is the base model, bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(base_few, ev.images(with_trigger[:6])))


def test_two_style_loras_mixed_add_up(style_loras, evaluator):
    """Issue 7, item 3, in CI: the shadow and paper LoRAs, each trained alone, loaded together at (1, 1) with both
    triggers keep at least 60% of their single-LoRA statistics (above the base's own level) with the content right;
    a weight sweep 0, 0.25, ..., 1 moves the paper statistic monotonically; fused and unfused loading give the same
    pictures. The same measurement as `python -m benchmarks.toyworld.mixing` (docs/toyworld-mixing.md), on fewer
    samples."""
    from benchmarks.toyworld import mixing as mx
    res = mx.measure(evaluator, style_loras, n=30, seed=4, sweep_n=15, full=False)
    r = res["rows"]
    print({k: {kk: v[kk] for kk in ("shadow_stat", "paper_stat", "colour", "shape")} for k, v in r.items()},
          res["sweep"], res["fused_vs_unfused_max_pixel_diff"])
    ceiling = {st: res["ceiling"][st]["roundtrip"] for st in mx.STYLES}
    for st in mx.STYLES:
        base, single, mixed = (r[k][f"{st}_stat"] for k in ("base", st, "mix"))
        assert single - base >= 0.3 * ceiling[st], (st, single, base)       # each LoRA alone learned its style
        assert mixed - base >= 0.6 * (single - base), (st, mixed, single, base)
    sweep = res["sweep"]["paper"]  # the shadow's is in docs/toyworld-mixing.md (steep: most of it from 0.75 to 1)
    assert mx.is_monotonic(sweep), sweep  # monotonic, give or take noise at the base level
    assert sweep[-1] - sweep[0] >= 0.3 * ceiling["paper"], sweep
    assert r["mix"]["colour"] >= 0.85 and r["mix"]["shape"] >= 0.8, r["mix"]
    assert r["mix_no_trigger"]["shadow_stat"] <= r["base"]["shadow_stat"] + 0.05 * ceiling["shadow"]  # no leakage
    assert res["fused_vs_unfused_max_pixel_diff"] <= 2
    text = mx.render_table(res)
    assert "| shadow 1 + paper 1, fused, both triggers |" in text and "monotonic" in text
    assert mx.main(["--shadow", str(style_loras["shadow"])]) == 2              # both or neither
    assert mx.main(["--shadow", str(style_loras["shadow"]), "--paper", "nope.safetensors"]) == 2  # a missing file
