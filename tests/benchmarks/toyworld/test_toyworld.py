"""Toy world: the drawing generator, styles and scorer (no torch), and the committed pretrained toy base."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets_tools import toyworld as tw

BASE = Path(__file__).resolve().parents[3] / "trainer" / "assets" / "toyworld"


def _drawn(n: int, style=None, seed: int = 0):
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in tw.COLOURS for s in tw.SHAPES]
    imgs, expected = [], []
    for i in range(n):
        d = tw.sample_drawing(rng, *pairs[i % len(pairs)])
        imgs.append(tw.render(d, style, rng))
        expected.append((d.colour, d.shape))
    return imgs, expected


# ---------------------------------------------------------------- generator, styles, scorer (fast)

def test_module_needs_no_torch():
    code = "import sys, datasets_tools.toyworld; assert 'torch' not in sys.modules; assert 'trainer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_scorer_is_exact_on_drawn_pictures():
    imgs, expected = _drawn(450)
    r = tw.score_images(imgs, expected)
    assert r["colour"] == 1.0 and r["shape"] == 1.0, r["misses"]


@pytest.mark.parametrize("style", tw.STYLES)
def test_scorer_reads_content_through_a_style(style):
    imgs, expected = _drawn(300, style, seed=1)
    r = tw.score_images(imgs, expected)
    assert r["colour"] == 1.0, r["misses"]
    assert r["shape"] >= 0.98, r["misses"]


def test_scorer_on_empty_picture():
    blank = np.full((64, 64, 3), 235, np.uint8)
    assert tw.score_image(blank) == {"colour": None, "shape": None}
    assert tw.score_images([blank], [("red", "circle")])["both"] == 0.0


def test_style_statistics_see_their_own_style_only():
    plain, _ = _drawn(60)
    stripes, _ = _drawn(60, "stripes", seed=2)
    dots, _ = _drawn(60, "dots", seed=3)
    s = {name: {st: tw.mean_style_statistic(imgs, st) for st in tw.STYLES}
         for name, imgs in (("plain", plain), ("stripes", stripes), ("dots", dots))}
    assert s["plain"]["stripes"] < 3 and s["plain"]["dots"] < 3, s
    assert s["stripes"]["stripes"] > 150 and s["dots"]["dots"] > 150, s
    assert s["stripes"]["dots"] < 0.05 * s["dots"]["dots"], s      # no cross-talk
    assert s["dots"]["stripes"] < 0.05 * s["stripes"]["stripes"], s
    with pytest.raises(ValueError):
        tw.style_statistic(plain[0], "plaid")


def test_shape_styles_and_their_statistics():
    """Outline and drop shadow: each statistic sees its own style, not the other's, and reads about 0 on plain
    pictures; the scorer still reads the content."""
    plain, _ = _drawn(45)
    styled = {st: _drawn(45, st, seed=6) for st in tw.SHAPE_STYLES}
    s = {name: {st: tw.mean_style_statistic(imgs, st) for st in tw.SHAPE_STYLES}
         for name, imgs in (("plain", plain), *((st, v[0]) for st, v in styled.items()))}
    assert s["plain"]["outline"] < 3 and s["plain"]["shadow"] < 3, s
    assert s["outline"]["outline"] > 120 and s["shadow"]["shadow"] > 120, s
    assert s["outline"]["shadow"] < 0.05 * s["shadow"]["shadow"], s
    assert s["shadow"]["outline"] < 0.05 * s["outline"]["outline"], s
    for st, (imgs, expected) in styled.items():
        r = tw.score_images(imgs, expected)
        assert r["colour"] == 1.0 and r["shape"] >= 0.9, (st, r["misses"])
    with pytest.raises(ValueError):
        tw.render(tw.sample_drawing(np.random.default_rng(0)), "plaid")


def test_paper_tint_combines_with_the_other_styles():
    """The paper tint: its statistic reads about 0 on plain pictures and about 28 on paper, the scorer still reads
    the content on paper, and a drop shadow or outline drawn on paper keeps its own statistic (so two style LoRAs
    can be scored against pictures drawn with both)."""
    plain, _ = _drawn(45, seed=8)
    paper, expected = _drawn(45, "paper", seed=8)
    r = tw.score_images(paper, expected)
    assert r["colour"] == 1.0 and r["shape"] >= 0.98, r["misses"]
    p_plain, p_paper = tw.mean_style_statistic(plain, "paper"), tw.mean_style_statistic(paper, "paper")
    assert p_plain < 5 and p_paper > 25, (p_plain, p_paper)
    for mark in tw.SHAPE_STYLES:
        alone, _ = _drawn(45, mark, seed=8)
        both, exp_both = _drawn(45, f"{mark}+paper", seed=8)
        assert tw.mean_style_statistic(both, mark) >= 0.9 * tw.mean_style_statistic(alone, mark), mark
        assert tw.mean_style_statistic(alone, "paper") < 5                 # a mark does not read as paper
        assert abs(tw.mean_style_statistic(both, "paper") - p_paper) < 2    # nor moves the paper's reading
        assert tw.score_images(both, exp_both)["colour"] == 1.0
    assert tw.mean_style_statistic(paper, "shadow") < 3 and tw.mean_style_statistic(paper, "outline") < 3
    d = tw.sample_drawing(np.random.default_rng(0))
    for bad in ("shadow+outline", "paper+paper", "paper+plaid"):
        with pytest.raises(ValueError, match="unknown style"):
            tw.render(d, bad)


def test_scorer_white_balances_a_tinted_background():
    """A background warmer than the scorer's saturation threshold (as a paper LoRA paints in patches) is not read
    as the shape: the scorer greys the picture against its border first."""
    from dataclasses import replace
    rng = np.random.default_rng(9)
    pairs = [(c, s) for c in tw.COLOURS for s in tw.SHAPES]
    imgs, expected = [], []
    for i in range(45):
        d = tw.sample_drawing(rng, *pairs[i % 15])
        v = float(np.mean(d.background))
        warm = replace(d, background=(int(v), int(v * 0.92), int(v * 0.72)))  # HSV saturation 0.28
        imgs.append(tw.render(warm))
        expected.append((d.colour, d.shape))
    r = tw.score_images(imgs, expected)
    assert r["colour"] == 1.0 and r["shape"] >= 0.95, r["misses"]


def test_pale_backgrounds_for_the_vae_are_generic_and_seeded():
    rng = np.random.default_rng(0)
    d = tw.sample_drawing(rng)
    hues = set()
    for i in range(40):
        bg = np.array(tw.pale_background(d, np.random.default_rng(i)).background, np.float32) / 255
        assert (bg.max() - bg.min()) / bg.max() <= tw.PALE_MAX_SATURATION + 0.01  # pale: below the scorer's 0.22
        hues.add(int(np.degrees(np.arctan2(np.sqrt(3) * (bg[1] - bg[2]), 2 * bg[0] - bg[1] - bg[2])) // 60))
    assert len(hues) >= 5  # any hue, not the paper's
    a, _, _ = tw.make_arrays(8, seed=3, vae_overlay=0.6, pale=0.5)
    b, _, _ = tw.make_arrays(8, seed=3, vae_overlay=0.6, pale=0.5)
    c, _, _ = tw.make_arrays(8, seed=3, vae_overlay=0.6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_style_statistic_is_phase_invariant():
    d = tw.sample_drawing(np.random.default_rng(4))
    vals = [tw.stripe_statistic(tw.render(d, "stripes", seed)) for seed in range(5)]
    assert max(vals) - min(vals) < 15, vals


def test_captions_name_colour_and_shape_in_varied_places():
    rng = np.random.default_rng(0)
    firsts = set()
    for _ in range(300):
        c, s = str(rng.choice(list(tw.COLOURS))), str(rng.choice(tw.SHAPES))
        text = tw.caption((c, s), rng, junk_prob=0.5)
        assert tw.parse_caption(text) == (c, s), text
        firsts.add(text.split()[0])
    assert {"a", "red", "circle"} & firsts and len(firsts) > 10  # colour/shape words move around
    assert tw.add_trigger("a red circle", "zxq", "start") == "zxq, a red circle"
    assert tw.add_trigger("a red circle", "zxq", "end") == "a red circle, zxq"
    assert set(w for t in tw._TEMPLATES for w in t.format(c="red", s="circle", a="a").replace(",", "").split()) \
        <= set(tw.vocabulary())


def test_make_dataset_writes_pictures_and_captions(tmp_path):
    recs = tw.make_dataset(tmp_path / "ds", 15, style="stripes", trigger="zxq style", seed=3)
    pngs = sorted((tmp_path / "ds").glob("*.png"))
    assert len(pngs) == 15 and len(list((tmp_path / "ds").glob("*.txt"))) == 15
    assert {(r["colour"], r["shape"]) for r in recs} == {(c, s) for c in tw.COLOURS for s in tw.SHAPES}
    for r in recs:
        text = Path(r["file"]).with_suffix(".txt").read_text().strip()
        assert text.startswith("zxq style, ") and tw.parse_caption(text) == (r["colour"], r["shape"])
    from PIL import Image
    img = Image.open(pngs[0])
    assert img.size == (64, 64) and img.mode == "RGB"
    assert tw.stripe_statistic(img) > 100
    again = tw.make_dataset(tmp_path / "ds2", 15, style="stripes", trigger="zxq style", seed=3)
    assert [r["caption"] for r in again] == [r["caption"] for r in recs]
    assert (tmp_path / "ds2" / "00007.png").read_bytes() == (tmp_path / "ds" / "00007.png").read_bytes()


def test_prompts_cover_all_pairs_evenly():
    ps = tw.prompts(30, trigger="zxq", position="end")
    assert len(ps) == 30 and all(p.endswith(", zxq") for p, _, _ in ps)
    assert sorted((c, s) for _, c, s in ps) == sorted([(c, s) for c in tw.COLOURS for s in tw.SHAPES] * 2)


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


@pytest.mark.parametrize("style", tw.STYLES + tw.TINT_STYLES)
def test_vae_carries_the_styles(toy_pipe, style):
    """An encode/decode round trip keeps >= 80% of each style's statistic (the VAE can express it)."""
    from benchmarks.toyworld.pretrain import roundtrip
    imgs, _ = _drawn(30, style, seed=5)
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
        imgs, expected = _drawn(45, style, seed=7)
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
    ps = tw.prompts(120, seed=1, trigger="zxq style", position=position)
    imgs = generate(toy_pipe, [p for p, _, _ in ps], seed=1, steps=20, guidance=5.0)
    r = tw.score_images(imgs, [(c, s) for _, c, s in ps])
    assert r["colour"] >= 0.95 and r["shape"] >= 0.9, r
    assert tw.mean_style_statistic(imgs, "stripes") < 15


