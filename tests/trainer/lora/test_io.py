"""LoRA files: export, reload by us and by diffusers, hashes, metadata, and third-party layouts on read."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import pytest
import torch
# noqa: F401
from tests.fixtures.lora_files import (captured_logs, load_complaints, ldm_module_map, lora_layer_paths, metadata_for,
                           one_torch_thread, te_out, text_encoders_of, trained_pipeline, unet_out)
from safetensors import safe_open
from safetensors.torch import save_file

import trainer.lora.io as lora_io
from trainer.errors import UserError
from trainer.lora.keymap import te_canonical_path
from trainer.lora.io import (LoraModule, lora_addnet_hash, match_modules, read_lora, save_diffusers_lora,
                             save_lora)
from tests.fixtures.tiny_models import build_tiny_pipeline

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trained(request, tmp_path_factory):
    """(family, pipeline with a trained-looking adapter, handles, fp32 kohya file)."""
    family = request.param
    pipe, handles = trained_pipeline(family)
    path = tmp_path_factory.mktemp(f"lora_{family}") / "ours.safetensors"
    saved = save_lora(path, pipe.unet, text_encoders_of(pipe), family=family, metadata=metadata_for(family),
                      save_precision="fp32")
    return family, pipe, handles, saved


def _key(component: str, live_path: str) -> str:
    return f"{component}:{live_path if component == 'unet' else te_canonical_path(live_path)}"


def _loaded_layers(model, adapter: str) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


# ------------------------------------------------------------------------------------------------ 1. ΔW


def test_export_reads_back_with_identical_delta(trained):
    family, pipe, handles, saved = trained
    lf = read_lora(saved.path)
    assert lf.family == ("sdxl" if family == "sdxl" else "sd1")
    assert lf.formats == {"kohya": len(handles.modules)} and saved.num_modules == len(handles.modules)
    assert set(lf.modules) == {_key(c, p) for c, p, _ in handles.modules}
    assert {k.split(":")[0] for k in lf.modules} == {"unet", *("text_encoder", "text_encoder_2")[:len(
        text_encoders_of(pipe))]}
    for comp, path, layer in handles.modules:
        mod = lf.modules[_key(comp, path)]
        base = layer.get_base_layer().weight
        expected = layer.get_delta_weight("default")
        assert mod.scale == pytest.approx(float(layer.scaling["default"]), rel=1e-7)
        assert torch.allclose(mod.delta(shape=base.shape), expected, rtol=1e-5, atol=1e-7), path


def test_tensor_layout_and_precision(trained, tmp_path):
    family, pipe, handles, _ = trained
    path = save_lora(tmp_path / "half.safetensors", pipe.unet, text_encoders_of(pipe), family=family,
                     metadata=metadata_for(family)).path  # fp16 is the default
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(".alpha"):
                assert t.dim() == 0 and t.dtype == torch.float32
            else:
                assert t.dtype == torch.float16
        conv = [k for k in f.keys() if k.endswith("lora_down.weight") and f.get_tensor(k).dim() == 4]
        assert conv, "LoCon and SD1 proj_in/proj_out keep 4-D conv shapes"
        for k in conv:
            assert f.get_tensor(k.replace("lora_down", "lora_up")).shape[2:] == (1, 1)
    bf16 = save_lora(tmp_path / "bf16.safetensors", pipe.unet, text_encoders_of(pipe), family=family,
                     metadata=metadata_for(family), save_precision="bf16").path
    lf = read_lora(bf16)
    assert all(m.down.dtype == torch.float32 for m in lf.modules.values())
    assert not list(tmp_path.glob(".*.tmp")), "temporary files are renamed away"


# -------------------------------------------------------------------------- 2 & 5. diffusers and our merge


def test_diffusers_loads_export_exactly(trained):
    family, pipe, handles, saved = trained
    fresh = build_tiny_pipeline(family)
    base_out = unet_out(fresh.unet)
    with captured_logs() as logs:
        fresh.load_lora_weights(str(saved.path), adapter_name="ours")
    assert load_complaints(logs) == []
    # every module became a PEFT layer with scaling alpha/r, on the right component
    ours = {(c, p): layer for c, p, layer in handles.modules}
    loaded = {("unet", n): m for n, m in _loaded_layers(fresh.unet, "ours").items()}
    for i, te in enumerate(text_encoders_of(fresh)):
        loaded.update({(("text_encoder", "text_encoder_2")[i], n): m for n, m in _loaded_layers(te, "ours").items()})
    assert set(loaded) == set(ours)
    for k, layer in loaded.items():
        assert layer.scaling["ours"] == pytest.approx(ours[k].scaling["default"], rel=1e-6), k
    assert (unet_out(fresh.unet) - unet_out(pipe.unet)).abs().max() < 1e-4
    for te_a, te_b in zip(text_encoders_of(fresh), text_encoders_of(pipe)):
        assert (te_out(te_a) - te_out(te_b)).abs().max() < 1e-4
    # strength 0 is the base model (docs/lora-format.md, 'Several LoRAs at once')
    fresh.set_adapters(["ours"], adapter_weights=[0.0])
    assert (unet_out(fresh.unet) - base_out).abs().max() < 1e-6


def test_merge_through_reader_matches_peft_model(trained):
    """read_lora + match_modules + delta: the path the generation code merges with."""
    family, pipe, _, saved = trained
    fresh = build_tiny_pipeline(family)
    base_out = unet_out(fresh.unet)
    lf = read_lora(saved.path)
    targets = match_modules(lf, fresh.unet, text_encoders_of(fresh), family=family)
    assert len(targets) == len(lf.modules)
    originals = {k: m.weight.detach().clone() for k, m in targets.items()}
    with torch.no_grad():
        for k, m in targets.items():
            m.weight += lf.modules[k].delta(0.0, shape=m.weight.shape)
    assert torch.equal(unet_out(fresh.unet), base_out)
    with torch.no_grad():
        for k, m in targets.items():
            m.weight.copy_(originals[k] + lf.modules[k].delta(1.0, shape=m.weight.shape))
    assert (unet_out(fresh.unet) - unet_out(pipe.unet)).abs().max() < 1e-4


def test_attention_only_fp16_without_text_encoder_loads_in_diffusers(tmp_path):
    pipe, handles = trained_pipeline("sd1", train_te=False, unet_targets="attention", conv_rank=0, rank=8,
                                     alpha=1.0)
    saved = save_lora(tmp_path / "a.safetensors", pipe.unet, text_encoders_of(pipe), family="sd1",
                      metadata=metadata_for("sd1"))
    with safe_open(str(saved.path), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lora_te")]
    fresh = build_tiny_pipeline("sd1")
    with captured_logs() as logs:
        fresh.load_lora_weights(str(saved.path))
    assert load_complaints(logs) == []
    assert len(_loaded_layers(fresh.unet, "default_0")) == len(handles.modules)
    assert (unet_out(fresh.unet) - unet_out(pipe.unet)).abs().max() < 1e-3  # fp16 storage


def test_diffusers_second_artifact(trained, tmp_path):
    family, pipe, handles, _ = trained
    path = save_diffusers_lora(tmp_path, pipe.unet, text_encoders_of(pipe), family=family, save_precision="fp32")
    assert path.name == "pytorch_lora_weights.safetensors" and not list(tmp_path.glob(".*"))
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        md = f.metadata()
    assert "lora_adapter_metadata" in md
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in keys)
    fresh = build_tiny_pipeline(family)
    with captured_logs() as logs:
        fresh.load_lora_weights(str(path), adapter_name="d")
    assert load_complaints(logs) == []
    assert (unet_out(fresh.unet) - unet_out(pipe.unet)).abs().max() < 1e-4
    for te_a, te_b in zip(text_encoders_of(fresh), text_encoders_of(pipe)):
        assert (te_out(te_a) - te_out(te_b)).abs().max() < 1e-4
    lf = read_lora(path)  # our reader takes alpha (incl. the conv alpha_pattern) from lora_adapter_metadata
    assert lf.formats == {"peft": len(handles.modules)}
    for comp, p, layer in handles.modules:
        assert lf.modules[_key(comp, p)].scale == pytest.approx(float(layer.scaling["default"]))


# ------------------------------------------------------------------------------------------------ 4. hash


def test_hash_is_tensor_bytes_and_ignores_metadata(trained, tmp_path):
    family, pipe, _, saved = trained
    blob = saved.path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    digest = hashlib.sha256(blob[8 + n:]).hexdigest()
    with safe_open(str(saved.path), "pt") as f:
        md = f.metadata()
    assert md["sshs_model_hash"] == digest == saved.sha256 == lora_addnet_hash(saved.path) != EMPTY_SHA256
    assert md["modelspec.hash_sha256"] == "0x" + digest
    assert read_lora(saved.path).addnet_hash == digest
    other = save_lora(tmp_path / "renamed.safetensors", pipe.unet, text_encoders_of(pipe), family=family,
                      metadata=metadata_for(family, output__name="renamed", output__author="someone"),
                      save_precision="fp32")
    assert other.sha256 == digest
    assert hashlib.sha256(other.path.read_bytes()).hexdigest() != hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------------------------- self-check


def test_self_check_failure_deletes_file(tmp_path, monkeypatch):
    pipe, _ = trained_pipeline("sd1", train_te=False, unet_targets="attention", conv_rank=0)
    import trainer.lora.writer as lora_writer
    monkeypatch.setattr(lora_writer, "_file_alpha", lambda layer, name: 123.0)
    target = tmp_path / "bad.safetensors"
    with pytest.raises(RuntimeError, match="alpha/r"):
        save_lora(target, pipe.unet, [pipe.text_encoder], family="sd1", metadata=metadata_for("sd1"))
    assert not target.exists() and not list(tmp_path.iterdir())


def test_save_without_adapter_refuses(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(RuntimeError, match="nothing to save"):
        save_lora(tmp_path / "x.safetensors", pipe.unet, [pipe.text_encoder], family="sd1", metadata={})
    with pytest.raises(TypeError):
        save_lora(tmp_path / "x.safetensors", pipe.unet, [pipe.text_encoder], family="sd1", metadata={"a": 1})


# ------------------------------------------------------------------------------------------------ metadata

REQUIRED_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_v2", "ss_base_model_version",
    "ss_output_name", "ss_training_started_at", "ss_training_finished_at", "ss_session_id", "ss_epoch", "ss_steps",
    "ss_sd_model_name", "ss_clip_skip", "ss_resolution", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
    "ss_optimizer", "ss_lr_scheduler", "ss_seed", "ss_mixed_precision", "ss_num_train_images", "ss_num_epochs",
    "ss_noise_offset", "ss_min_snr_gamma", "ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.date", "modelspec.prediction_type", "modelspec.encoder_layer",
    "modelspec.implementation_version", "lorastudio.config", "lorastudio.version")


def test_metadata_keys_and_shapes():
    md = metadata_for("sd1", lora__conv_rank=8, lora__conv_alpha=4.0, output__author="me",
                      output__trigger_phrase="zxq style")
    assert all(isinstance(v, str) for v in md.values())
    assert set(REQUIRED_KEYS) <= set(md)
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "16"
    assert md["ss_network_alpha"] == "16.0" and md["ss_v2"] == "False" and md["ss_base_model_version"] == "sd_v1"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4.0"}
    assert md["ss_resolution"] == "(512, 512)" and md["modelspec.resolution"] == "512x512"
    assert json.loads(md["ss_tag_frequency"]) == {"10_zxq": {"zxq style": 20, "circle": 7}}
    assert json.loads(md["ss_dataset_dirs"]) == {"10_zxq": {"n_repeats": 10, "img_count": 2}}
    assert json.loads(md["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [512, 512], "count": 20}},
                                               "mean_img_ar_error": 0.0}
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.implementation"] == "diffusers" and md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.author"] == "me" and md["modelspec.trigger_phrase"] == "zxq style"
    assert "modelspec.description" not in md
    assert md["lorastudio.config"] == "preset_version = 1\n"
    assert len(md["modelspec.date"]) == 19 and md["modelspec.date"][10] == "T"
    assert not any(k.startswith(("ss_", "modelspec.")) and k.split(".")[0] == "lorastudio" for k in md)

    xl = metadata_for("sdxl", output__dataset_metadata=False)
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert "ss_tag_frequency" not in xl and "ss_dataset_dirs" not in xl and "ss_bucket_info" in xl
    assert json.loads(xl["ss_network_args"]) == {}


def test_metadata_sd2_v_prediction():
    from trainer.config import Config
    md = lora_io.build_metadata(Config(), lora_io.RunStats(
        family="sd2", prediction_type="v_prediction", base_model_name="m", step=1, epoch=0, started_at=1.0,
        finished_at=0.0, session_id=1, num_train_images=1))
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and md["modelspec.prediction_type"] == "v"
    assert md["ss_training_finished_at"] == "None"  # intermediate save


# ---------------------------------------------------------------------------------- 6. third-party layouts


def _rand_module(layer, rank: int, g: torch.Generator):
    w = layer.weight
    if w.dim() == 4:
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
    else:
        down = torch.randn(rank, w.shape[1], generator=g)
        up = torch.randn(w.shape[0], rank, generator=g)
    return down * 0.1, up * 0.1


def _expected_delta(layer, down, up, scale):
    return LoraModule(down, up, scale * down.shape[0]).delta(shape=layer.weight.shape)


def _assert_file_matches(path, pipe, family, expected: dict, fmt: str | None = None):
    """expected: '<component>:<canonical path>' -> (down, up, scale)."""
    lf = read_lora(path)
    if fmt:
        assert set(lf.formats) == {fmt}
    assert set(lf.modules) == set(expected)
    targets = match_modules(lf, pipe.unet, text_encoders_of(pipe), family=family)
    for key, (down, up, scale) in expected.items():
        layer = targets[key]
        assert lf.modules[key].scale == pytest.approx(scale, rel=1e-6), key
        assert torch.allclose(lf.modules[key].delta(shape=layer.weight.shape),
                              _expected_delta(layer, down, up, scale), atol=1e-6), key
    return lf


def _te_layers(pipe):
    out = []
    for i, te in enumerate(text_encoders_of(pipe)):
        for n, m in te.named_modules():
            canon = te_canonical_path(n)
            if canon is not None:
                out.append((("text_encoder", "text_encoder_2")[i], canon, m))
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("with_alpha", [True, False])
def test_kohya_layout_built_from_spec(family, with_alpha, tmp_path):
    """kohya names written by hand from the spec: SD1 diffusers dialect, SDXL SGM dialect, lora_te/lora_te1/2."""
    pipe = build_tiny_pipeline(family)
    g = torch.Generator().manual_seed(3)
    ldm = ldm_module_map(pipe.unet)
    tensors, expected = {}, {}
    wanted = ("attn1.to_q", "attn2.to_k", "ff.net.0.proj", "proj_in", "conv1", "time_emb_proj", "op", "conv")
    for path in lora_layer_paths(pipe.unet):
        if not (path.endswith(wanted) or ldm[path].endswith(".op")):
            continue
        name = "lora_unet_" + (ldm[path] if family == "sdxl" else path).replace(".", "_")
        rank = 2 if path.endswith("conv1") else 4
        down, up = _rand_module(pipe.unet.get_submodule(path), rank, g)
        alpha = 1.0 if rank == 2 else 3.0
        tensors.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half()})
        if with_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        expected[f"unet:{path}"] = (down.half().float(), up.half().float(), alpha / rank if with_alpha else 1.0)
    for comp, canon, layer in _te_layers(pipe):
        prefix = {"sd1": {"text_encoder": "lora_te"},
                  "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}[family][comp]
        name = prefix + "_" + canon.replace(".", "_")
        down, up = _rand_module(layer, 4, g)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
        if with_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(4, dtype=torch.int64)  # diffusers' converter writes int64
        expected[f"{comp}:{canon}"] = (down, up, 1.0)
    save_file(tensors, tmp_path / "kohya.safetensors", metadata={"ss_network_module": "networks.lora"})
    lf = _assert_file_matches(tmp_path / "kohya.safetensors", pipe, family, expected, "kohya")
    assert lf.family == ("sdxl" if family == "sdxl" else "sd1")


def test_diffusers_save_lora_weights_files(tmp_path):
    """Files written by diffusers' own save_lora_weights, with and without lora_adapter_metadata (SDXL, both TEs)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_pipeline("sdxl")
    torch.manual_seed(0)
    ucfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                      rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 8})
    tcfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    pipe.unet.add_adapter(ucfg)
    for te in text_encoders_of(pipe):
        inject_adapter_in_model(tcfg, te)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in [pipe.unet] + text_encoders_of(pipe):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layers = {("unet", n): m for n, m in _loaded_layers(pipe.unet, "default").items()}
    for i, te in enumerate(text_encoders_of(pipe)):
        layers.update({(("text_encoder", "text_encoder_2")[i], n): m for n, m in _loaded_layers(te, "default").items()})
    parts = dict(unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                 text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                 text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "plain", **parts)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "meta", **parts, unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict(), text_encoder_2_lora_adapter_metadata=tcfg.to_dict())
    base = build_tiny_pipeline("sdxl")

    def expect(with_meta: bool):
        out = {}
        for (comp, n), layer in layers.items():
            down, up = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            # no metadata: alpha = r (docs/lora-format.md, 'The diffusers/PEFT file')
            scale = float(layer.scaling["default"]) if with_meta else 1.0
            out[_key(comp, n)] = (down, up, scale)
        return out

    _assert_file_matches(tmp_path / "plain" / "pytorch_lora_weights.safetensors", base, "sdxl", expect(False), "peft")
    lf = _assert_file_matches(tmp_path / "meta" / "pytorch_lora_weights.safetensors", base, "sdxl", expect(True),
                              "peft")
    te_mod = lf.modules["text_encoder_2:text_model.encoder.layers.0.self_attn.q_proj"]
    assert te_mod.scale == pytest.approx(8 / math.sqrt(4))  # rsLoRA carried via alpha * sqrt(r)


