"""Load SD1.5 / SD2.x / SDXL single-file checkpoints with no network: detect the family, infer configs, convert.

How it works: the family comes from the text-encoder key names; the diffusers configs of the real models ship in
``assets/configs/<family>/``; every value that depends on size (channels, depths, widths, layer counts) is then
read from the tensor shapes, so the same code loads a real 2-7 GB checkpoint and the tests' tiny ones. Heads
follow the real models' conventions (SD1 8 per attention, SD2/SDXL 64-wide, CLIP 64-wide, at least one). The
weights are renamed with diffusers' own converters (``diffusers.loaders.single_file_utils``) and assigned
into models built on the ``meta`` device, so nothing is randomly initialised and nothing is fetched.

Prediction type (what the UNet predicts), first match wins:

1. ``model.prediction_type`` when it is not ``auto``;
2. a ``v_pred`` key (written by ComfyUI and by :mod:`trainer.models.ldm_export`) -> v_prediction;
3. safetensors metadata ``modelspec.prediction_type`` (``v`` / ``epsilon``) or a ``modelspec.architecture``
   ending in ``-v``;
4. SD2 only: ComfyUI's weight-statistics test (std of ``output_blocks.11.1.transformer_blocks.0.norm1.bias``
   above 0.09 means a 768-v model), logged as a guess;
5. otherwise epsilon; for SD2 a log line says how to force v-prediction (SD2 512-base and 768-v files have the
   same keys and shapes, so nothing else can tell them apart).

A ``ztsnr`` key turns on the zero-terminal-SNR schedule (``rescale_betas_zero_snr``).

SD2's text encoder: SD2 reads OpenCLIP's penultimate layer, and diffusers' SD2 text encoder leaves out the last
residual block; released (and kohya/A1111-saved) files have it, so it is dropped here, except in a ViT-H file
with only 23 blocks (written by diffusers' conversion script, which already left it out).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from trainer.common.names import CHECKPOINT_SUFFIXES
from trainer.errors import UserError, first_line

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SD2_SGM_TE = "conditioner.embedders.0.model."  # SD2 saved by Stability's generative-models code
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
SUFFIXES = CHECKPOINT_SUFFIXES
_COMFY_V_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


@dataclass
class Checkpoint:
    """What a single file holds once read: tensors, safetensors metadata, and where it came from."""
    path: Path
    tensors: dict
    metadata: dict = field(default_factory=dict)


@dataclass
class SingleFileParts:
    """Loaded components of a single-file checkpoint (``vae`` is None when the file has no VAE weights)."""
    family: str
    prediction_type: str
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = True


# ----------------------------------------------------------------------------------------------- reading


def _bad_file(path: Path, why: str) -> UserError:
    return UserError(f"{path}: {why}", path=str(path))


def _not_safetensors(path: Path, e: BaseException) -> UserError:
    return _bad_file(path, f"not a valid .safetensors file ({first_line(e)}); re-download or re-export it")


def read_header(path: str | Path) -> tuple[list[str], dict]:
    """Tensor names and metadata of a .safetensors file without reading the weights (fast on 7 GB files)."""
    from safetensors import safe_open
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() != ".safetensors":
        ckpt = read_checkpoint(path)
        return list(ckpt.tensors), ckpt.metadata
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise _not_safetensors(path, e) from e


def _check_file(path: Path) -> None:
    if not path.exists():
        raise _bad_file(path, "no such file")
    if path.is_dir():
        raise _bad_file(path, "is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise _bad_file(path, "the file is empty (an interrupted download?); download it again")
    if path.suffix.lower() not in SUFFIXES:
        raise _bad_file(path, f"expected a .safetensors (or .ckpt) checkpoint, got '{path.suffix or 'no extension'}'")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """All tensors of a .safetensors file (or a legacy .ckpt, read with ``weights_only=True`` only)."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise _not_safetensors(path, e) from e
        return Checkpoint(path, tensors, metadata)
    import torch
    try:  # weights_only: a .ckpt is a pickle, and a pickle can run code; this refuses anything but tensors
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _bad_file(path, f"cannot be read safely as a weights-only .ckpt ({first_line(e)}); "
                              "convert it to .safetensors") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise _bad_file(path, "holds no state dict of tensors")
    return Checkpoint(path, {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {})


#: safetensors dtype names -> torch dtype names (the header's spelling)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_shapes(path: str | Path) -> Checkpoint:
    """A .safetensors checkpoint's tensors as ``meta`` tensors (names, shapes, dtypes; no weights read), except
    the one bias :func:`detect_prediction_type` looks at, which is read for real."""
    import torch
    from safetensors import safe_open
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for k in f.keys():
                s = f.get_slice(k)
                tensors[k] = torch.empty(s.get_shape(), dtype=getattr(torch, _ST_DTYPES[s.get_dtype()]),
                                         device="meta")
            if _COMFY_V_KEY in tensors:
                tensors[_COMFY_V_KEY] = f.get_tensor(_COMFY_V_KEY)
    except Exception as e:
        raise _not_safetensors(path, e) from e
    return Checkpoint(path, tensors, metadata)


# ----------------------------------------------------------------------------------------------- detection


def _normalize_keys(tensors: dict) -> dict:
    """Old SD1 files name the CLIP text model without its ``text_model.`` level; add it."""
    old = SD1_TE + "embeddings."
    if any(k.startswith(old) for k in tensors):
        return {(SD1_TE + "text_model." + k[len(SD1_TE):]) if k.startswith(SD1_TE) and
                not k.startswith(SD1_TE + "text_model.") else k: v for k, v in tensors.items()}
    return tensors


#: the key prefixes of each family's components in a single file (what the loader reads; anything else, such as
#: EMA copies or a training schedule, is not part of the model)
MODEL_PREFIXES = {"sd1": (UNET, VAE, SD1_TE), "sd2": (UNET, VAE, SD2_TE),
                  "sdxl": (UNET, VAE, SDXL_TE1, SDXL_TE2)}
#: marker keys of a single file (see the module docstring)
MARKER_KEYS = ("v_pred", "ztsnr")


def loader_keys(keys: Iterable[str], name: str = "checkpoint") -> tuple[str, dict[str, str]]:
    """(family, {key as the loader reads it: key in the file}): old SD1 files gain the ``text_model.`` level and
    SD2 files saved by Stability's generative-models code get the ``cond_stage_model.model.`` prefix, as
    :func:`load_single_file` renames them."""
    sd = _normalize_keys({k: k for k in keys})
    family = _family_of(sd, name)
    if family == "sd2" and not any(k.startswith(SD2_TE) for k in sd):
        sd = {(SD2_TE + k[len(SD2_SGM_TE):]) if k.startswith(SD2_SGM_TE) else k: v for k, v in sd.items()}
    return family, sd


def _describe(keys: list[str]) -> str:
    if any("lora" in k.lower() for k in keys[:200]):
        return "it looks like a LoRA, not a base model"
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "encoder.down.")) for k in keys):
        return "it looks like a single component (a UNet or VAE file), not a full checkpoint"
    if not keys:
        return "it holds no tensors"
    return "first keys: " + ", ".join(sorted(keys)[:3])