# ---------------------------------------------------------------- phase 2 tooling (style LoRAs on the toy base)

def test_style_lora_tooling_trains_through_the_cli_and_scores_through_the_engine(tmp_path):
    """The harness of docs/toyworld.md phase 2 and benchmarks/toyworld/ablations.py: a few steps through
    `lorastudio train` with the shipped toyworld-style preset, then sampling through the generation engine."""
    pytest.importorskip("torch")
    from benchmarks.toyworld import harness as tl
    recs = tl.make_style_set(tmp_path / "style", "shadow", 15)
    assert all(r["caption"].startswith("zxq style, ") for r in recs)
    tl.make_reg_set(tmp_path / "reg", 15)
    lora = tl.train_style_lora(tmp_path / "style", tmp_path / "runs", "toy", reg_dir=tmp_path / "reg",
                               overrides={"train.max_steps": 3, "train.batch_size": 4})
    from safetensors import safe_open
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "15"       # the regularisation set was used (kohya's keys)
        assert "img_count" in f.metadata()["ss_reg_dataset_dirs"]
        assert any(k.startswith("lora_te_") for k in f.keys())  # text encoder trained (the preset's setting)
        assert any(k.startswith("lora_unet_") and "_conv1." in k for k in f.keys())  # LoCon on the convs
    ev = tl.Evaluator()
    prompts = tw.prompts(3, seed=0, trigger="zxq style")
    base = ev.images(prompts)
    ev.set_loras([(lora, 0.0)])
    assert all(np.array_equal(a, b) for a, b in zip(base, ev.images(prompts)))  # weight 0 is the base
    ev.set_loras([(lora, 1.0)])
    scores, imgs = ev.score(prompts)
    assert len(imgs) == 3 and imgs[0].shape == (64, 64, 3) and scores.n == 3
    assert any(not np.array_equal(a, b) for a, b in zip(base, imgs))  # the LoRA is applied
    with pytest.raises(RuntimeError, match="lorastudio train exited"):
        tl.train_style_lora(tmp_path / "nope", tmp_path / "runs", "bad")


