"""LoHa, LoKr and DoRA files in the generator (docs/lora-format.md, 'DoRA and LyCORIS'): mixed with LoRAs at any
weights, fused and unfused, TE/UNet split; fused equals unfused, weight 0 is the base image bit for bit, clearing
restores the base weights exactly; a misfit or broken file is refused with one line and changes nothing; inspect
names each file's type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.errors import UserError

from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401 (autouse: one torch thread)

SIZE = dict(width=64, height=64, steps=2, guidance_scale=5.0)


def make_adapter(path: Path, family: str, seed: int, kind: str, **options) -> Path:
    """A file of ``kind`` (loha, lokr, dora) as our trainer writes it, with trained-looking weights."""
    from trainer.config import LoraConfig
    from trainer.lora.inject import inject_lora
    from trainer.lora.io import save_lora
    from tests.fixtures.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    cfg = LoraConfig(rank=4, alpha=2.0, unet_targets="kohya", text_encoder_targets="attention_mlp", conv_rank=2,
                     conv_alpha=1.0, type=kind, **options)
    torch.manual_seed(seed)
    handles = inject_lora(pipe.unet, tes, cfg, train_text_encoder=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handles.all_params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_lora(path, pipe.unet, tes, family=family, metadata={"ss_output_name": path.stem}, save_precision="fp16")
    return path


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    from trainer.config import ModelConfig
    from trainer.models.loading import load_base_model
    return load_base_model(ModelConfig(base=str(tiny_sd1_dir)), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lycoris")
    return {"loha": make_adapter(d / "style_loha.safetensors", "sd1", 1, "loha", use_tucker=True),
            "lokr": make_adapter(d / "style_lokr.safetensors", "sd1", 2, "lokr"),
            "dora": make_adapter(d / "style_dora.safetensors", "sd1", 3, "dora"),
            "lora": make_lora(d / "plain.safetensors", "sd1", 4),
            "xl_lokr": make_adapter(d / "xl_lokr.safetensors", "sdxl", 5, "lokr", lokr_full_matrix=True)}


def _state(base) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate([base.unet, *base.text_encoders])
            for k, v in m.state_dict().items()}


def _img(g, prompt="a zxq cat"):
    return np.asarray(g.generate(prompt, seed=5, **SIZE)[0], dtype=np.int16)


def test_mixed_lycoris_and_lora_fused_equals_unfused_weight_zero_is_base_and_clear_restores(sd1, files):
    from trainer.generate.engine import Generator, LoraSpec

    before = _state(sd1)
    g = Generator(sd1)
    base_img = _img(g)
    mix = [LoraSpec(str(files["loha"]), 0.8), LoraSpec(str(files["lokr"]), 1.0, te_weight=0.5, unet_weight=1.2),
           LoraSpec(str(files["dora"]), 0.7), LoraSpec(str(files["lora"]), 0.6)]
    g.set_loras(mix, mode="fused")
    fused = _img(g)
    g.set_loras(mix, mode="unfused")
    unfused = _img(g)
    assert np.abs(fused - base_img).max() > 0  # the LoRAs change the image
    assert np.abs(fused - unfused).max() <= 1  # same maths, fp32 rounding of the plain LoRA's path
    g.clear_loras()
    assert all(torch.equal(v, before[k]) for k, v in _state(sd1).items())

    for mode in ("fused", "unfused"):
        g.set_loras([LoraSpec(str(files[k]), 0.0) for k in ("loha", "lokr", "dora")], mode=mode)
        assert np.array_equal(_img(g), base_img)
        g.clear_loras()
    assert all(torch.equal(v, before[k]) for k, v in _state(sd1).items())

    # a DoRA file alone at weight m: the update is m times the one at weight 1 (A1111's and ComfyUI's strength)
    from trainer.lora.io import match_modules, read_lora
    lf = read_lora(files["dora"])
    layer_key = next(k for k in lf.modules if k.startswith("unet:"))
    layer = match_modules(lf, sd1.unet, list(sd1.text_encoders), family="sd1")[layer_key]
    w0 = layer.weight.detach().clone()
    deltas = {}
    for m in (1.0, 0.5):
        g.set_loras([LoraSpec(lf, m)])
        deltas[m] = layer.weight.detach() - w0
    g.clear_loras()
    assert torch.allclose(deltas[0.5] * 2, deltas[1.0], atol=1e-6)
    g.release()


def test_misfits_and_broken_files_are_one_line_and_change_nothing(sd1, files, tmp_path):
    from safetensors.torch import load_file, save_file

    from trainer.generate.engine import Generator, LoraSpec

    before = _state(sd1)
    g = Generator(sd1)
    with pytest.raises(UserError, match="SDXL") as e:  # an SDXL LoKr on the SD1 model
        g.set_loras([LoraSpec(str(files["xl_lokr"]), 1.0)])
    assert "\n" not in str(e.value)

    from trainer.lora.io import read_lora
    t = load_file(str(files["loha"]))
    name = next(k for k in t if k.endswith(".hada_w2_b")).rsplit(".", 1)[0]
    module = next(k for k, m in read_lora(files["loha"]).modules.items() if m.keys[0].startswith(name + "."))
    half = {k: v for k, v in t.items() if k != name + ".hada_w2_b"}
    save_file(half, tmp_path / "half.safetensors")
    mixed = dict(t, **{name + ".lokr_w1": torch.ones(2, 2)})
    save_file(mixed, tmp_path / "mixed.safetensors")
    bad = dict(t, **{name + ".hada_w1_b": torch.ones(3, t[name + ".hada_w1_b"].shape[1])})
    save_file(bad, tmp_path / "bad.safetensors")
    wrong = dict(t, **{name + ".hada_w1_a": torch.ones(t[name + ".hada_w1_a"].shape[0] + 8, 4),
                       name + ".hada_w2_a": torch.ones(t[name + ".hada_w2_a"].shape[0] + 8, 4)})
    save_file(wrong, tmp_path / "wrong.safetensors")
    cases = {"half": "hada_w2_b missing", "mixed": "mixes LoHa and LoKr", "bad": "do not multiply",
             "wrong": "do not fit"}
    for stem, words in cases.items():
        with pytest.raises(UserError) as e:
            g.set_loras([LoraSpec(str(files["lora"]), 1.0), LoraSpec(str(tmp_path / f"{stem}.safetensors"), 1.0)])
        msg = str(e.value)
        assert words in msg and "\n" not in msg, msg
        assert module in msg  # names the module
    assert all(torch.equal(v, before[k]) for k, v in _state(sd1).items())  # nothing loaded halfway
    g.release()


def test_inspect_names_type_rank_family_triggers_and_hash(files):
    from trainer.generate.inspection import format_inspection, inspect_lora

    for kind, label in (("loha", "LoHa"), ("lokr", "LoKr"), ("dora", "DoRA"), ("lora", "LoRA")):
        info = inspect_lora(files[kind])
        assert any(label in t for t in info["types"]), info["types"]
        text = format_inspection(info)
        assert "type:" in text and label in text and info["short_hash"] in text and "SD1" in text
    assert inspect_lora(files["xl_lokr"])["family"] == "sdxl"