def _family_of(keys: Iterable[str], name: str = "checkpoint") -> str:
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(UNET):
        if has(SDXL_TE2) and has(SDXL_TE1):
            return "sdxl"
        if has(SD2_SGM_TE) and has(UNET + "label_emb."):
            raise UserError(f"{name}: an SDXL refiner checkpoint; LoRA Studio trains on SDXL base models "
                            "(give an SDXL base checkpoint)")
        if has(SD2_TE) or has(SD2_SGM_TE):
            return "sd2"
        if has(SD1_TE):
            return "sd1"
    raise UserError(f"{name}: not an SD1.5, SD2.x or SDXL checkpoint (unknown architecture; {_describe(keys)})")


def detect_family(path_or_keys) -> str:
    """'sd1' | 'sd2' | 'sdxl' from a checkpoint file or its key names; UserError for anything else."""
    if isinstance(path_or_keys, (str, Path)):
        keys, _ = read_header(path_or_keys)
        return _family_of(_normalize_keys(dict.fromkeys(keys)), str(path_or_keys))
    return _family_of(_normalize_keys(dict.fromkeys(path_or_keys)))


# ----------------------------------------------------------------------------------------------- configs


def base_config(family: str, component: str) -> dict:
    """The shipped diffusers config of the real model (``assets/configs/<family>/<component>``)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    file = CONFIGS / family / (component if component != "model_index" else "") / \
        (name if component != "model_index" else "model_index.json")
    return json.loads(file.read_text(encoding="utf-8"))


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct integers right after ``prefix`` (``prefix`` ends with a dot)."""
    out = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _shape(sd: Mapping, key: str) -> tuple:
    try:
        return tuple(sd[key].shape)
    except KeyError:
        raise KeyError(f"missing weight {key!r}") from None


