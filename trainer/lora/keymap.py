"""Module-name arithmetic between diffusers, LDM/SGM and kohya naming for SD UNets and CLIP text encoders."""

from __future__ import annotations

import re
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ UNet layout


@dataclass(frozen=True)
class UnetLayout:
    """What the diffusers <-> LDM index arithmetic needs to know about a UNet (docs/lora-format.md, 'Module names')."""
    layers_per_block: int = 2
    up_has_attention: tuple[bool, ...] = ()

    @classmethod
    def from_unet(cls, unet) -> "UnetLayout":
        cfg = unet.config
        lpb = cfg.layers_per_block
        if not isinstance(lpb, int):
            # every SD family uses one value; a list with equal entries is the same thing
            if len(set(lpb)) != 1:
                raise ValueError(f"per-block layers_per_block {lpb} has no LDM naming")
            lpb = lpb[0]
        return cls(lpb, tuple("CrossAttn" in t for t in cfg.up_block_types))


# Both real SD families and our tiny models use 2; readers without a model assume it.
DEFAULT_LAYOUT = UnetLayout()

_RESNET_TO_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "norm1": "in_layers.0",
                  "norm2": "out_layers.0", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
               "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_TOP_FROM_LDM = {v: k for k, v in _TOP_TO_LDM.items()}

# Linear / conv layers that can carry a LoRA, in diffusers naming (norms are not LoRA targets).
_ATTN_REST = (r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
              r"|ff\.net\.0\.proj|ff\.net\.2))")
_RES_REST = r"(?:conv1|conv2|time_emb_proj|conv_shortcut)"
_DIFFUSERS_UNET_RE = re.compile(
    rf"^(?:(?:down|up)_blocks\.\d+\.(?:resnets\.\d+\.{_RES_REST}|attentions\.\d+\.{_ATTN_REST})"
    rf"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
    rf"|mid_block\.(?:resnets\.\d+\.{_RES_REST}|attentions\.0\.{_ATTN_REST})"
    rf"|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])$")
_LDM_RES_REST = r"(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
_LDM_UNET_RE = re.compile(
    rf"^(?:(?:input_blocks|output_blocks|middle_block)\.\d+(?:\.\d+)?\.(?:{_LDM_RES_REST}|{_ATTN_REST})"
    rf"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv"
    rf"|input_blocks\.0\.0|out\.2|time_embed\.[02]|label_emb\.0\.[02])$")


def is_diffusers_unet_path(path: str) -> bool:
    return bool(_DIFFUSERS_UNET_RE.match(path))


def is_ldm_unet_path(path: str) -> bool:
    return bool(_LDM_UNET_RE.match(path))


def diffusers_to_ldm(path: str, layout: UnetLayout = DEFAULT_LAYOUT) -> str:
    """diffusers UNet module path -> LDM/SGM path (``down_blocks.1.attentions.0.x`` -> ``input_blocks.4.1.x``)."""
    if path in _TOP_TO_LDM:
        return _TOP_TO_LDM[path]
    n = layout.layers_per_block
    m = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * (n + 1) + j}.{_block_tail(kind, rest)}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        idx = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{idx}.{_RESNET_TO_LDM.get(rest, rest) if kind == 'resnets' else rest}"
    m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * (n + 1) + j}.{_block_tail(kind, rest)}"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        i = int(m[1])
        if i >= len(layout.up_has_attention):
            raise ValueError(f"{path}: the layout does not say whether up block {i} has attention")
        # the upsampler sits after the attention module when the block has one
        return f"output_blocks.{i * (n + 1) + n}.{2 if layout.up_has_attention[i] else 1}.conv"
    raise ValueError(f"no LDM name for UNet module {path!r}")


def _block_tail(kind: str, rest: str) -> str:
    if kind == "resnets":
        return f"0.{_RESNET_TO_LDM.get(rest, rest)}"
    return f"1.{rest}"


def ldm_to_diffusers(path: str, layers_per_block: int = 2) -> str | None:
    """LDM/SGM UNet module path -> diffusers path, or None if it is not one."""
    if path in _TOP_FROM_LDM:
        return _TOP_FROM_LDM[path]
    n = layers_per_block
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        k, sub, rest = int(m[1]), int(m[2]), m[3]
        if k == 0:
            return None
        i, j = divmod(k - 1, n + 1)
        if j == n:  # the downsampler slot
            return f"down_blocks.{i}.downsamplers.0.conv" if (sub, rest) == (0, "op") else None
        return _from_block_tail(f"down_blocks.{i}", j, sub, rest)
    m = re.match(r"^middle_block\.(\d+)\.(.+)$", path)
    if m:
        k, rest = int(m[1]), m[2]
        if k == 1:
            return f"mid_block.attentions.0.{rest}" if not _is_resnet_tail(rest) else None
        if k in (0, 2) and rest in _RESNET_FROM_LDM:
            return f"mid_block.resnets.{k // 2}.{_RESNET_FROM_LDM[rest]}"
        return None
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        k, sub, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(k, n + 1)
        if rest == "conv" and sub in (1, 2):
            return f"up_blocks.{i}.upsamplers.0.conv" if j == n else None
        return _from_block_tail(f"up_blocks.{i}", j, sub, rest)
    return None


