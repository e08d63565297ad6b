"""Helpers for the LoRA tests: trained-looking adapters on tiny pipelines, UNet probes, log capture."""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads spin (40x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def text_encoders_of(pipe) -> list:
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])


def lora_cfg(**kw):
    from trainer.config import LoraConfig
    base = dict(rank=4, alpha=2.0, unet_targets="kohya", text_encoder_targets="attention_mlp", conv_rank=2,
                conv_alpha=1.0)
    base.update(kw)
    return LoraConfig(**base)


def trained_pipeline(family: str, *, seed: int = 0, train_te: bool = True, **cfg_kw):
    """A tiny pipeline with an injected adapter whose weights look trained (B != 0)."""
    from trainer.lora_inject import inject_lora
    from trainer.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    torch.manual_seed(seed)
    handles = inject_lora(pipe.unet, text_encoders_of(pipe), lora_cfg(**cfg_kw), train_text_encoder=train_te)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in handles.all_params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe, handles


def metadata_for(family: str, **overrides):
    from trainer.config import Config
    from trainer.lora_io import build_metadata
    cfg = Config()
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    now = 1_700_000_000.0
    return build_metadata(
        cfg, family=family, prediction_type="epsilon", base_model_name="tiny.safetensors", steps=10, epoch=1,
        started_at=now - 60, finished_at=now, session_id=1234, num_train_images=20,
        tag_frequency={"10_zxq": {"zxq style": 20, "circle": 7}},
        dataset_dirs={"10_zxq": {"n_repeats": 10, "img_count": 2}},
        bucket_info={"buckets": {0: {"resolution": (512, 512), "count": 20}}, "mean_img_ar_error": 0.0},
        resolved_config_toml="preset_version = 1\n")


def unet_inputs(unet, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        n = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, n, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)}
    return (sample, torch.tensor([500]), ehs), kw


@torch.no_grad()
def unet_out(unet, seed: int = 1) -> torch.Tensor:
    args, kw = unet_inputs(unet, seed)
    return unet(*args, **kw).sample


@torch.no_grad()
def te_out(te) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]])
    return te(ids)[0]


@contextmanager
def captured_logs():
    """Everything diffusers/transformers/peft log or warn while loading (their loggers do not propagate)."""
    records: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    sink = Sink(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(sink)
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield records
        finally:
            for lg, lv in zip(loggers, levels):
                lg.removeHandler(sink)
                lg.setLevel(lv)
    records.extend(str(w.message) for w in caught)


def now() -> float:
    return time.time()


# ---------------------------------------------------------------------------------- independent LDM naming

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_module_map(unet) -> dict[str, str]:
    """diffusers module path -> LDM/SGM module path for every module with parameters.

    Written here from the order in which the original (openaimodel) UNet appends its layers, independently of
    trainer.keymap; test_key_resolution checks it against diffusers' own single-file converter.
    """
    cfg = unet.config
    n = cfg.layers_per_block
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if getattr(unet, "add_embedding", None) is not None:
        out.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})

    def resnet(src: str, dst: str, module):
        for name, _ in module.named_children():
            out[f"{src}.{name}"] = f"{dst}.{_RESNET_LDM[name]}" if name in _RESNET_LDM else None

    def attention(src: str, dst: str, module):
        for name, m in module.named_modules():
            if name and any(True for _ in m.parameters(recurse=False)):
                out[f"{src}.{name}"] = f"{dst}.{name}"

    k = 1
    for i, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(n):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", block.resnets[j])
            if attns is not None:
                attention(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", attns[j])
            k += 1
        if block.downsamplers is not None:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    mid = unet.mid_block
    resnet("mid_block.resnets.0", "middle_block.0", mid.resnets[0])
    attention("mid_block.attentions.0", "middle_block.1", mid.attentions[0])
    resnet("mid_block.resnets.1", "middle_block.2", mid.resnets[1])
    k = 0
    for i, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(n + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", block.resnets[j])
            if attns is not None:
                attention(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", attns[j])
            if j == n and block.upsamplers is not None:
                # Upsample is appended after the SpatialTransformer when the block has one
                out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if attns is not None else 1}.conv"
            k += 1
    return {d: l for d, l in out.items() if l is not None}


def lora_layer_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
