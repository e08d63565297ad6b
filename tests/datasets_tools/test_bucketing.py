"""Buckets, bucket assignment, crop plans and same-size batches, including properties on random sizes."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from datasets_tools.bucketing import apply_crop, assign_bucket, bucket_batches, crop_plan, make_buckets
from datasets_tools.errors import DatasetError


@pytest.mark.parametrize("res,lo,hi,step", [(512, 256, 1024, 64), (768, 256, 1024, 64), (1024, 512, 2048, 64),
                                            (512, 256, 768, 32), (640, 320, 960, 64)])
def test_buckets_shape(res, lo, hi, step):
    buckets = make_buckets(res, lo, hi, step)
    side = min(res // step * step, hi // step * step)
    assert (side, side) in buckets
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= res * res
    # As large as allowed: one more step on both sides breaks the area, or a side is already at the max.
    for w, h in buckets:
        assert (w + step) * (h + step) > res * res or max(w, h) + step > hi
    assert all((h, w) in buckets for w, h in buckets)  # symmetric


def test_bad_bucket_settings():
    with pytest.raises(DatasetError):
        make_buckets(512, 1024, 256)
    with pytest.raises(DatasetError):
        make_buckets(32, 64, 1024, 64)


def test_assign_nearest_aspect():
    b = make_buckets(512)
    assert assign_bucket(1000, 1000, b) == (512, 512)
    w, h = assign_bucket(1920, 1080, b)
    assert w > h and abs(w / h - 16 / 9) < 0.2
    w, h = assign_bucket(1080, 1920, b)
    assert h > w and abs(h / w - 16 / 9) < 0.2


def test_no_upscale_keeps_small_images_small():
    b = make_buckets(512)
    assert assign_bucket(300, 200, b, no_upscale=True) == (256, 192)
    assert assign_bucket(2000, 2000, b, no_upscale=True) == (512, 512)
    # A tiny image never gets a zero side.
    assert assign_bucket(10, 700, b, no_upscale=True)[0] == 64


def test_properties_on_random_sizes():
    rng = random.Random(0)
    configs = [(512, 256, 1024, 64, False), (512, 256, 1024, 64, True), (1024, 512, 2048, 64, True),
               (768, 256, 1024, 32, False)]
    for res, lo, hi, step, no_up in configs:
        buckets = make_buckets(res, lo, hi, step)
        for _ in range(400):
            w, h = rng.randint(1, 4000), rng.randint(1, 4000)
            bw, bh = assign_bucket(w, h, buckets, no_upscale=no_up, resolution=res, step=step)
            assert bw > 0 and bh > 0 and bw % step == 0 and bh % step == 0
            assert bw * bh <= res * res
            plan = crop_plan(w, h, (bw, bh))
            rw, rh = plan.resized
            left, top, right, bottom = plan.box
            assert (right - left, bottom - top) == (bw, bh)
            assert 0 <= left and 0 <= top and right <= rw and bottom <= rh
            assert rw >= bw and rh >= bh
            assert abs((rw / rh) / (w / h) - 1) <= 1.01 / min(rw, rh)  # aspect kept up to pixel rounding
            if no_up and w >= step and h >= step:
                assert bw <= w and bh <= h and not plan.upscaled
            if plan.upscaled:
                assert w < rw or h < rh


def test_no_upscale_never_upscales_exhaustive_small():
    buckets = make_buckets(512)
    for w in range(64, 1200, 37):
        for h in range(64, 1200, 41):
            bw, bh = assign_bucket(w, h, buckets, no_upscale=True)
            assert bw <= w and bh <= h
            assert not crop_plan(w, h, (bw, bh)).upscaled


def test_crop_plan_center():
    plan = crop_plan(1000, 500, (512, 512))
    assert plan.resized == (1024, 512) and plan.box == (256, 0, 768, 512) and plan.upscaled
    plan = crop_plan(2000, 1000, (512, 512))
    assert plan.resized == (1024, 512) and not plan.upscaled


def test_apply_crop_matches_plan():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))  # green middle third
    plan = crop_plan(300, 100, (64, 64))
    out = apply_crop(img, plan)
    assert out.size == (64, 64) and out.mode == "RGB"
    assert out.getpixel((32, 32)) == (0, 255, 0)
    assert apply_crop(Image.new("L", (64, 64), 9), crop_plan(64, 64, (64, 64))).getpixel((0, 0)) == (9, 9, 9)


def test_batches_never_mix_and_cover_everything():
    rng = random.Random(1)
    sizes = [(512, 512), (576, 448), (448, 576), (640, 384)]
    items = [rng.choice(sizes) for _ in range(103)]
    for bs in (1, 3, 4, 8):
        batches = bucket_batches(items, bs, seed=7, epoch=0)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(items)))
        for b in batches:
            assert 1 <= len(b) <= bs
            assert len({items[i] for i in b}) == 1
        # At most one partial batch per bucket.
        partial = [b for b in batches if len(b) < bs]
        assert len({items[b[0]] for b in partial}) == len(partial)


def test_batches_deterministic_per_seed_and_epoch():
    items = [(512, 512)] * 10 + [(576, 448)] * 7
    a = bucket_batches(items, 4, seed=1, epoch=0)
    assert a == bucket_batches(items, 4, seed=1, epoch=0)
    assert a != bucket_batches(items, 4, seed=1, epoch=1)
    assert a != bucket_batches(items, 4, seed=2, epoch=0)
    ordered = bucket_batches(items, 4, seed=1, epoch=0, shuffle=False)
    assert ordered[0] == [0, 1, 2, 3] and ordered[-1] == [14, 15, 16]
    assert bucket_batches([], 4, seed=0, epoch=0) == []
    with pytest.raises(DatasetError):
        bucket_batches(items, 0, seed=0, epoch=0)
