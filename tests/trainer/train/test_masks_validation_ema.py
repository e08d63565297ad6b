"""Masked loss, the validation curve and EMA on tiny runs: what a user sees in files, events and metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import config as C
from trainer.errors import UserError
from trainer.train.data import build_data, load_mask
from trainer.train.events import read_events
from trainer.train.recipe import train

from tests.fixtures.runs import tiny_overrides


def cfg_of(model, data, out, **extra) -> C.Config:
    steps = extra.pop("steps", 4)
    return C.load_config(None, tiny_overrides(model, data, out, steps=steps, **extra))


def write_masks(folder: Path, dest: Path, fill) -> Path:
    """A mask per image: fill(w, h) -> uint8 array."""
    dest.mkdir(parents=True, exist_ok=True)
    for img in sorted(folder.glob("*.png")):
        w, h = Image.open(img).size
        Image.fromarray(fill(w, h), "L").save(dest / f"{img.stem}.png")
    return dest


def left_half(w, h):
    a = np.zeros((h, w), np.uint8)
    a[:, : w // 2] = 255
    return a


def white(w, h):
    return np.full((h, w), 255, np.uint8)


def tensors(path) -> dict:
    return load_file(str(path))


# ------------------------------------------------------------------------------------------------ masks


def test_mask_follows_the_pictures_crop_and_flip_on_the_latent_grid(image_folder, tmp_path):
    masks = write_masks(image_folder, tmp_path / "masks", left_half)
    cfg = cfg_of("m", image_folder, tmp_path / "o", **{"data.mask_dir": masks})
    data = build_data(cfg, lambda w: None)
    ex = next(e for e in data.examples if e.size == (160, 96))   # landscape: centre crop to its bucket
    m = load_mask(ex)
    w, h = ex.bucket
    assert m.shape == (1, h // 8, w // 8)
    # the crop keeps the centre, so the white part covers (w_resized/2 - left) of the bucket's width
    left = ex.crop_box[0]
    white_cols = (ex.resized[0] / 2 - left) / 8
    assert m[0, 0, : int(white_cols) - 1].min() > 0.99 and m[0, 0, int(white_cols) + 1:].max() < 0.01
    assert torch.equal(load_mask(ex, flip=True), m.flip(-1))


def test_white_masks_change_nothing_and_half_masks_change_the_lora(tiny_sd1_dir, image_folder, tmp_path):
    plain = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "plain", steps=2))
    full = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "white", steps=2,
                        **{"data.mask_dir": write_masks(image_folder, tmp_path / "mw", white)}))
    half = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "half", steps=2,
                        **{"data.mask_dir": write_masks(image_folder, tmp_path / "mh", left_half)}))
    a, b, c = tensors(plain.lora_path), tensors(full.lora_path), tensors(half.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)            # weight 1 everywhere = no mask
    assert any(not torch.equal(a[k], c[k]) for k in a)        # half the picture ignored = another LoRA


def test_masks_without_a_latent_cache(tiny_sd1_dir, image_folder, tmp_path):
    """Without the cache the masks are read per batch: white masks still change nothing, half masks do."""
    off = {"data.cache_latents": "false"}
    runs = {name: train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / name, steps=2, **off, **extra))
            for name, extra in (("plain", {}),
                                ("white", {"data.mask_dir": write_masks(image_folder, tmp_path / "mw", white)}),
                                ("half", {"data.mask_dir": write_masks(image_folder, tmp_path / "mh", left_half)}))}
    a, b, c = (tensors(runs[n].lora_path) for n in ("plain", "white", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)


def test_alpha_channel_is_the_mask(image_folder, tmp_path):
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    px = np.zeros((64, 64, 4), np.uint8)
    px[..., :3] = 200
    px[:, :32, 3] = 255                                        # left half opaque
    Image.fromarray(px, "RGBA").save(rgba / "a.png")
    (rgba / "a.txt").write_text("zxq")
    cfg = cfg_of("m", rgba, tmp_path / "o", **{"data.alpha_mask": "true", "data.resolution": 64,
                                                "data.min_bucket_px": 64})
    ex = build_data(cfg, lambda w: None).examples[0]
    m = load_mask(ex)
    assert m.shape == (1, 8, 8) and m[0, :, :4].min() > 0.99 and m[0, :, 4:].max() < 0.01


def test_bad_masks_are_one_line_errors_naming_the_file(image_folder, tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "other.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"data.mask_dir: no mask in .* matches an image"):
        build_data(cfg_of("m", image_folder, tmp_path / "o", **{"data.mask_dir": empty}), lambda w: None)
    wrong = write_masks(image_folder, tmp_path / "wrong", white)
    Image.new("L", (10, 10), 255).save(wrong / "img000.png")
    with pytest.raises(UserError, match=r"img000.png: the mask is 10x10 but its image img000.png is 128x128"):
        build_data(cfg_of("m", image_folder, tmp_path / "o", **{"data.mask_dir": wrong}), lambda w: None)
    black = write_masks(image_folder, tmp_path / "black", lambda w, h: np.zeros((h, w), np.uint8))
    warnings = []
    build_data(cfg_of("m", image_folder, tmp_path / "o", **{"data.mask_dir": black}), warnings.append)
    assert any("black everywhere" in w for w in warnings)


# ------------------------------------------------------------------------------------------- validation


def test_validation_split_curve_best_file_and_metadata(tiny_sd1_dir, image_folder, tmp_path):
    seen = []
    res = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "v", steps=4,
                       **{"data.validation_split": 0.25, "train.validation_every_steps": 2, "train.keep_best": "true"}),
                on_event=seen.append)
    started = next(e for e in seen if e.type == "run_started")
    assert started.num_images == 4                      # 6 images, a quarter (2) held out
    vals = [e for e in seen if e.type == "validation"]
    assert [e.step for e in vals] == [2, 4]
    assert all(e.loss > 0 for e in vals) and vals[-1].best == min(e.loss for e in vals)
    md = safe_open(str(res.lora_path), "pt").metadata()
    curve = json.loads(md["lorastudio.validation_curve"])
    assert [p[0] for p in curve] == [2, 4] and float(md["lorastudio.validation_loss"]) == curve[-1][1]
    assert (res.run_dir / "run-best.safetensors").exists()
    assert [e["type"] for e in read_events(res.run_dir / "events.jsonl")].count("validation") == 2


def test_validation_uses_fixed_noise_and_timesteps(tiny_sd1_dir, image_folder, tmp_path):
    """With the learning rate 0 the weights never change, so every point of the curve is the same number."""
    seen = []
    train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "f", steps=3,
                 **{"data.validation_split": 0.2, "train.validation_every_steps": 1, "train.learning_rate": 0.0}),
          on_event=seen.append)
    losses = [e.loss for e in seen if e.type == "validation"]
    assert len(losses) == 3 and len(set(losses)) == 1


def test_validation_folder_and_bad_split(tiny_sd1_dir, image_folder, tmp_path):
    from tests.fixtures.images import make_image_folder
    vdir = make_image_folder(tmp_path / "val", n=2, seed=50)
    seen = []
    train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "vd", steps=2, **{"data.validation_dir": vdir}),
          on_event=seen.append)
    assert [e.step for e in seen if e.type == "validation"] == [2]          # at the end only
    one = make_image_folder(tmp_path / "one", n=1)
    with pytest.raises(UserError, match="data.validation_split: holding out 1 of 1 training images leaves none"):
        train(cfg_of(tiny_sd1_dir, one, tmp_path / "x", **{"data.validation_split": 0.5}))
    assert not (tmp_path / "x").exists()                                     # nothing written


# -------------------------------------------------------------------------------------------------- EMA


def test_ema_output_is_the_average_and_resume_stays_exact(tiny_sd1_dir, image_folder, tmp_path):
    opts = {"train.ema_decay": 0.9, "train.ema_save_both": "true", "data.validation_split": 0.2,
            "train.validation_every_steps": 2}
    ref = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "a", steps=6, **opts))
    out, raw = tensors(ref.lora_path), tensors(ref.run_dir / "run-raw.safetensors")
    downs = [k for k in out if k.endswith("lora_down.weight")]
    assert any(not torch.equal(out[k], raw[k]) for k in downs)                # the EMA is not the last weights
    # the EMA in the final checkpoint is what the output file holds
    ck = sorted((ref.run_dir / "checkpoints").iterdir())[-1]
    assert (ck / "ema.safetensors").exists()

    step = {"n": 0}
    first = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "b", steps=6, **opts),
                  on_event=lambda e: step.__setitem__("n", getattr(e, "step", step["n"])),
                  should_stop=lambda: step["n"] >= 3)
    assert first.status == "stopped"
    again = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "b", steps=6, **opts), resume=True)
    b = tensors(again.lora_path)
    assert all(torch.equal(out[k], b[k]) for k in out)                         # EMA resumes exactly
    md_a = json.loads(safe_open(str(ref.lora_path), "pt").metadata()["lorastudio.validation_curve"])
    md_b = json.loads(safe_open(str(again.lora_path), "pt").metadata()["lorastudio.validation_curve"])
    assert md_a == md_b                                                        # the curve continues


# ------------------------------------------------------------------------------------- inverted-mask prior


def black(w, h):
    return np.zeros((h, w), np.uint8)


def _up_weights(path) -> list[torch.Tensor]:
    t = tensors(path)
    return [v for k, v in t.items() if k.endswith(("lora_up.weight", "hada_w2_b", "lokr_w2"))]


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_inverted_mask_prior_pulls_the_masked_out_area_to_the_base_prediction(tiny_sd1_dir, image_folder, tmp_path,
                                                                             kind):
    """Masks black everywhere: the only loss is the prior's, against what the base model predicts. A LoRA at its
    start predicts exactly that, so the loss is 0 and the gradient 0 at every step (UNet and text-encoder adapters
    both switched off for the target); with the picture as the target there instead, the LoRA moves."""
    masks = write_masks(image_folder, tmp_path / "mb", black)
    common = {"data.mask_dir": masks, "lora.type": kind, "lora.train_text_encoder": "true",
              "train.learning_rate": 1e-2, "train.weight_decay": 0.0}
    seen = []
    prior = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "p", steps=3,
                         **common, **{"data.inverted_mask_prior": 1.0}), on_event=seen.append)
    assert [e.loss for e in seen if e.type == "step"] == [0.0, 0.0, 0.0]
    ups = _up_weights(prior.lora_path)
    assert ups and all(not v.any() for v in ups)                  # still the base model, UNet and text encoder
    seen = []
    image = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "i", steps=3,
                         **common, **{"data.unmasked_weight": 1.0}), on_event=seen.append)
    assert all(e.loss > 0 for e in seen if e.type == "step")
    assert any(v.any() for v in _up_weights(image.lora_path))     # the picture pulls the LoRA away from the base


def test_inverted_mask_prior_leaves_the_masked_area_to_the_picture(tiny_sd1_dir, image_folder, tmp_path):
    """Half masks, learning rate 0 (the LoRA stays at its start): the prior adds nothing, as the start predicts
    what the base does; the white half still trains on the picture."""
    masks = write_masks(image_folder, tmp_path / "mh", left_half)
    runs = {}
    for name, extra in (("off", {}), ("on", {"data.inverted_mask_prior": 1.0})):
        seen = []
        train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / name, steps=2, **{"data.mask_dir": masks,
                     "train.learning_rate": 0.0}, **extra), on_event=seen.append)
        runs[name] = [e.loss for e in seen if e.type == "step"]
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-6) and all(v > 0 for v in runs["on"])


def test_inverted_mask_prior_without_masks_is_a_one_line_error(tiny_sd1_dir, image_folder, tmp_path):
    with pytest.raises(UserError, match=r"^data.inverted_mask_prior needs masks: set data.mask_dir or "
                                        r"data.alpha_mask$"):
        train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "x", **{"data.inverted_mask_prior": 0.5}))
    assert not (tmp_path / "x").exists()


def test_validation_measures_the_ema_weights(tiny_sd1_dir, image_folder, tmp_path):
    """With EMA on, the curve is the EMA weights' (the ones the file holds): an EMA that barely leaves the start
    measures the start's loss, while the live weights have moved."""
    opts = {"data.validation_split": 0.2, "train.validation_every_steps": 1, "train.learning_rate": 1e-2}
    curves = {}
    for name, extra in (("start", {"train.learning_rate": 0.0}), ("live", {}),
                        ("ema", {"train.ema_decay": 0.99999, "train.ema_warmup": "false"})):
        seen = []
        train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / name, steps=3, **{**opts, **extra}), on_event=seen.append)
        curves[name] = [e.loss for e in seen if e.type == "validation"]
    moved = abs(curves["live"][-1] - curves["start"][-1])
    assert moved > 0
    assert abs(curves["ema"][-1] - curves["start"][-1]) < moved / 100
