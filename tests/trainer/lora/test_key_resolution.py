"""Our exported key names resolve 100% under re-implementations of A1111's and ComfyUI's key rules (docs/lora-format.md, 'Module names')."""

from __future__ import annotations

import re

import pytest
import torch
from tests.fixtures.lora_files import (ldm_module_map, lora_layer_paths, metadata_for, one_torch_thread,  # noqa: F401
                           text_encoders_of, trained_pipeline)
from safetensors import safe_open

from trainer.lora import keymap as keymap
from trainer.lora.io import save_lora

# ------------------------------------------------------------------------- A1111 (extensions-builtin/Lora)

_RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_SUFFIX_CONVERSION = {"attentions": {}, "resnets": {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}}


def a1111_convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """networks.convert_diffusers_name_to_compvis, rule for rule."""
    def match(regex):
        m = re.match(regex, key)
        return [int(x) if re.match(r"\d+", x) else x for x in m.groups()] if m else None

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if (m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


_HF_CLIP = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def _openclip_layers(prefix: str, n: int) -> dict[str, str]:
    out = {prefix + "model_transformer_resblocks": "container"} if not prefix else {}
    for i in range(n):
        base = f"{prefix}model_transformer_resblocks_{i}"
        out.update({f"{base}_attn": "mha", f"{base}_attn_out_proj": "layer", f"{base}_mlp_c_fc": "layer",
                    f"{base}_mlp_c_proj": "layer"})
    return out


def a1111_layer_mapping(family: str, pipe) -> dict[str, str]:
    """network_layer_mapping of the LDM model A1111 would have loaded (layer name -> 'layer'/'mha')."""
    ldm = ldm_module_map(pipe.unet)
    mapping = {"diffusion_model_" + ldm[p].replace(".", "_"): "layer" for p in lora_layer_paths(pipe.unet)}
    tes = text_encoders_of(pipe)
    if family == "sd1":
        n = tes[0].config.num_hidden_layers
        mapping.update({f"transformer_text_model_encoder_layers_{i}_{c}": "layer" for i in range(n) for c in _HF_CLIP})
    elif family == "sd2":  # OpenCLIP-H kept in its original form
        mapping.update(_openclip_layers("", tes[0].config.num_hidden_layers))
    else:  # SDXL: embedder 0 = HF CLIP-L, embedder 1 = OpenCLIP-bigG
        n = tes[0].config.num_hidden_layers
        mapping.update({f"0_transformer_text_model_encoder_layers_{i}_{c}": "layer"
                        for i in range(n) for c in _HF_CLIP})
        mapping.update(_openclip_layers("1_", tes[1].config.num_hidden_layers))
    return mapping


def a1111_load(keys: list[str], mapping: dict[str, str]) -> tuple[dict[str, dict], list[str]]:
    """networks.load_network's matching loop: (matched layer name -> tensor roles, keys failed to match)."""
    is_sd2 = "model_transformer_resblocks" in mapping
    matched: dict[str, dict] = {}
    failed: list[str] = []
    for key_network in keys:
        base, part = key_network.split(".", 1)  # the first dot splits module name and tensor role
        key = a1111_convert_diffusers_name_to_compvis(base, is_sd2)
        kind = mapping.get(key)
        if kind is None:
            m = _RE_X_PROJ.match(key)
            if m:
                kind = mapping.get(m.group(1))
        if kind is None and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            kind = mapping.get(key)
        elif kind is None and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            kind = mapping.get(key)
            if kind is None:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                kind = mapping.get(key)
        if kind is None:
            failed.append(key_network)
            continue
        matched.setdefault(key, {})[part] = kind
    return matched, failed


def a1111_unapplied(matched: dict[str, dict], mapping: dict[str, str]) -> list[str]:
    """Matched modules that A1111 would still not apply (not a LoRA pair, or an MHA without all of q/k/v/out)."""
    bad = [k for k, w in matched.items() if not {"lora_up.weight", "lora_down.weight"} <= set(w)]
    for mha in (k for k, v in mapping.items() if v == "mha"):
        parts = [f"{mha}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        present = [p for p in parts if p in matched]
        if present and len(present) != 4:
            bad += present
    return bad


# ------------------------------------------------------------------------------------ ComfyUI (comfy/lora.py)

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map(family: str, pipe) -> dict[str, str]:
    """model_lora_keys_unet + model_lora_keys_clip for the model ComfyUI would have loaded."""
    key_map: dict[str, str] = {}
    ldm = ldm_module_map(pipe.unet)
    unet_sd = [f"diffusion_model.{ldm[p]}.weight" for p in ldm]
    for k in unet_sd:
        key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
        key_map[f"lora_unet_{key_lora}"] = k
        key_map[k[:-len(".weight")]] = k  # generic format
    for d, l in ldm.items():  # comfy.utils.unet_to_diffusers
        unet_key = f"diffusion_model.{l}.weight"
        key_map[f"lora_unet_{d.replace('.', '_')}"] = unet_key
        key_map[f"lycoris_{d.replace('.', '_')}"] = unet_key
        for p in ("", "unet."):
            k = p + d.replace(".to_", ".processor.to_")
            key_map[k[:-2] if k.endswith(".to_out.0") else k] = unet_key

    tes = text_encoders_of(pipe)
    names = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}[family]
    sdk = set()
    for name, te in zip(names, tes):
        for b in range(te.config.num_hidden_layers):
            for c in LORA_CLIP_MAP:
                sdk.add(f"{name}.transformer.text_model.encoder.layers.{b}.{c}.weight")
    for k in sdk:
        key_map[f"text_encoders.{k[:-len('.weight')]}"] = k
    clip_l_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
    return key_map


def comfy_load_lora(keys: set[str], key_map: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """comfy.lora.load_lora for LoRA tensors: (patched weight -> lora module name, keys not loaded)."""
    patched: dict[str, str] = {}
    loaded: set[str] = set()
    for x, target in key_map.items():
        if f"{x}.alpha" in keys:
            loaded.add(f"{x}.alpha")
        for up, down in ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                         (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                         (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")):
            if x + up in keys:
                loaded |= {x + up, x + down}
                if x + ".lora_mid.weight" in keys:
                    loaded.add(x + ".lora_mid.weight")
                patched[target] = x
                break
    return patched, keys - loaded


# ---------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def exported(request, tmp_path_factory):
    family = request.param
    pipe, handles = trained_pipeline(family)
    path = tmp_path_factory.mktemp("keys") / f"{family}.safetensors"
    saved = save_lora(path, pipe.unet, text_encoders_of(pipe), family=family, metadata=metadata_for(family))
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    from tests.fixtures.tiny_models import build_tiny_pipeline
    # what A1111/ComfyUI would have loaded: the same base, without our adapters
    return family, build_tiny_pipeline(family), handles, saved, keys


def test_ldm_naming_matches_diffusers_single_file_converter():
    """The independent LDM map used below is exactly what diffusers' own converter inverts."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests.fixtures.tiny_models import build_tiny_pipeline
    for family in ("sd1", "sdxl"):
        unet = build_tiny_pipeline(family).unet
        ldm = ldm_module_map(unet)
        sd = unet.state_dict()
        fake, expect = {}, {}
        for i, key in enumerate(sd):
            module, _, param = key.rpartition(".")
            fake[f"model.diffusion_model.{ldm[module]}.{param}"] = torch.tensor([float(i)])
            expect[key] = float(i)
        converted = convert_ldm_unet_checkpoint(fake, dict(unet.config))
        assert {k: float(v) for k, v in converted.items()} == expect, family


def test_keymap_arithmetic_matches_independent_ldm_map():
    from tests.fixtures.tiny_models import build_tiny_pipeline
    for family in ("sd1", "sd2", "sdxl"):
        unet = build_tiny_pipeline(family).unet
        layout = keymap.UnetLayout.from_unet(unet)
        ldm = ldm_module_map(unet)
        for path in lora_layer_paths(unet):
            assert keymap.diffusers_to_ldm(path, layout) == ldm[path], path
            assert keymap.ldm_to_diffusers(ldm[path]) == path, path
            assert keymap.parse_unet_name(ldm[path].replace(".", "_")) == ("sgm", path)
            assert keymap.parse_unet_name(path.replace(".", "_")) == ("diffusers", path)


@pytest.mark.parametrize("name,expected", [
    # docs/lora-format.md, 'Module names'
    ("down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
     "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),
    ("up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
     "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks_8_1_transformer_blocks_9_attn2_to_k", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"),
    ("middle_block_1_transformer_blocks_0_attn1_to_out_0",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("output_blocks_2_1_transformer_blocks_3_ff_net_2", "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2"),
    ("output_blocks_5_1_proj_out", "up_blocks.1.attentions.2.proj_out"),
    ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks_4_0_emb_layers_1", "down_blocks.1.resnets.0.time_emb_proj"),
    ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks_2_1_conv", "up_blocks.0.upsamplers.0.conv"),  # SD1: up block 0 has no attention
])
def test_spec_table_names(name, expected):
    assert keymap.parse_unet_name(name)[1] == expected


def test_sdxl_upsampler_uses_slot_after_attention():
    layout = keymap.UnetLayout(2, (True, True, False))
    assert keymap.diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", layout) == "output_blocks.2.2.conv"
    sd1 = keymap.UnetLayout(2, (False, True, True, True))
    assert keymap.diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", sd1) == "output_blocks.2.1.conv"


def test_exported_names_follow_policy(exported):
    family, pipe, handles, saved, keys = exported
    modules = {k.split(".", 1)[0] for k in keys}
    assert len(keys) == 3 * len(modules) == saved.num_tensors
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in keys)
    unet_names = [m for m in modules if m.startswith("lora_unet_")]
    te_names = [m for m in modules if not m.startswith("lora_unet_")]
    if family == "sdxl":  # SGM dialect only, never mixed
        assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", m) for m in unet_names)
        assert {m.split("_text_model")[0] for m in te_names} == {"lora_te1", "lora_te2"}
    else:
        assert all(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", m) for m in unet_names)
        assert {m.split("_text_model")[0] for m in te_names} == {"lora_te"}
    # docs/lora-format.md, 'Interop hazards': TE names come from the fixed template under transformers 5 too
    assert all("_text_model_encoder_layers_" in m for m in te_names)
    assert len(modules) == len(handles.modules)


def test_a1111_resolves_every_key(exported):
    family, pipe, _, _, keys = exported
    mapping = a1111_layer_mapping(family, pipe)
    matched, failed = a1111_load(keys, mapping)
    assert failed == []
    assert a1111_unapplied(matched, mapping) == []
    assert len(matched) == len(keys) // 3


def test_comfyui_resolves_every_key(exported):
    family, pipe, _, _, keys = exported
    patched, not_loaded = comfy_load_lora(set(keys), comfy_key_map(family, pipe))
    assert not_loaded == set()
    assert len(patched) == len(keys) // 3  # every module patches its own weight


def test_a1111_would_drop_incomplete_te2_attention():
    """The te2 rule our exporter avoids by always training q, k, v and out together (docs/lora-format.md, 'Which modules we train')."""
    from tests.fixtures.tiny_models import build_tiny_pipeline
    pipe = build_tiny_pipeline("sdxl")
    mapping = a1111_layer_mapping("sdxl", pipe)
    keys = [f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj.{r}"
            for p in ("q", "k", "v") for r in ("lora_down.weight", "lora_up.weight", "alpha")]
    matched, failed = a1111_load(keys, mapping)
    assert failed == [] and len(a1111_unapplied(matched, mapping)) == 3
    # and why SDXL files must use SGM names (docs/lora-format.md, 'Interop hazards'): the diffusers-named upsampler is
    # dropped
    _, failed = a1111_load(["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"], mapping)
    assert failed


def test_te_name_parsing_accepts_both_transformers_spellings():
    assert keymap.parse_te_name("text_model_encoder_layers_11_mlp_fc2") == "text_model.encoder.layers.11.mlp.fc2"
    assert keymap.parse_te_name("encoder_layers_3_self_attn_out_proj") == \
        "text_model.encoder.layers.3.self_attn.out_proj"
    assert keymap.kohya_te_name("encoder.layers.3.self_attn.q_proj", 0, 1) == \
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    assert keymap.kohya_te_name("text_model.encoder.layers.3.mlp.fc1", 1, 2) == \
        "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    assert keymap.parse_te_name("text_model_embeddings_token_embedding") is None