def infer_unet_config(sd: Mapping, family: str, pooled_dim: int | None = None) -> dict:
    """UNet2DConditionModel config: the shipped one with every size-dependent value read from ``sd``'s shapes."""
    cfg = {k: v for k, v in base_config(family, "unet").items() if not k.startswith("_")}
    p = UNET
    conv_in = _shape(sd, p + "input_blocks.0.0.weight")
    n_in = len(_indices(sd, p + "input_blocks."))
    downs = [i for i in range(1, n_in) if p + f"input_blocks.{i}.0.op.weight" in sd]
    lpb = downs[0] - 1 if downs else n_in - 1
    levels = len(downs) + 1
    if n_in != 1 + levels * lpb + (levels - 1):
        raise ValueError(f"{n_in} input blocks do not form a UNet with {levels} levels")

    def depth(prefix: str) -> int:
        return len(_indices(sd, p + prefix + "transformer_blocks."))

    channels, down_types, depths, attn_key = [], [], [], None
    for lvl in range(levels):
        i = 1 + lvl * (lpb + 1)
        channels.append(_shape(sd, p + f"input_blocks.{i}.0.out_layers.3.weight")[0])
        d = depth(f"input_blocks.{i}.1.")
        down_types.append("CrossAttnDownBlock2D" if d else "DownBlock2D")
        depths.append(d or 1)
        if d and attn_key is None:
            attn_key = p + f"input_blocks.{i}.1."
    up_types = ["CrossAttnUpBlock2D" if depth(f"output_blocks.{lvl * (lpb + 1)}.1.") else "UpBlock2D"
                for lvl in range(levels)]
    if attn_key is None:
        raise ValueError("the UNet has no attention blocks")
    cfg.update(
        in_channels=conv_in[1], out_channels=_shape(sd, p + "out.2.weight")[0],
        block_out_channels=channels, layers_per_block=lpb,
        down_block_types=down_types, up_block_types=up_types,
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        cross_attention_dim=_shape(sd, attn_key + "transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_projection=len(_shape(sd, attn_key + "proj_in.weight")) == 2,
        # diffusers' attention_head_dim is the head *count* (kept for config compatibility)
        attention_head_dim=8 if family == "sd1" else [max(1, c // 64) for c in channels],
    )
    mid = depth("middle_block.1.")
    if mid and mid != depths[-1]:
        raise ValueError(f"middle block depth {mid} differs from the last level's {depths[-1]}")
    time_dim = _shape(sd, p + "time_embed.0.weight")[0]
    if time_dim != 4 * channels[0]:
        cfg["time_embedding_dim"] = time_dim
    if p + "label_emb.0.0.weight" in sd:
        if family != "sdxl" or not pooled_dim:
            raise ValueError("class-conditioned UNet (label_emb) outside SDXL")
        adm = _shape(sd, p + "label_emb.0.0.weight")[1]
        if (adm - pooled_dim) % 6:
            raise ValueError(f"label_emb input {adm} does not fit 6 time ids + pooled {pooled_dim}")
        cfg.update(projection_class_embeddings_input_dim=adm, addition_time_embed_dim=(adm - pooled_dim) // 6)
    return cfg


def infer_vae_config(sd: Mapping, family: str, prefix: str = VAE) -> dict:
    """AutoencoderKL config from LDM-layout VAE weights under ``prefix``."""
    cfg = {k: v for k, v in base_config(family, "vae").items() if not k.startswith("_")}
    levels = len(_indices(sd, prefix + "encoder.down."))
    cfg.update(
        in_channels=_shape(sd, prefix + "encoder.conv_in.weight")[1],
        out_channels=_shape(sd, prefix + "decoder.conv_out.weight")[0],
        latent_channels=_shape(sd, prefix + "decoder.conv_in.weight")[1],
        block_out_channels=[_shape(sd, prefix + f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)],
        layers_per_block=len(_indices(sd, prefix + "encoder.down.0.block.")),
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        use_quant_conv=prefix + "quant_conv.weight" in sd,
        use_post_quant_conv=prefix + "post_quant_conv.weight" in sd,
        mid_block_add_attention=prefix + "encoder.mid.attn_1.q.weight" in sd,
    )
    return cfg


def infer_clip_config(sd: Mapping, family: str, component: str, prefix: str, openclip: bool) -> dict:
    """CLIPTextConfig dict for a Hugging Face CLIP (``openclip=False``) or OpenCLIP text model under ``prefix``."""
    cfg = {k: v for k, v in base_config(family, component).items() if not k.startswith("_")}
    if openclip:
        vocab, hidden = _shape(sd, prefix + "token_embedding.weight")
        n_pos = _shape(sd, prefix + "positional_embedding")[0]
        layers = len(_indices(sd, prefix + "transformer.resblocks."))
        inter = _shape(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        if prefix + "text_projection" in sd and component == "text_encoder_2":
            cfg["projection_dim"] = _shape(sd, prefix + "text_projection")[1]
        if family == "sd2" and not (layers == 23 and hidden == 1024):
            layers -= 1  # see the module docstring: SD2 leaves out OpenCLIP's last block
    else:
        t = prefix + "text_model."
        vocab, hidden = _shape(sd, t + "embeddings.token_embedding.weight")
        n_pos = _shape(sd, t + "embeddings.position_embedding.weight")[0]
        layers = len(_indices(sd, t + "encoder.layers."))
        inter = _shape(sd, t + "encoder.layers.0.mlp.fc1.weight")[0]
    cfg.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=n_pos, num_hidden_layers=layers,
               intermediate_size=inter, num_attention_heads=max(1, hidden // 64))
    return cfg


# ----------------------------------------------------------------------------------------------- building


def _assign(model, weights: dict, what: str, path: Path, dtype):
    """Put converted weights into a model built on the meta device; a mismatch is a UserError naming the file."""
    expected = model.state_dict()
    flat = not hasattr(model, "text_model") and any(k.startswith("text_model.") for k in weights)
    if flat:  # transformers >= 5.6 CLIPTextModel has no ``text_model`` level
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{n} {label} (e.g. {keys[0]})" for label, keys, n in
                           (("missing", missing, len(missing)), ("unexpected", unexpected, len(unexpected)),
                            ("with other shapes", wrong, len(wrong))) if keys)
        raise UserError(f"{path}: the {what} weights do not fit the detected layout ({detail}); "
                        "the file may be damaged or an unsupported variant")
    model.load_state_dict({k: v.to(dtype).contiguous() if v.is_floating_point() else v
                           for k, v in weights.items()}, strict=True, assign=True)
    return model.eval()


def _empty(cls, config):
    """Build a model without allocating or randomly initialising its weights (diffusers: dict config)."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        return cls.from_config(config) if isinstance(config, dict) else cls(config)


def _build_unet(sd, family, path, dtype, pooled_dim=None):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = infer_unet_config(sd, family, pooled_dim)
    weights = convert_ldm_unet_checkpoint({k: v for k, v in sd.items() if k.startswith(UNET)}, cfg)
    return _assign(_empty(UNet2DConditionModel, cfg), weights, "UNet", path, dtype)


def _build_vae(sd, family, path, dtype, prefix=VAE, scaling_factor=None):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    cfg = infer_vae_config(sd, family, prefix)
    if scaling_factor is not None:
        cfg["scaling_factor"] = scaling_factor
    bare = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return _assign(_empty(AutoencoderKL, cfg), convert_ldm_vae_checkpoint(bare, cfg), "VAE", path, dtype)


def _build_clip(sd, family, component, prefix, path, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    cfg = infer_clip_config(sd, family, component, prefix, openclip=False)
    weights = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(prefix)}, prefix)
    model = _empty(CLIPTextModel, CLIPTextConfig(**cfg))
    return _assign(model, weights, f"text encoder ({prefix}*)", path, dtype)


def _build_openclip(sd, family, component, prefix, path, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    cfg = infer_clip_config(sd, family, component, prefix, openclip=True)
    with_proj = component == "text_encoder_2"
    keep = cfg["num_hidden_layers"]
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    part = {k: v for k, v in sd.items() if k.startswith(prefix)
            and not ((m := block.match(k)) and int(m.group(1)) >= keep)
            and (with_proj or not k.endswith(("text_projection", "logit_scale")))}
    model = _empty(CLIPTextModelWithProjection if with_proj else CLIPTextModel, CLIPTextConfig(**cfg))
    weights = convert_open_clip_checkpoint(model, part, prefix=prefix)
    return _assign(model, weights, f"text encoder ({prefix}*)", path, dtype)


def detect_prediction_type(ckpt: Checkpoint, family: str, requested: str = "auto") -> tuple[str, str]:
    """(prediction type, why) following the order in the module docstring."""
    if requested != "auto":
        return requested, "set in model.prediction_type"
    if "v_pred" in ckpt.tensors:
        return "v_prediction", "the file has a v_pred key"
    spec = ckpt.metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "metadata modelspec.prediction_type"
    if spec == "epsilon":
        return "epsilon", "metadata modelspec.prediction_type"
    if ckpt.metadata.get("modelspec.architecture", "").endswith("-v"):
        return "v_prediction", "metadata modelspec.architecture"
    if family == "sd2":
        bias = ckpt.tensors.get(_COMFY_V_KEY)
        if bias is not None and ckpt.tensors[UNET + "input_blocks.0.0.weight"].shape[1] == 4 \
                and float(bias.float().std(unbiased=False)) > 0.09:
            return "v_prediction", "guessed from the weights (ComfyUI's test)"
        log.warning("%s: SD2 checkpoint with no v-prediction marker: training it as epsilon. If it is a 768-v "
                    "model (SD 2.x 768), set model.prediction_type = \"v_prediction\".", ckpt.path.name)
    return "epsilon", "default"


def load_single_file(path: str | Path, *, dtype=None, prediction_type: str = "auto",
                     need_vae: bool = True, meta: bool = False) -> SingleFileParts:
    """Every component of a single-file checkpoint, built offline from the shipped configs and the file's shapes.

    ``meta=True`` (a .safetensors file only): the same components and checks, on the ``meta`` device, from the
    header alone (:func:`read_shapes`): the layout of a 7 GB file in a second, with no weights in memory.
    """
    import torch

    from trainer.models.tokenizers import clip_tokenizer
    dtype = dtype or torch.float32
    start = time.perf_counter()
    ckpt = read_shapes(path) if meta else read_checkpoint(path)
    path = ckpt.path
    sd = ckpt.tensors = _normalize_keys(ckpt.tensors)
    family = _family_of(sd, str(path))
    if family == "sd2" and not any(k.startswith(SD2_TE) for k in sd):
        sd = ckpt.tensors = {(SD2_TE + k[len(SD2_SGM_TE):]) if k.startswith(SD2_SGM_TE) else k: v
                             for k, v in sd.items()}
    has_vae = any(k.startswith(VAE) for k in sd)
    if not has_vae and need_vae:
        raise UserError(f"{path}: the checkpoint has no VAE weights (first_stage_model.*); set model.vae to a "
                        "VAE .safetensors file or folder", path=str(path))
    pred, why = detect_prediction_type(ckpt, family, prediction_type)
    sched = {k: v for k, v in base_config(family, "scheduler").items() if k != "_diffusers_version"}
    sched["prediction_type"] = pred
    if "ztsnr" in sd:
        sched["rescale_betas_zero_snr"] = True

    def done(prefix: str) -> None:
        # drop what a component consumed, so a half-precision file cast to float32 is never held twice in full
        for k in [k for k in sd if k.startswith(prefix)]:
            del sd[k]

    try:
        if family == "sdxl":
            te = [_build_clip(sd, family, "text_encoder", SDXL_TE1, path, dtype)]
            done(SDXL_TE1)
            te.append(_build_openclip(sd, family, "text_encoder_2", SDXL_TE2, path, dtype))
            done(SDXL_TE2)
            tok = [clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")]
        elif family == "sd2":
            te, tok = [_build_openclip(sd, family, "text_encoder", SD2_TE, path, dtype)], [clip_tokenizer("!")]
            done(SD2_TE)
        else:
            te, tok = [_build_clip(sd, family, "text_encoder", SD1_TE, path, dtype)], [clip_tokenizer()]
            done(SD1_TE)
        pooled = te[1].config.projection_dim if family == "sdxl" else None
        unet = _build_unet(sd, family, path, dtype, pooled_dim=pooled)
        done(UNET)
        vae = _build_vae(sd, family, path, dtype) if has_vae else None
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: looks like {family} but its layout is not one LoRA Studio can read "
                        f"({first_line(e)})", path=str(path)) from e
    log.info("%s: %s checkpoint, %s (%s), loaded in %.1f s", path.name, family, pred, why,
             time.perf_counter() - start)
    return SingleFileParts(family, pred, unet, vae, te, tok, sched)


def load_vae_file(path: str | Path, *, family: str, dtype=None, scaling_factor: float | None = None):
    """A VAE from one file: LDM layout (bare ``encoder.down.*`` or ``first_stage_model.*``) or diffusers layout."""
    import torch
    dtype = dtype or torch.float32
    ckpt = read_checkpoint(path)
    sd, path = ckpt.tensors, ckpt.path
    try:
        if any(k.startswith(VAE) for k in sd):
            return _build_vae(sd, family, path, dtype, VAE, scaling_factor)
        if "encoder.conv_in.weight" in sd and any(k.startswith("encoder.down.") for k in sd):
            return _build_vae(sd, family, path, dtype, "", scaling_factor)
        if any(k.startswith("encoder.down_blocks.") for k in sd):
            return _build_diffusers_vae(sd, family, path, dtype, scaling_factor)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: not a VAE layout LoRA Studio can read ({first_line(e)})", path=str(path)) from e
    raise UserError(f"{path}: not a VAE file (no encoder/decoder weights; {_describe(list(sd))})", path=str(path))


def _build_diffusers_vae(sd, family, path, dtype, scaling_factor):
    from diffusers import AutoencoderKL
    cfg = {k: v for k, v in base_config(family, "vae").items() if not k.startswith("_")}
    levels = len(_indices(sd, "encoder.down_blocks."))
    cfg.update(in_channels=_shape(sd, "encoder.conv_in.weight")[1],
               out_channels=_shape(sd, "decoder.conv_out.weight")[0],
               latent_channels=_shape(sd, "decoder.conv_in.weight")[1],
               block_out_channels=[_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0]
                                   for i in range(levels)],
               layers_per_block=len(_indices(sd, "encoder.down_blocks.0.resnets.")),
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
               mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)
    if scaling_factor is not None:
        cfg["scaling_factor"] = scaling_factor
    return _assign(_empty(AutoencoderKL, cfg), dict(sd), "VAE", path, dtype)