def _is_resnet_tail(rest: str) -> bool:
    return rest in _RESNET_FROM_LDM


def _from_block_tail(block: str, j: int, sub: int, rest: str) -> str | None:
    if sub == 0 and rest in _RESNET_FROM_LDM:
        return f"{block}.resnets.{j}.{_RESNET_FROM_LDM[rest]}"
    if sub == 1 and not _is_resnet_tail(rest):
        return f"{block}.attentions.{j}.{rest}"
    return None


# ------------------------------------------------------------------------------------- flattened (kohya) names

# Multi-word tokens of module paths; kohya names replace every "." by "_", so these must be re-joined.
_COMPOUNDS = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "input_blocks", "middle_block",
    "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
}, key=lambda s: -s.count("_"))
_COMPOUND_PARTS = [(c, c.split("_")) for c in _COMPOUNDS]


def flatten(path: str) -> str:
    return path.replace(".", "_")


def unflatten(name: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` -> dotted module path."""
    parts = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for comp, cparts in _COMPOUND_PARTS:
            if parts[i:i + len(cparts)] == cparts:
                out.append(comp)
                i += len(cparts)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def parse_unet_name(name: str, layers_per_block: int = 2) -> tuple[str, str] | None:
    """A flattened UNet module name (kohya, after ``lora_unet_``) -> (dialect, diffusers path) or None.

    The diffusers dialect (kohya SD1) is tried first, then the SGM/LDM dialect (kohya SDXL) (docs/lora-format.md, 'What we read').
    """
    path = unflatten(name)
    if is_diffusers_unet_path(path):
        return "diffusers", path
    if is_ldm_unet_path(path):
        d = ldm_to_diffusers(path, layers_per_block)
        if d is not None and is_diffusers_unet_path(d):
            return "sgm", d
    return None


def parse_ldm_path(path: str, layers_per_block: int = 2) -> str | None:
    """A dotted LDM path (ComfyUI ``diffusion_model.<path>``) -> diffusers path or None."""
    if not is_ldm_unet_path(path):
        return None
    d = ldm_to_diffusers(path, layers_per_block)
    return d if d is not None and is_diffusers_unet_path(d) else None


def kohya_unet_name(path: str, family: str, layout: UnetLayout) -> str:
    """``lora_unet_`` name: diffusers dialect for SD1/SD2, SGM dialect for SDXL (docs/lora-format.md, 'Module names')."""
    if family == "sdxl":
        return "lora_unet_" + flatten(diffusers_to_ldm(path, layout))
    return "lora_unet_" + flatten(path)


# ------------------------------------------------------------------------------------------ text encoders

TE_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "mlp.fc1", "mlp.fc2")
_TE_TEMPLATE = "text_model.encoder.layers.{i}.{proj}"
_TE_LIVE_RE = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def te_canonical_path(path: str) -> str | None:
    """Any spelling of a CLIP layer path (transformers 4 or 5) -> the fixed ``text_model.encoder...`` template."""
    m = _TE_LIVE_RE.match(path)
    if not m:
        return None
    return _TE_TEMPLATE.format(i=int(m[1]), proj=m[2])


def te_prefixes(num_text_encoders: int) -> list[str]:
    """kohya picks lora_te1/lora_te2 whenever there is more than one text encoder (docs/lora-format.md, 'Module names')."""
    return ["lora_te"] if num_text_encoders == 1 else [f"lora_te{i + 1}" for i in range(num_text_encoders)]


def kohya_te_name(path: str, index: int, num_text_encoders: int) -> str:
    canon = te_canonical_path(path)
    if canon is None:
        raise ValueError(f"no kohya name for text-encoder module {path!r}")
    return te_prefixes(num_text_encoders)[index] + "_" + flatten(canon)


def parse_te_name(name: str) -> str | None:
    """Flattened TE name (``text_model_encoder_layers_0_self_attn_q_proj`` or ``encoder_layers_...``) -> template."""
    return te_canonical_path(unflatten(name))


#: component name -> index in the pipeline's text-encoder list
TE_COMPONENTS = ("text_encoder", "text_encoder_2")
