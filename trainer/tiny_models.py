"""Tiny random SD1.5-, SD2- and SDXL-shaped pipelines built from configs (tests, demo, benchmarks).

They keep the real models' structure (block layout, layers_per_block=2, 4-level VAE with factor 8, the real
CLIP tokenizer, the SD noise schedule) at a few hundred thousand parameters, so every path that handles a
real model (diffusers folder, single-file checkpoint, LoRA key naming) runs on them unchanged. Shape
conventions that single-file loading relies on are kept: SD1 has 8 heads per attention, SD2/SDXL use 64-wide
heads, CLIP text encoders use 64-wide heads (at least one), group norms have 32 groups.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("sd1", "sd2", "sdxl")

_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _text_encoder(hidden: int, with_projection: bool, seed: int, act: str = "quick_gelu"):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=3, num_attention_heads=max(1, hidden // 64),
                         max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae(seed: int, scaling_factor: float):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=scaling_factor)


def build_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A diffusers pipeline with random weights: SD1.5-, SD2-768-v- or SDXL-shaped."""
    import torch
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from .tokenizers import clip_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    torch.manual_seed(seed)
    if family == "sdxl":
        te1 = _text_encoder(32, False, seed + 1)
        te2 = _text_encoder(64, True, seed + 2, act="gelu")
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(1, 1, 1), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=96,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 64, norm_num_groups=32)
        sched = EulerDiscreteScheduler(**{k: v for k, v in _SCHED.items() if k not in ("clip_sample", "set_alpha_to_one")},
                                       prediction_type="epsilon", timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=_vae(seed + 3, 0.13025), text_encoder=te1, text_encoder_2=te2,
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"),
                                         unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    sd2 = family == "sd2"
    te = _text_encoder(64 if sd2 else 32, False, seed + 1, act="gelu" if sd2 else "quick_gelu")
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 1, 1) if sd2 else 8, cross_attention_dim=te.config.hidden_size,
        use_linear_projection=sd2, norm_num_groups=32)
    sched = DDIMScheduler(**_SCHED, prediction_type="v_prediction" if sd2 else "epsilon")
    return StableDiffusionPipeline(vae=_vae(seed + 3, 0.18215), text_encoder=te,
                                   tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Build and save a tiny pipeline in the diffusers folder layout (safetensors)."""
    path = Path(path)
    build_tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path