def test_ablation_script_writes_the_table(tmp_path):
    """`python -m benchmarks.toyworld.ablations` end to end on one variant, cut to 2 steps (a smoke run)."""
    pytest.importorskip("torch")
    from benchmarks.toyworld import ablations as ab
    out = tmp_path / "ablations.md"
    assert ab.main(["--only", "unet_only", "--n", "3", "--max-steps", "2", "--out", str(out),
                    "--work", str(tmp_path / "work")]) == 0
    text = out.read_text()
    assert "Smoke run" in text and "| base model, no LoRA |" in text and "| unet_only: UNet-only LoRA" in text
    lora = tmp_path / "work" / "runs" / "unet_only" / "unet_only.safetensors"
    mtime = lora.stat().st_mtime_ns
    assert ab.main(["--only", "unet_only", "--n", "3", "--max-steps", "2", "--out", str(out),
                    "--work", str(tmp_path / "work"), "--reuse"]) == 0           # score again, do not train again
    assert lora.stat().st_mtime_ns == mtime and "Scored with `--reuse`" in out.read_text()
    assert ab.main(["--only", "rank99"]) == 2  # an unknown variant is one line and exit 2


def test_pretraining_script_runs_every_stage_cut_short(tmp_path):
    """`python -m benchmarks.toyworld.pretrain` end to end (tokenizer, VAE, decoder, UNet, save) with 2 steps a stage:
    the folder it writes loads like the committed one and records what it did."""
    pytest.importorskip("torch")
    from benchmarks.toyworld import pretrain as tp
    out = tmp_path / "toy"
    assert tp.main(["--out", str(out), "--vae-steps", "2", "--decoder-steps", "2", "--unet-steps", "2",
                    "--n-vae-images", "32", "--n-images", "64", "--n-decoder-images", "32", "--vae-batch", "4",
                    "--unet-batch", "4"]) == 0
    info = __import__("json").loads((out / "toyworld_pretrain.json").read_text())
    assert (info["vae_steps_done"], info["decoder_steps_done"], info["unet_steps_done"]) == (2, 2, 2)
    assert not out.with_name("toy.work").exists()
    pipe = tp.load_toyworld(out)
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]


def test_decoder_only_stage_keeps_the_latent_space(tmp_path):
    """`python -m benchmarks.toyworld.pretrain --decoder-only` (how the committed decoder was made), cut to 2 steps:
    it changes the decoder only, so the encoder, UNet, text encoder and with them any LoRA stay valid."""
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    from benchmarks.toyworld import pretrain as tp
    out = tmp_path / "toy"
    assert tp.main(["--decoder-only", str(BASE), "--out", str(out), "--decoder-steps", "2",
                    "--n-decoder-images", "32"]) == 0
    old, new = (load_file(str(f / "vae" / "diffusion_pytorch_model.safetensors")) for f in (BASE, out))
    enc = [k for k in old if not k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and all(np.array_equal(old[k].numpy(), new[k].numpy()) for k in enc)
    assert any(not np.array_equal(old[k].numpy(), new[k].numpy()) for k in old if k not in enc)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "unet/config.json", "vae/config.json"):
        assert (BASE / part).read_bytes() == (out / part).read_bytes(), part
    info = __import__("json").loads((out / "toyworld_pretrain.json").read_text())
    assert info["decoder_stage"]["steps_done"] == 2 and info["unet_steps_done"] == 4135
    tp.load_toyworld(out)  # loads like the committed one


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
