"""Training options end to end: optimizers, v-prediction, LoCon/kohya targets, caches, precision, outputs."""

from __future__ import annotations

import random

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import config as C
from trainer.train.data import build_data, process_caption
from trainer.errors import UserError
from trainer.train.events import read_events
from trainer.train.recipe import train

from tests.fixtures.images import make_image_folder  # noqa: F401
from tests.fixtures.runs import tiny_overrides


def cfg_of(*args, **kw) -> C.Config:
    return C.load_config(None, tiny_overrides(*args, **kw))


def test_sd2_vpred_prodigy_locon_kohya_targets_checkpointing_accumulation(tiny_sd2_dir, image_folder, tmp_path):
    cache = tmp_path / "latent-cache"
    over = {"train.optimizer": "prodigy", "train.learning_rate": 1.0, "train.gradient_checkpointing": True,
            "train.gradient_accumulation_steps": 2, "lora.unet_targets": "kohya", "lora.conv_rank": 2,
            "lora.conv_alpha": 1.0, "lora.text_encoder_targets": "attention_mlp", "model.clip_skip": 2,
            "output.also_diffusers": True, "output.tensorboard": True, "data.cache_latents_to_disk": True,
            "data.cache_dir": str(cache)}
    over |= {"data.validation_split": 0.2, "train.validation_every_steps": 1}
    res = train(cfg_of(tiny_sd2_dir, image_folder, tmp_path / "o", steps=2, **over))
    with safe_open(str(res.lora_path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        conv = [k for k in keys if "resnets_0_conv1.lora_down" in k]
        assert conv and f.get_tensor(conv[0]).ndim == 4 and f.get_tensor(conv[0]).shape[0] == 2
    assert any("_ff_net_0_proj." in k for k in keys) and any("_proj_in." in k for k in keys)
    assert any(k.startswith("lora_te_") and "_mlp_fc1." in k for k in keys)
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["modelspec.prediction_type"] == "v"
    assert meta["ss_clip_skip"] == "2"
    assert (res.run_dir / "diffusers" / "pytorch_lora_weights.safetensors").exists()
    logs = list((res.run_dir / "logs").rglob("events.out.tfevents*"))
    assert logs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for log in logs:
        acc = EventAccumulator(str(log))
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    assert {"loss", "validation_loss"} <= tags       # the validation curve is a TensorBoard scalar too
    cached = sorted(cache.glob("*.safetensors"))
    assert len(cached) == 5                          # one of the six pictures is held out for validation
    mtimes = [p.stat().st_mtime_ns for p in cached]
    # a second run with the same images and settings reuses the disk cache untouched
    train(cfg_of(tiny_sd2_dir, image_folder, tmp_path / "o2", steps=1, **over))
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.safetensors"))] == mtimes


@pytest.mark.parametrize("optimizer, extra", [
    ("lion", {"train.lr_scheduler": "cosine_with_restarts", "train.lr_num_cycles": 2, "train.learning_rate": 1e-4,
              "train.mixed_precision": "bf16"}),
    ("adafactor", {"train.lr_scheduler": "linear", "train.lr_warmup_steps": 1}),
])
def test_optimizer_state_survives_resume(optimizer, extra, tiny_sd1_dir, image_folder, tmp_path):
    over = {"train.optimizer": optimizer, "train.save_every_steps": 1, "lora.train_text_encoder": False, **extra}
    ref = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "a", steps=3, **over))
    cfg = cfg_of(tiny_sd1_dir, image_folder, tmp_path / "b", steps=3, **over)
    seen = {"step": 0}
    train(cfg, on_event=lambda e: seen.update(step=e.step) if e.type == "step" else None,
          should_stop=lambda: seen["step"] >= 2)
    res = train(cfg, resume=True)
    a, b = load_file(str(ref.lora_path)), load_file(str(res.lora_path))
    tol = 1e-2 if extra.get("train.mixed_precision") == "bf16" else 1e-6
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= tol


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(tiny_sd1_dir, image_folder, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
        import torch
        if torch.cuda.is_available():
            pytest.skip("bitsandbytes and CUDA present: adamw8bit can run")
    except ImportError:
        pass
    with pytest.raises(UserError, match="train.optimizer: adamw8bit"):
        train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "o", steps=1, **{"train.optimizer": "adamw8bit"}))
    assert not list((tmp_path / "o").rglob("*.safetensors"))


def test_data_repeats_default_caption_and_skipped_files(tmp_path):
    root = make_image_folder(tmp_path / "d", n=3, repeats_dir="5_zxq")
    make_image_folder(root, n=2, captions=False, seed=50)
    make_image_folder(tmp_path / "d" / "junk", n=0, broken=True)
    cfg = C.load_config(None, [f"data.dir={root}", "data.default_caption=zxq style", "data.resolution=128",
                               "data.min_bucket_px=64"])
    warnings = []
    data = build_data(cfg, warnings.append)
    rep = [e for e in data.examples if e.path.parent.name == "5_zxq"]
    assert len(rep) == 3 and all(e.repeats == 5 and e.caption.startswith("zxq style, picture") for e in rep)
    uncaptioned = [e for e in data.examples if e.subset != "5_zxq" and e.path.parent == root]
    assert uncaptioned and all(e.caption == "zxq style" for e in uncaptioned)
    assert any("no .txt caption" in w and "zxq style" in w for w in warnings)
    skipped = [w for w in warnings if w.startswith("skipped")]
    assert any("empty.png" in w for w in skipped) and any("notes.jpg" in w for w in skipped)
    assert data.skipped == len(skipped)
    assert len(data.epoch_items()) == 3 * 5 + sum(1 for e in data.examples if e.repeats == 1)
    for batch in data.batches(3, seed=1, epoch=0):
        assert len({data.examples[i].bucket for i in batch}) == 1  # never mixes sizes
    stats = data.stats()
    assert stats["dataset_dirs"]["5_zxq"] == {"n_repeats": 5, "img_count": 3}


def test_caption_shuffle_keeps_first_tokens_and_dropout():
    cfg = C.load_config(None, ["data.shuffle_caption=true", "data.keep_tokens=1"])
    rng = random.Random(0)
    outs = {process_caption("zxq, a, b, c, d", cfg, rng) for _ in range(30)}
    assert all(o.startswith("zxq, ") for o in outs) and len(outs) > 3
    cfg = C.load_config(None, ["data.caption_dropout=1.0"])
    assert process_caption("zxq, a", cfg, rng) == ""


def test_events_report_caching_phase_and_skips(tiny_sd1_dir, messy_folder, tmp_path):
    res = train(cfg_of(tiny_sd1_dir, messy_folder, tmp_path / "o", steps=1))
    events = read_events(res.run_dir / "events.jsonl")
    assert any(e["type"] == "phase" and e["name"] == "caching latents" for e in events)
    warn = " ".join(e["message"] for e in events if e["type"] == "log")
    assert "truncated.jpg" in warn and "empty.png" in warn
    started = next(e for e in events if e["type"] == "run_started")
    assert started["num_images"] == 4 + 5  # 4 drawn + gray, rgba, palette, cmyk, rotated; broken ones skipped
