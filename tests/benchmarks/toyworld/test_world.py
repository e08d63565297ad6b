"""The toy world's drawing generator, styles and scorer (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets_tools import toyworld as tw

from tests.fixtures.toyworld import drawn


# ---------------------------------------------------------------- generator, styles, scorer (fast)

def test_module_needs_no_torch():
    code = "import sys, datasets_tools.toyworld; assert 'torch' not in sys.modules; assert 'trainer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_scorer_is_exact_on_drawn_pictures():
    imgs, expected = drawn(450)
    r = tw.score_images(imgs, expected)
    assert r["colour"] == 1.0 and r["shape"] == 1.0, r["misses"]


@pytest.mark.parametrize("style", tw.STYLES)
def test_scorer_reads_content_through_a_style(style):
    imgs, expected = drawn(300, style, seed=1)
    r = tw.score_images(imgs, expected)
    assert r["colour"] == 1.0, r["misses"]
    assert r["shape"] >= 0.98, r["misses"]


def test_scorer_on_empty_picture():
    blank = np.full((64, 64, 3), 235, np.uint8)
    assert tw.score_image(blank) == {"colour": None, "shape": None}
    assert tw.score_images([blank], [("red", "circle")])["both"] == 0.0


def test_style_statistics_see_their_own_style_only():
    plain, _ = drawn(60)
    stripes, _ = drawn(60, "stripes", seed=2)
    dots, _ = drawn(60, "dots", seed=3)
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
    plain, _ = drawn(45)
    styled = {st: drawn(45, st, seed=6) for st in tw.SHAPE_STYLES}
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


def test_the_style_suite_statistics_see_their_own_style_only():
    """Issue 19, item 1: nine styles of six kinds, each statistic about 0 on plain pictures, high on its own style
    and at most a fifth of that on any other style (the patterns, drawn over the shape too, are the worst case for
    the outline and the punched hole); the scorer still reads the content under every style."""
    assert set(tw.STYLE_KINDS) == set(tw.ALL_STYLES) and len(tw.ALL_STYLES) >= 8
    assert len(set(tw.STYLE_KINDS.values())) >= 6 and len(tw.HELD_OUT) >= 3
    assert len({tw.STYLE_KINDS[s] for s in tw.HELD_OUT}) == len(tw.HELD_OUT)  # held out: one of each of 3 kinds
    plain, _ = drawn(45, seed=6)
    own = {}
    for st in tw.ALL_STYLES:
        imgs, expected = drawn(45, st, seed=6)
        own[st] = tw.mean_style_statistic(imgs, st)
        r = tw.score_images(imgs, expected)
        assert r["colour"] == 1.0 and r["shape"] >= 0.95, (st, r["misses"])
        assert tw.mean_style_statistic(plain, st) < 0.15 * own[st], st   # about 0 on plain pictures
    for st in tw.ALL_STYLES:       # the other direction, now that every style's own level is known
        imgs, _ = drawn(45, st, seed=6)
        for other in tw.ALL_STYLES:
            if other != st:
                assert tw.mean_style_statistic(imgs, other) < 0.25 * own[other], (st, other)


def test_paper_tint_combines_with_the_other_styles():
    """The paper tint: its statistic reads about 0 on plain pictures and about 28 on paper, the scorer still reads
    the content on paper, and a drop shadow or outline drawn on paper keeps its own statistic (so two style LoRAs
    can be scored against pictures drawn with both)."""
    plain, _ = drawn(45, seed=8)
    paper, expected = drawn(45, "paper", seed=8)
    r = tw.score_images(paper, expected)
    assert r["colour"] == 1.0 and r["shape"] >= 0.98, r["misses"]
    p_plain, p_paper = tw.mean_style_statistic(plain, "paper"), tw.mean_style_statistic(paper, "paper")
    assert p_plain < 5 and p_paper > 25, (p_plain, p_paper)
    for mark in tw.SHAPE_STYLES:
        alone, _ = drawn(45, mark, seed=8)
        both, exp_both = drawn(45, f"{mark}+paper", seed=8)
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


