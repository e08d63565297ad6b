"""lorastudio lora extract (engine): a LoRA baked into a tiny base comes back at its rank (delta error < 1e-3),
from a single file against a diffusers folder; untouched layers are left out; bad input is one UserError."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.lora_files import make_lora, one_torch_thread, text_encoders_of  # noqa: F401
from tests.fixtures.tiny_models import build_tiny_pipeline
from trainer.errors import UserError
from trainer.lora.io import lora_addnet_hash, match_modules, read_lora
from trainer.lora.tools.extract import extract_lora
from trainer.models.ldm_export import save_single_file


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def baked(request, tmp_path_factory):
    """(family, the LoRA file, base as a diffusers folder, the base + LoRA written as one fp32 checkpoint)."""
    family = request.param
    d = tmp_path_factory.mktemp(f"extract_{family}")
    lora = make_lora(d / "known.safetensors", family, seed=7, rank=4, alpha=2.0)
    pipe = build_tiny_pipeline(family)
    pipe.save_pretrained(d / "base", safe_serialization=True)
    lf = read_lora(lora)
    with torch.no_grad():
        for key, layer in match_modules(lf, pipe.unet, text_encoders_of(pipe), family=family).items():
            layer.weight += lf.modules[key].delta(shape=layer.weight.shape)
    save_single_file(pipe, d / "tuned.safetensors")
    return family, lora, d / "base", d / "tuned.safetensors"


def test_extracting_a_baked_lora_at_its_rank_gives_it_back(baked, tmp_path):
    family, lora, base, tuned = baked
    known = read_lora(lora)
    result = extract_lora(tuned, base, tmp_path / "x.safetensors", rank=4)
    got = read_lora(result.written.path)
    assert set(got.modules) == set(known.modules)  # UNet and text encoder(s), nothing else
    for key, mod in known.modules.items():
        want = mod.delta()
        err = float((got.modules[key].delta().reshape(-1) - want.reshape(-1)).norm() / want.norm())
        assert err < 1e-3, (key, err)
        assert got.modules[key].rank == 4
    # the resnet and sampler layers were not touched: left out by the threshold
    assert result.left_out and all(".resnets." in k or "samplers" in k for k in result.left_out)
    assert result.kept == pytest.approx(1.0, abs=1e-4)
    md = got.metadata
    assert md["lorastudio_tool"] == "extract" and md["ss_sd_model_name"] == "base"
    tuned_src, base_src = json.loads(md["lorastudio_sources"])
    assert tuned_src["sshs_model_hash"] == lora_addnet_hash(tuned) and base_src["sshs_model_hash"] is None
    assert md["modelspec.architecture"].startswith("stable-diffusion-xl" if family == "sdxl"
                                                   else "stable-diffusion-v1")


def test_a_lower_rank_and_the_threshold(baked, tmp_path):
    family, lora, base, tuned = baked
    if family != "sd1":
        pytest.skip("one family is enough")
    result = extract_lora(tuned, base, tmp_path / "x2.safetensors", rank=2, conv_rank=0)
    assert {m.rank_out for m in result.modules} == {2} and 0 < result.kept < 1
    assert not any(".resnets." in m.key for m in result.modules) and not result.left_out  # conv_rank 0: not looked at
    with pytest.raises(UserError, match="differs from base in no layer by more than --threshold 10"):
        extract_lora(tuned, base, tmp_path / "x3.safetensors", rank=2, threshold=10.0)
    assert not (tmp_path / "x3.safetensors").exists()


def test_bad_input_is_refused(baked, tmp_path, tiny_sd1_dir, tiny_sdxl_dir):
    family, lora, base, tuned = baked
    if family != "sd1":
        pytest.skip("one family is enough")
    out = tmp_path / "x.safetensors"
    with pytest.raises(UserError, match="at least 1"):
        extract_lora(tuned, base, out, rank=0)
    with pytest.raises(UserError, match=r"--rank 64 is above the size of module"):
        extract_lora(tuned, base, out, rank=64)
    with pytest.raises(UserError, match=r"--tuned \S+ is an sdxl model but --base \S+ is an sd1 model"):
        extract_lora(tiny_sdxl_dir, tiny_sd1_dir, out, rank=2)
    with pytest.raises(UserError, match=r"--base: .*nowhere.*no such file or folder"):
        extract_lora(tuned, tmp_path / "nowhere", out, rank=2)
    assert not out.exists()
