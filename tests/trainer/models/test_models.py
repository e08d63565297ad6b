"""Base model loading: diffusers folder vs single-file checkpoint agree, real-size layouts, and user errors."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from trainer.config import ModelConfig
from trainer.errors import UserError

FAMILIES = ("sd1", "sd2", "sdxl")
EXPECTED_PRED = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}


@pytest.fixture(scope="module")
def pairs(request, tmp_path_factory):
    """family -> (model loaded from the diffusers folder, single-file path, model loaded from that file)."""
    from trainer.models.ldm_export import save_single_file
    from trainer.models.loading import load_base_model
    cache = {}

    def get(family):
        if family not in cache:
            folder = request.getfixturevalue(f"tiny_{family}_dir")
            a = load_base_model(ModelConfig(base=str(folder)))
            file = tmp_path_factory.mktemp(f"single_{family}") / f"tiny_{family}.safetensors"
            save_single_file(a.make_pipeline(), file)
            cache[family] = (a, file, load_base_model(ModelConfig(base=str(file))))
        return cache[family]
    return get


def _close(x, y, what):
    assert x.shape == y.shape, what
    assert torch.allclose(x, y, atol=1e-5, rtol=0), f"{what}: max diff {(x - y).abs().max().item()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_and_single_file_load_the_same_model(pairs, family):
    a, file, b = pairs(family)
    from trainer.models.loading import detect_family
    assert detect_family(a.source) == detect_family(file) == family
    for m in (a, b):
        assert m.family == family
        assert m.prediction_type == EXPECTED_PRED[family]
        assert m.noise_scheduler.config.prediction_type == EXPECTED_PRED[family]
        assert m.scheduler_config["prediction_type"] == EXPECTED_PRED[family]
        assert len(m.text_encoders) == len(m.tokenizers) == (2 if family == "sdxl" else 1)
    assert b.name == file.name and b.source == str(file)
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prompt = "a photo of a cat, zxq style"
        for i, (ta, tb, ka, kb) in enumerate(zip(a.text_encoders, b.text_encoders, a.tokenizers, b.tokenizers)):
            ids = ka(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
            assert torch.equal(ids, kb(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids)
            oa, ob = ta(ids, output_hidden_states=True), tb(ids, output_hidden_states=True)
            assert len(oa.hidden_states) == len(ob.hidden_states)
            _close(oa.last_hidden_state, ob.last_hidden_state, f"text encoder {i} last hidden state")
            _close(oa.hidden_states[-2], ob.hidden_states[-2], f"text encoder {i} penultimate hidden state")
            pooled = "text_embeds" if hasattr(oa, "text_embeds") else "pooler_output"
            _close(getattr(oa, pooled), getattr(ob, pooled), f"text encoder {i} {pooled}")

        latents = torch.randn(1, 4, 8, 8, generator=g)
        ctx = torch.randn(1, 77, a.unet.config.cross_attention_dim, generator=g)
        extra = {}
        if family == "sdxl":
            extra = {"added_cond_kwargs": {
                "text_embeds": torch.randn(1, a.text_encoders[1].config.projection_dim, generator=g),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}}
        _close(a.unet(latents, 10, ctx, **extra).sample, b.unet(latents, 10, ctx, **extra).sample, "UNet")
        _close(a.vae.decode(latents).sample, b.vae.decode(latents).sample, "VAE decode")


@pytest.mark.parametrize("family", FAMILIES)
def test_make_pipeline_generates_an_image(pairs, family):
    _, _, b = pairs(family)
    pipe = b.make_pipeline()
    assert pipe.unet is b.unet and pipe.vae is b.vae and pipe.text_encoder is b.text_encoders[0]
    assert getattr(pipe, "safety_checker", None) is None
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=2, height=64, width=64, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_single_file_keys_are_named_like_released_checkpoints(pairs):
    from trainer.models.single_file import detect_family, read_header
    expect = {
        "sd1": ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",  # SD1 level-0 upsampler (no attention)
                "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.0.block.1.conv1.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_ids"],
        "sd2": ["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                "cond_stage_model.model.transformer.resblocks.3.mlp.c_proj.bias",  # the extra (unused) last block
                "cond_stage_model.model.text_projection", "cond_stage_model.model.positional_embedding", "v_pred"],
        "sdxl": ["model.diffusion_model.label_emb.0.0.weight",
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                 "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_bias",
                 "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.ln_final.weight"],
    }
    for family, keys in expect.items():
        _, file, _ = pairs(family)
        names, meta = read_header(file)
        assert set(keys) <= set(names), family
        assert detect_family(file) == family and detect_family(names) == family
        assert meta["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")
    from safetensors import safe_open
    with safe_open(str(pairs("sd1")[1]), "pt") as f:  # LDM stores VAE attention projections as 1x1 convs
        assert len(f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()) == 4


@pytest.mark.parametrize("family", ("sd2", "sdxl"))
def test_diffusers_from_single_file_reads_our_export(pairs, family):
    """diffusers' own single-file loader (independent key mapping) finds the same weights in our files."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    a, file, _ = pairs(family)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    p = cls.from_single_file(str(file), config=a.source, local_files_only=True)
    mods = [(p.unet, a.unet), (p.vae, a.vae), (p.text_encoder, a.text_encoders[0])]
    if family == "sdxl":
        mods.append((p.text_encoder_2, a.text_encoders[1]))
    for theirs, ours in mods:
        ref = ours.state_dict()
        got = theirs.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.items()), type(ours).__name__


