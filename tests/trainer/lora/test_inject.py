"""LoRA injection: which layers get an adapter, at which rank/alpha, dtype and trainability."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from tests.fixtures.lora_files import lora_cfg, one_torch_thread, te_out, text_encoders_of, unet_out  # noqa: F401

from trainer.lora.inject import inject_lora, unet_target_module_names
from tests.fixtures.tiny_models import build_tiny_pipeline


def _kinds(handles):
    """Count adapters by the last part(s) of their module path."""
    out = Counter()
    for comp, path, _ in handles.modules:
        tail = path.split(".")[-1]
        if tail == "0" or path.endswith("ff.net.0.proj") or path.endswith("ff.net.2"):
            tail = ".".join(path.split(".")[-2:]) if not path.endswith("ff.net.0.proj") else "ff.net.0.proj"
        out[(comp, tail)] += 1
    return out


def test_default_targets_are_attention_only_sd1():
    pipe = build_tiny_pipeline("sd1")
    h = inject_lora(pipe.unet, text_encoders_of(pipe), lora_cfg(unet_targets="attention", conv_rank=0,
                                                                 text_encoder_targets="attention"),
                    train_text_encoder=True)
    n_transformer_blocks = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("transformer_blocks.0"))
    unet_paths = [p for c, p, _ in h.modules if c == "unet"]
    assert len(unet_paths) == 8 * n_transformer_blocks
    assert all(p.rsplit(".", 2)[-2] in ("attn1", "attn2") or p.endswith("to_out.0") for p in unet_paths)
    te_paths = [p for c, p, _ in h.modules if c == "text_encoder"]
    assert len(te_paths) == 4 * pipe.text_encoder.config.num_hidden_layers
    assert {p.rsplit(".", 1)[-1] for p in te_paths} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(math.isclose(h.scaling_of("unet", p), 2.0 / 4) for p in unet_paths)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_targets_and_locon(family):
    pipe = build_tiny_pipeline(family)
    h = inject_lora(pipe.unet, text_encoders_of(pipe), lora_cfg(rank=8, alpha=4.0, conv_rank=2, conv_alpha=1.0),
                    train_text_encoder=True)
    layers = {(c, p): layer for c, p, layer in h.modules}
    unet = pipe.unet
    transformer_paths = [n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    for t in transformer_paths:
        for sub in ("proj_in", "proj_out"):
            assert ("unet", f"{t}.{sub}") in layers
        blocks = [n for n, _ in unet.get_submodule(t).named_modules() if n.count(".") == 1 and
                  n.startswith("transformer_blocks.")]
        for b in blocks:
            for sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                        "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
                assert ("unet", f"{t}.{b}.{sub}") in layers
    resnets = [n for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    samplers = [n for n, m in unet.named_modules() if type(m).__name__ in ("Downsample2D", "Upsample2D")]
    for r in resnets:
        for sub, rank, alpha in (("conv1", 2, 1.0), ("conv2", 2, 1.0), ("time_emb_proj", 8, 4.0)):
            layer = layers[("unet", f"{r}.{sub}")]
            assert layer.r["default"] == rank and layer.lora_alpha["default"] == alpha
            assert math.isclose(h.scaling_of("unet", f"{r}.{sub}"), alpha / rank)
        if unet.get_submodule(r).conv_shortcut is not None:
            # 1x1: normal rank (docs/lora-format.md, 'Which modules we train')
            assert layers[("unet", f"{r}.conv_shortcut")].r["default"] == 8
    for s in samplers:
        assert layers[("unet", f"{s}.conv")].r["default"] == 2
    # nothing outside transformers/resnets/samplers: conv_in, conv_out, time embedding stay plain
    for name in ("conv_in", "conv_out", "time_embedding.linear_1"):
        assert ("unet", name) not in layers
    expected = len(transformer_paths) * 2 + sum(
        10 * len([n for n, _ in unet.get_submodule(t).named_modules()
                  if n.count(".") == 1 and n.startswith("transformer_blocks.")]) for t in transformer_paths)
    expected += sum(3 + (unet.get_submodule(r).conv_shortcut is not None) for r in resnets) + len(samplers)
    assert len([1 for c, _ in layers if c == "unet"]) == expected
    for i, te in enumerate(text_encoders_of(pipe)):
        comp = ("text_encoder", "text_encoder_2")[i]
        assert len([1 for c, _ in layers if c == comp]) == 6 * te.config.num_hidden_layers
        assert len(h.text_encoder_params[i]) == 2 * 6 * te.config.num_hidden_layers


def test_base_frozen_lora_fp32_over_bf16_base():
    pipe = build_tiny_pipeline("sd1")
    pipe.unet.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    h = inject_lora(pipe.unet, [pipe.text_encoder], lora_cfg(dropout=0.1), train_text_encoder=True)
    lora_ids = {id(p) for p in h.all_params}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in h.all_params)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if id(p) not in lora_ids:
                assert not p.requires_grad, name
                assert p.dtype == torch.bfloat16, name
    assert len(h.unet_params) == 2 * len([1 for c, _, _ in h.modules if c == "unet"])
    out = te_out(pipe.text_encoder)  # runs with fp32 adapters on a bf16 base
    assert torch.isfinite(out.float()).all()


def test_text_encoder_not_trained():
    pipe = build_tiny_pipeline("sdxl")
    h = inject_lora(pipe.unet, text_encoders_of(pipe), lora_cfg(), train_text_encoder=False)
    assert h.text_encoder_params == [[], []]
    assert {c for c, _, _ in h.modules} == {"unet"}
    assert not any(p.requires_grad for te in text_encoders_of(pipe) for p in te.parameters())


def test_fresh_adapter_leaves_outputs_unchanged_and_init_is_deterministic():
    weights = []
    for attempt in range(2):
        pipe = build_tiny_pipeline("sd1")
        base = unet_out(pipe.unet) if attempt == 0 else None
        torch.manual_seed(123)
        h = inject_lora(pipe.unet, text_encoders_of(pipe), lora_cfg(), train_text_encoder=True)
        if base is not None:  # PEFT starts B at zero: the adapted model is the base model until trained
            assert torch.equal(unet_out(pipe.unet), base)
        weights.append([p.detach().clone() for p in h.all_params])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert h.scaling_of("text_encoder", "encoder.layers.0.self_attn.q_proj") == pytest.approx(0.5)
    with pytest.raises(KeyError):
        h.scaling_of("unet", "conv_in")


def test_transformers_v5_text_encoder_paths():
    """CLIPTextModel (SD1, SDXL te1) has no text_model prefix in transformers 5; WithProjection keeps it."""
    pipe = build_tiny_pipeline("sdxl")
    h = inject_lora(pipe.unet, text_encoders_of(pipe), lora_cfg(unet_targets="attention", conv_rank=0),
                    train_text_encoder=True)
    te1 = [p for c, p, _ in h.modules if c == "text_encoder"]
    te2 = [p for c, p, _ in h.modules if c == "text_encoder_2"]
    for p in te1 + te2:
        assert ".encoder.layers." in "." + p
    assert all(p.startswith("text_model.") for p in te2)


def test_unet_target_module_names_does_not_modify():
    pipe = build_tiny_pipeline("sd1")
    targets, convs = unet_target_module_names(pipe.unet, lora_cfg())
    assert set(convs) <= set(targets)
    assert all(pipe.unet.get_submodule(c).kernel_size == (3, 3) for c in convs)
    assert not any(hasattr(m, "lora_A") for m in pipe.unet.modules())


def test_alpha_zero_means_alpha_equals_rank():
    """kohya's convention (docs/lora-format.md, 'Alpha and scale'), so a file never carries alpha 0."""
    pipe = build_tiny_pipeline("sd1")
    h = inject_lora(pipe.unet, [pipe.text_encoder], lora_cfg(rank=8, alpha=0.0, conv_rank=4, conv_alpha=0.0),
                    train_text_encoder=False)
    assert {h.scaling_of("unet", p) for _, p, _ in h.modules} == {1.0}