def test_old_diffusers_spellings(tmp_path):
    """Example-script keys (lora.down / lora_linear_layer) and the 2023 attention-processor keys."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_pipeline("sd1")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            pipe.text_encoder)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
    assert any(".lora.down.weight" in k for k in unet_sd) and any("lora_linear_layer" in k for k in te_sd)
    example = {f"unet.{k}": v for k, v in unet_sd.items()}
    example.update({f"text_encoder.{k}": v for k, v in te_sd.items()})
    save_file(example, tmp_path / "example.safetensors")

    # 2023 processor spelling, synthesised from the same tensors
    old = {}
    for k, v in unet_sd.items():
        mod, _, role = k.partition(".lora.")
        parent, _, proj = mod.removesuffix(".0").rpartition(".")
        old[f"unet.{parent}.processor.{proj}_lora.{role}"] = v
    for k, v in te_sd.items():
        mod, _, role = k.partition(".lora_linear_layer.")
        parent, _, proj = mod.rpartition(".")
        proj = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[proj]
        old[f"text_encoder.text_model.{parent}.{proj}_lora.{role}"] = v
    save_file(old, tmp_path / "processor.safetensors")

    expected = {}
    for n, layer in _loaded_layers(pipe.unet, "default").items():
        expected[f"unet:{n}"] = (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), 1.0)
    for n, layer in _loaded_layers(pipe.text_encoder, "default").items():
        expected[_key("text_encoder", n)] = (layer.lora_A["default"].weight.detach(),
                                             layer.lora_B["default"].weight.detach(), 1.0)
    base = build_tiny_pipeline("sd1")
    _assert_file_matches(tmp_path / "example.safetensors", base, "sd1", expected, "diffusers_old")
    _assert_file_matches(tmp_path / "processor.safetensors", base, "sd1", expected, "diffusers_old")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_comfyui_generic_names(family, tmp_path):
    pipe = build_tiny_pipeline(family)
    ldm = ldm_module_map(pipe.unet)
    g = torch.Generator().manual_seed(7)
    tensors, expected = {}, {}
    for path in lora_layer_paths(pipe.unet):
        if path.endswith(("attn2.to_v", "proj_out", "conv2")):
            down, up = _rand_module(pipe.unet.get_submodule(path), 3, g)
            stem = f"diffusion_model.{ldm[path]}"
            tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                            f"{stem}.alpha": torch.tensor(1.5)})
            expected[f"unet:{path}"] = (down, up, 0.5)
    clip = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    for comp, canon, layer in _te_layers(pipe):
        down, up = _rand_module(layer, 2, g)
        stem = f"text_encoders.{clip[comp]}.transformer.{canon}"
        tensors.update({f"{stem}.lora_B.weight": up, f"{stem}.lora_A.weight": down})
        expected[f"{comp}:{canon}"] = (down, up, 1.0)
    save_file(tensors, tmp_path / "comfy.safetensors")
    _assert_file_matches(tmp_path / "comfy.safetensors", pipe, family, expected, "comfyui")


def test_lycoris_locon_with_tucker_core(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    conv = pipe.unet.get_submodule("down_blocks.1.resnets.0.conv1")  # 3x3, 32 -> 64 channels
    g = torch.Generator().manual_seed(8)
    r = 3
    down = torch.randn(r, conv.in_channels, 1, 1, generator=g)
    mid = torch.randn(r, r, 3, 3, generator=g)
    up = torch.randn(conv.out_channels, r, 1, 1, generator=g)
    name = "lycoris_down_blocks_1_resnets_0_conv1"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(1.5)}, tmp_path / "tucker.safetensors")
    lf = read_lora(tmp_path / "tucker.safetensors")
    mod = lf.modules["unet:down_blocks.1.resnets.0.conv1"]
    assert mod.mid is not None and mod.scale == pytest.approx(0.5)
    assert match_modules(lf, pipe.unet, [pipe.text_encoder], family="sd1")["unet:down_blocks.1.resnets.0.conv1"] is conv
    # ΔW applied as one conv equals LyCORIS' three-conv forward (1x1 down, 3x3 core, 1x1 up)
    x = torch.randn(1, conv.in_channels, 9, 9, generator=g)
    F = torch.nn.functional
    sequential = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 0.5
    assert torch.allclose(F.conv2d(x, mod.delta(), padding=1), sequential, atol=1e-4)


def test_refuses_half_loha_bad_dora_oft_and_unknown_keys(tmp_path):
    good = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    loha = dict(good, **{f"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_{x}": torch.zeros(2, 2) for x in "ab"})
    save_file(loha, tmp_path / "loha.safetensors")
    with pytest.raises(UserError, match=r"module unet:down_blocks\.0\.resnets\.0\.conv1: hada_w2_a, hada_w2_b missing"):
        read_lora(tmp_path / "loha.safetensors")
    lf = read_lora(tmp_path / "loha.safetensors", allow_partial=True)
    assert list(lf.modules) == ["unet:down_blocks.0.attentions.0.proj_in"] and len(lf.skipped) == 2

    save_file(dict(good, **{"lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": torch.ones(4, 8, 8)}),
              tmp_path / "oft.safetensors")
    with pytest.raises(UserError, match="OFT/BOFT adapters cannot be applied"):
        read_lora(tmp_path / "oft.safetensors")

    unknown = dict(good, **{"bundle_emb.zxq.string_to_param.*": torch.zeros(1, 32),
                            "lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4)})
    save_file(unknown, tmp_path / "unknown.safetensors")
    with pytest.raises(UserError) as e:
        read_lora(tmp_path / "unknown.safetensors")
    msg = str(e.value)
    assert "unknown.safetensors" in msg and "bundle_emb.zxq" in msg and "lora_unet_not_a_layer" in msg
    assert len(read_lora(tmp_path / "unknown.safetensors", allow_partial=True).skipped) == 2

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1)},
              tmp_path / "half.safetensors")
    with pytest.raises(UserError, match="partner"):
        read_lora(tmp_path / "half.safetensors")

    mixed = dict(good, **{"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32, 1, 1)})
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(UserError, match="two spellings"):
        read_lora(tmp_path / "mixed.safetensors")


def test_wrong_family_and_wrong_shapes_refused(tmp_path):
    sd1_pipe, sdxl_pipe, sd2_pipe = (build_tiny_pipeline(f) for f in ("sd1", "sdxl", "sd2"))
    files = {}
    for fam, pipe in (("sd1", sd1_pipe), ("sdxl", sdxl_pipe), ("sd2", sd2_pipe)):
        p, _ = trained_pipeline(fam, train_te=True, unet_targets="attention", conv_rank=0)
        files[fam] = save_lora(tmp_path / f"{fam}.safetensors", p.unet, text_encoders_of(p), family=fam,
                               metadata=metadata_for(fam)).path
    with pytest.raises(UserError, match="SDXL.*SD1"):
        match_modules(read_lora(files["sdxl"]), sd1_pipe.unet, [sd1_pipe.text_encoder], family="sd1")
    with pytest.raises(UserError, match="for SD1.x/SD2.x models.*SDXL"):
        match_modules(read_lora(files["sd1"]), sdxl_pipe.unet, text_encoders_of(sdxl_pipe), family="sdxl")
    # SD2 names are SD1 names; the layer shapes tell them apart
    with pytest.raises(UserError, match="different base model"):
        match_modules(read_lora(files["sd2"]), sd1_pipe.unet, [sd1_pipe.text_encoder], family="sd1")
    assert match_modules(read_lora(files["sd2"]), sd1_pipe.unet, [sd1_pipe.text_encoder], family="sd1",
                         allow_partial=True) is not None
    # a LoRA with text-encoder modules on a pipeline given no text encoder: unmatched unless allowed
    with pytest.raises(UserError, match="no matching layer"):
        match_modules(read_lora(files["sd1"]), sd1_pipe.unet, [], family="sd1")
    partial = match_modules(read_lora(files["sd1"]), sd1_pipe.unet, [], family="sd1", allow_partial=True)
    assert partial and all(k.startswith("unet:") for k in partial)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="not a file"):
        read_lora(tmp_path)
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="old.ckpt.*only .safetensors"):
        read_lora(tmp_path / "old.ckpt")
    (tmp_path / "text.safetensors").write_text("hello, not tensors")
    with pytest.raises(UserError, match="text.safetensors.*not a valid"):
        read_lora(tmp_path / "text.safetensors")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, tmp_path / "ok.safetensors")
    blob = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-40])
    with pytest.raises(UserError, match="cut.safetensors"):
        read_lora(tmp_path / "cut.safetensors")
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(UserError, match="no tensors"):
        read_lora(tmp_path / "empty.safetensors")
    with pytest.raises(UserError, match="not found"):
        lora_addnet_hash(tmp_path / "missing.safetensors")


def test_peft_prefixes_bare_and_base_model(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    g = torch.Generator().manual_seed(9)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = _rand_module(pipe.unet.get_submodule(path), 2, g)
    tdown, tup = _rand_module(pipe.text_encoder.get_submodule("encoder.layers.1.mlp.fc1"), 2, g)
    expected = {f"unet:{path}": (down, up, 1.0), "text_encoder:text_model.encoder.layers.1.mlp.fc1": (tdown, tup, 1.0)}
    save_file({f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up,
               "text_model.encoder.layers.1.mlp.fc1.lora_A.weight": tdown,
               "text_model.encoder.layers.1.mlp.fc1.lora_B.weight": tup}, tmp_path / "bare.safetensors")
    _assert_file_matches(tmp_path / "bare.safetensors", pipe, "sd1", expected, "peft")
    save_file({f"base_model.model.{path}.lora_A.weight": down, f"base_model.model.{path}.lora_B.weight": up},
              tmp_path / "peft_model.safetensors")
    _assert_file_matches(tmp_path / "peft_model.safetensors", pipe, "sd1", {f"unet:{path}": (down, up, 1.0)}, "peft")


def test_metadata_family_disagreement_warns(tmp_path, caplog):
    pipe = build_tiny_pipeline("sd1")
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_" + path.replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)},
              tmp_path / "claims_xl.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    lf = read_lora(tmp_path / "claims_xl.safetensors")
    assert lf.family == "sd1"  # the layer structure wins over the label
    with caplog.at_level("WARNING", logger="trainer.lora.io"):
        assert len(match_modules(lf, pipe.unet, [pipe.text_encoder], family="sd1")) == 1
    assert "metadata says it is for SDXL" in caplog.text
    # with nothing structural to go on, the label decides and the wrong base is refused
    name = "lora_unet_" + "up_blocks.1.attentions.0.proj_in".replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 64, 1, 1),
               f"{name}.lora_up.weight": torch.zeros(64, 2, 1, 1)}, tmp_path / "xl_only_label.safetensors",
              metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    with pytest.raises(UserError, match="SDXL"):
        match_modules(read_lora(tmp_path / "xl_only_label.safetensors"), pipe.unet, [pipe.text_encoder], family="sd1")


def test_linear_shaped_factors_on_1x1_conv(tmp_path):
    """SD2/SDXL-style 2-D proj_in factors fit SD1's 1x1-conv proj_in (kohya and diffusers accept this too)."""
    pipe = build_tiny_pipeline("sd1")
    path = "down_blocks.0.attentions.0.proj_in"
    conv = pipe.unet.get_submodule(path)
    g = torch.Generator().manual_seed(10)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    name = "lora_unet_" + path.replace(".", "_")
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, tmp_path / "flat.safetensors")
    lf = read_lora(tmp_path / "flat.safetensors")
    assert match_modules(lf, pipe.unet, [pipe.text_encoder], family="sd1")[f"unet:{path}"] is conv
    assert torch.allclose(lf.modules[f"unet:{path}"].delta(shape=conv.weight.shape)[:, :, 0, 0], up @ down)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="junk.safetensors"):
        lora_addnet_hash(tmp_path / "junk.safetensors")


def test_rslora_alpha_is_encoded_and_dora_refused(tmp_path):
    """rsLoRA is written as alpha*sqrt(r) so every reader's alpha/r is the trained scale (docs/lora-format.md, 'Alpha and scale'); DoRA cannot go in."""
    from peft import LoraConfig

    pipe = build_tiny_pipeline("sd1")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["to_q", "to_v"]))
    saved = save_lora(tmp_path / "rs.safetensors", pipe.unet, [pipe.text_encoder], family="sd1", metadata={})
    with safe_open(str(saved.path), "pt") as f:
        alphas = [float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")]
    assert alphas and alphas == pytest.approx([3 * math.sqrt(4)] * len(alphas))
    scales = [m.scale for m in read_lora(saved.path).modules.values()]
    assert scales == pytest.approx([3 / math.sqrt(4)] * len(scales))

    dora = build_tiny_pipeline("sd1")
    dora.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["to_q"]))
    with pytest.raises(RuntimeError, match="DoRA"):
        save_lora(tmp_path / "dora.safetensors", dora.unet, [dora.text_encoder], family="sd1", metadata={})
    assert not (tmp_path / "dora.safetensors").exists()