def test_fp16_variant_folder(tmp_path):
    from trainer.models.loading import load_base_model
    from tests.fixtures.tiny_models import build_tiny_pipeline
    build_tiny_pipeline("sd1").to(torch.float16).save_pretrained(tmp_path / "m", variant="fp16")
    assert not list((tmp_path / "m" / "unet").glob("diffusion_pytorch_model.safetensors"))
    m = load_base_model(ModelConfig(base=str(tmp_path / "m")))
    assert m.family == "sd1" and m.unet.dtype == torch.float32 and m.text_encoders[0].dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_layout_gives_back_the_shipped_configs(family):
    """Real-size models on the meta device -> original key layout -> shape inference = the real configs."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.ldm_export import pipeline_to_ldm
    from trainer.models.single_file import (SD1_TE, SD2_TE, SDXL_TE1, SDXL_TE2, _family_of, base_config,
                                     infer_clip_config, infer_unet_config, infer_vae_config)
    cfg = {c: base_config(family, c) for c in ("unet", "vae", "text_encoder")}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te2 = None
        if family == "sdxl":
            cfg["text_encoder_2"] = base_config(family, "text_encoder_2")
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    pipe = SimpleNamespace(unet=unet, vae=vae, text_encoder=te, text_encoder_2=te2,
                           scheduler=SimpleNamespace(config=base_config(family, "scheduler")))
    sd, _ = pipeline_to_ldm(pipe)
    assert _family_of(sd) == family
    if family == "sd2":  # released SD2 files carry all 24 OpenCLIP blocks
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in sd

    def same(inferred, shipped):
        diff = {k: (v, shipped.get(k)) for k, v in inferred.items()
                if k in shipped and (list(v) if isinstance(v, tuple) else v) != shipped[k]}
        assert not diff, diff

    pooled = cfg.get("text_encoder_2", {}).get("projection_dim")
    same(infer_unet_config(sd, family, pooled), cfg["unet"])
    same(infer_vae_config(sd, family), cfg["vae"])
    if family == "sdxl":
        same(infer_clip_config(sd, family, "text_encoder", SDXL_TE1, openclip=False), cfg["text_encoder"])
        same(infer_clip_config(sd, family, "text_encoder_2", SDXL_TE2, openclip=True), cfg["text_encoder_2"])
    elif family == "sd2":
        same(infer_clip_config(sd, family, "text_encoder", SD2_TE, openclip=True), cfg["text_encoder"])
    else:
        same(infer_clip_config(sd, family, "text_encoder", SD1_TE, openclip=False), cfg["text_encoder"])


def test_prediction_type_rules_and_override(pairs, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from trainer.models.loading import load_base_model
    _, file, _ = pairs("sd2")
    sd = load_file(str(file))
    bare = tmp_path / "sd2_no_marker.safetensors"
    save_file({k: v for k, v in sd.items() if k != "v_pred"}, str(bare))  # no key, no metadata
    with caplog.at_level(logging.WARNING):
        m = load_base_model(ModelConfig(base=str(bare)))
    assert m.prediction_type == "epsilon"
    assert "prediction_type" in caplog.text and "v_prediction" in caplog.text
    m = load_base_model(ModelConfig(base=str(bare), prediction_type="v_prediction"))
    assert m.prediction_type == "v_prediction" and m.noise_scheduler.config.prediction_type == "v_prediction"
    m = load_base_model(ModelConfig(base=str(file), prediction_type="epsilon"))
    assert m.prediction_type == "epsilon"


def test_ckpt_and_separate_vae(pairs, tmp_path):
    from safetensors.torch import load_file, save_file

    from trainer.models.loading import load_base_model
    a, file, _ = pairs("sd1")
    sd = load_file(str(file))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    vae_file = tmp_path / "vae.safetensors"  # a standalone VAE as distributed: bare LDM keys
    save_file({k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")},
              str(vae_file))
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, str(no_vae))

    m = load_base_model(ModelConfig(base=str(ckpt)))
    assert m.family == "sd1"
    with pytest.raises(UserError, match="no VAE weights"):
        load_base_model(ModelConfig(base=str(no_vae)))
    m = load_base_model(ModelConfig(base=str(no_vae), vae=str(vae_file)))
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        _close(m.vae.decode(latents).sample, a.vae.decode(latents).sample, "separate VAE decode")
    m = load_base_model(ModelConfig(base=str(file), vae=str(Path(a.source) / "vae")))
    assert m.vae.config.block_out_channels == a.vae.config.block_out_channels


def test_bad_inputs_are_one_line_user_errors(tmp_path, tiny_sd1_dir):
    from safetensors.torch import save_file

    from trainer.models.loading import load_base_model

    def err(base, **kw):
        with pytest.raises(UserError) as e:
            load_base_model(ModelConfig(base=str(base), **kw))
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    missing = tmp_path / "nope.safetensors"
    assert str(missing) in err(missing) and "no such file" in err(missing)
    assert str(tmp_path / "nope") in err(tmp_path / "nope")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert str(empty) in err(empty) and "empty" in err(empty)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not weights\n" * 10)
    assert str(text) in err(text) and "safetensors" in err(text)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, str(unrelated))
    msg = err(unrelated)
    assert str(unrelated) in msg and "unknown architecture" in msg and "not an SD1.5, SD2.x or SDXL" in msg
    import argparse
    pickled = tmp_path / "unsafe.ckpt"  # a pickle that needs more than tensors: refused, never executed
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, pickled)
    assert str(pickled) in err(pickled) and "weights-only" in err(pickled)
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    assert str(other) in err(other)
    not_model = tmp_path / "folder"
    not_model.mkdir()
    assert str(not_model) in err(not_model) and "model_index.json" in err(not_model)
    assert "model.family" in err(tiny_sd1_dir, family="sdxl")
    assert "model.base" in err("")
    hub = "lorastudio-test/no-such-model"
    msg = err(hub)
    assert hub in msg and "local" in msg
    assert "nope.safetensors" in err(tiny_sd1_dir, vae=str(tmp_path / "nope.safetensors"))


def test_time_to_load_a_tiny_single_file(pairs):
    from trainer.models.loading import load_base_model
    _, file, _ = pairs("sdxl")
    start = time.perf_counter()
    load_base_model(ModelConfig(base=str(file)))
    print(f"\nloading the tiny SDXL single file took {time.perf_counter() - start:.2f} s")
