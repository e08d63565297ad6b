"""Write a diffusers SD1/SD2/SDXL pipeline as an original-layout (LDM / SGM) single-file .safetensors checkpoint.

The key names are exactly those of the released checkpoints (``v1-5-pruned-emaonly``, ``v2-1_768-ema-pruned``,
``sd_xl_base_1.0``), so A1111, ComfyUI, kohya and diffusers' ``from_single_file`` read the result:

* UNet: ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``).
* VAE: ``first_stage_model.*`` (attention projections as 1x1 convolutions).
* Text encoders: SD1 ``cond_stage_model.transformer.text_model.*`` (Hugging Face CLIP);
  SD2 ``cond_stage_model.model.*`` (OpenCLIP: fused ``attn.in_proj_*``, ``text_projection`` stored as
  hidden x projection); SDXL ``conditioner.embedders.0.transformer.text_model.*`` and
  ``conditioner.embedders.1.model.*`` (OpenCLIP).

SD2 detail: SD2 reads OpenCLIP's penultimate layer, so diffusers' SD2 text encoder leaves out OpenCLIP's last
residual block, while released SD2 checkpoints contain it. Like kohya's converter, the export writes that last
block as a copy of the one before it (it never influences the output) plus a placeholder ``text_projection``
and ``logit_scale``, so the file has the layout every SD2 loader expects; :mod:`trainer.models.single_file` drops the
block again on load.

Markers: a v-prediction model gets ComfyUI's ``v_pred`` key and ``modelspec.prediction_type = v``; a
zero-terminal-SNR schedule gets the ``ztsnr`` key. Both are read back by :mod:`trainer.models.single_file`.

Every function here only reads shapes and values, so it also works on ``meta`` tensors (the tests use that to
check real-size layouts without real weights).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
_CLIP_TO_OPENCLIP = ((".self_attn.out_proj.", ".attn.out_proj."), (".layer_norm1.", ".ln_1."),
                     (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def _unet_prefix_map(config) -> list[tuple[str, str]]:
    """diffusers -> LDM prefixes for a UNet2DConditionModel config (any number of levels / layers per block)."""
    levels = len(config.block_out_channels)
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError("per-block layers_per_block lists have no LDM layout")
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1.")]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(levels):
        for j in range(lpb):
            n = i * (lpb + 1) + j + 1
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.")]
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op."))
        up_has_attn = "CrossAttn" in config.up_block_types[i]
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.")]
        if i < levels - 1:
            # LDM puts the upsampler after the attention when the level has one.
            last = i * (lpb + 1) + lpb
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if up_has_attn else 1}."))
    return pairs


def unet_to_ldm(state_dict: dict, config) -> dict:
    """diffusers UNet2DConditionModel weights -> ``model.diffusion_model.*`` keys."""
    pairs = sorted(_unet_prefix_map(config), key=lambda p: -len(p[0]))
    out = {}
    for key, value in state_dict.items():
        for old, new in pairs:
            if key.startswith(old):
                rest = key[len(old):]
                if ".resnets." in old:
                    rest = _rename(rest, _UNET_RESNET)
                out[UNET_PREFIX + new + rest] = value
                break
        else:
            raise ValueError(f"UNet weight {key!r} has no place in the LDM layout")
    return out


def vae_to_ldm(state_dict: dict, config) -> dict:
    """diffusers AutoencoderKL weights -> ``first_stage_model.*`` keys."""
    levels = len(config.block_out_channels)
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(levels):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  # LDM numbers decoder levels from the lowest resolution up.
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")]
    pairs.sort(key=lambda p: -len(p[0]))
    out = {}
    for key, value in state_dict.items():
        new = key
        for old, repl in pairs:
            if key.startswith(old):
                new = repl + key[len(old):]
                break
        if ".mid.attn_1." in new:
            new = _rename(new, _VAE_ATTN)
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value.reshape(*value.shape, 1, 1)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[VAE_PREFIX + new] = value
    return out


def _text_model_keys(state_dict: dict) -> dict:
    """Keys as ``text_model.*`` (transformers >= 5.6 dropped that level from CLIPTextModel's own state dict)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in state_dict.items()}


def clip_to_ldm(state_dict: dict, prefix: str) -> dict:
    """Hugging Face CLIP text model -> ``<prefix>text_model.*`` (SD1, SDXL text encoder 1), with position_ids."""
    import torch
    sd = _text_model_keys(state_dict)
    out = {prefix + k: v for k, v in sd.items() if not k.startswith("text_projection.")}
    n_pos = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    return out


def clip_to_openclip(state_dict: dict, prefix: str, *, extra_last_block: bool) -> dict:
    """Hugging Face CLIP text model -> OpenCLIP ``<prefix>*`` keys (SD2 text encoder, SDXL text encoder 2)."""
    import torch
    sd = _text_model_keys(state_dict)
    hidden = sd["text_model.embeddings.token_embedding.weight"].shape[1]
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:  # OpenCLIP applies it as x @ P
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:  # SD2 never uses the projection; released files carry one, so write a neutral placeholder
        out[prefix + "text_projection"] = torch.eye(hidden, dtype=sd["text_model.final_layer_norm.weight"].dtype,
                                                    device=sd["text_model.final_layer_norm.weight"].device)
    out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
        for k, v in sd.items():
            if k.startswith(src) and not any(f"self_attn.{p}_proj." in k for p in "qkv"):
                out[_rename("." + k[len(src):], _CLIP_TO_OPENCLIP).replace(".", dst, 1)] = v
    if extra_last_block:
        last = f"{prefix}transformer.resblocks.{layers[-1]}."
        extra = f"{prefix}transformer.resblocks.{layers[-1] + 1}."
        out.update({extra + k[len(last):]: v.clone() for k, v in list(out.items()) if k.startswith(last)})
    return out


def clip_layer_to_ldm(path: str, prefix: str, *, openclip: bool, hidden: int) -> tuple[str, tuple[int, int] | None]:
    """Where the weight of a CLIP text-model layer (``text_model.encoder.layers.N.self_attn.q_proj``,
    ``...mlp.fc1``) is in a single file: its key, and for OpenCLIP's q/k/v the rows of the fused
    ``attn.in_proj_weight`` that are this layer (the layout :func:`clip_to_ldm` / :func:`clip_to_openclip` write)."""
    if not openclip:
        return f"{prefix}{path}.weight", None
    src = "text_model.encoder.layers."
    if not path.startswith(src):
        raise ValueError(f"text-encoder layer {path!r} has no place in the OpenCLIP layout")
    i, _, rest = path[len(src):].partition(".")
    dst = f"{prefix}transformer.resblocks.{int(i)}."
    for n, p in enumerate("qkv"):
        if rest == f"self_attn.{p}_proj":
            return f"{dst}attn.in_proj_weight", (n * hidden, (n + 1) * hidden)
    return _rename("." + rest + ".weight", _CLIP_TO_OPENCLIP).replace(".", dst, 1), None


def modelspec_metadata(family: str, v_pred: bool) -> dict:
    """The ``modelspec.*`` metadata a single file of this family and prediction type gets."""
    if family == "sdxl":
        arch, impl = "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
        impl = "https://github.com/Stability-AI/stablediffusion"
    else:
        arch, impl = "stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion"
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.implementation": impl, "modelspec.prediction_type": "v" if v_pred else "epsilon"}


def pipeline_to_ldm(pipe) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a StableDiffusion(XL)Pipeline in the original single-file layout."""
    import torch
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    sd = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if sdxl:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(clip_to_openclip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.",
                                   extra_last_block=False))
        family = "sdxl"
    elif pipe.text_encoder.config.hidden_act == "gelu" or pipe.unet.config.use_linear_projection:
        # OpenCLIP text encoder (gelu) + linear projections: SD2
        sd.update(clip_to_openclip(pipe.text_encoder.state_dict(), "cond_stage_model.model.", extra_last_block=True))
        family = "sd2"
    else:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
        family = "sd1"
    sched = pipe.scheduler.config
    v_pred = sched.get("prediction_type", "epsilon") == "v_prediction"
    if v_pred:
        sd["v_pred"] = torch.tensor([])  # ComfyUI's marker
    if sched.get("rescale_betas_zero_snr", False):
        sd["ztsnr"] = torch.tensor([])
    return sd, modelspec_metadata(family, v_pred)


def save_single_file(pipe, path: str | Path, *, dtype=None, metadata: dict | None = None) -> Path:
    """Write ``pipe`` as a single-file checkpoint; ``dtype`` (e.g. torch.float16) casts floating weights."""
    from safetensors.torch import save_file
    path = Path(path)
    sd, meta = pipeline_to_ldm(pipe)
    meta["modelspec.title"] = path.stem
    meta.update(metadata or {})
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
          for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    return path
