"""LyCORIS inputs to the LoRA tools (docs/lora-format.md, 'LoRA tools'): bake fuses LoHa and DoRA files as the
generator does; resize and merge take LoHa from its delta and write a plain LoRA that reproduces it; a DoRA
file is refused by resize and merge with one line naming the file and module."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401 (autouse: one torch thread)
from tests.trainer.generate.test_lycoris_generation import make_adapter
from trainer.errors import UserError
from trainer.lora.io import read_lora


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lycoris_tools")
    return {"dir": d,
            "loha": make_adapter(d / "style_loha.safetensors", "sd1", 1, "loha"),
            "dora": make_adapter(d / "style_dora.safetensors", "sd1", 3, "dora"),
            "lora": make_lora(d / "plain.safetensors", "sd1", 4)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(-1) - b.reshape(-1)).norm() / b.norm())


def _delta_rank(mod) -> int:
    d = mod.delta().double().reshape(mod.delta().shape[0], -1)  # an fp32 delta: its rounding is no rank
    return int(torch.linalg.matrix_rank(d, rtol=max(d.shape) * torch.finfo(torch.float32).eps))


def _weights(model) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate([model.unet, *model.text_encoders])
            for k, v in m.state_dict().items()}


def _load(source):
    from trainer.config import ModelConfig
    from trainer.models.loading import load_base_model
    return load_base_model(ModelConfig(base=str(source)), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_bake_of_a_loha_or_dora_file_equals_the_generator_fused_with_it(files, tiny_sd1_dir, kind):
    from trainer.generate.engine import Generator, LoraSpec
    from trainer.lora.tools.bake import bake
    from trainer.models.ldm_export import save_single_file

    base_file = files["dir"] / "base.safetensors"
    if not base_file.exists():
        save_single_file(_load(tiny_sd1_dir).make_pipeline(), base_file)
    # a plain LoRA fused first: the DoRA delta must still be taken against the original weight
    specs = [LoraSpec(str(files["lora"]), 0.6), LoraSpec(str(files[kind]), 0.8)]
    out = bake(base_file, specs, files["dir"] / f"baked_{kind}.safetensors", dtype="fp32")
    assert all(b.modules > 0 for b in out.loras)

    g = Generator(_load(base_file))
    base_w = _weights(g.base)
    g.set_loras([LoraSpec(str(files["lora"]), 0.6), LoraSpec(str(files[kind]), 0.8)], mode="fused")
    fused = _weights(g.base)
    baked = _weights(_load(out.path))
    changed = [k for k in fused if not torch.equal(fused[k], base_w[k])]
    assert changed, "the LoRAs should change the weights"
    for k in changed:
        assert torch.allclose(baked[k], fused[k], atol=1e-5, rtol=1e-4), k


def test_resize_of_a_loha_at_or_above_its_delta_rank_reproduces_it_as_a_plain_lora(files, tmp_path):
    from trainer.lora.tools.resize import resize_lora

    src = read_lora(files["loha"])
    assert {m.kind for m in src.modules.values()} == {"loha"}
    top = max(_delta_rank(m) for m in src.modules.values())
    assert top <= 16  # rank 4 LoHa: (w1a w1b) * (w2a w2b) has rank at most 4 * 4
    result = resize_lora(files["loha"], tmp_path / "r.safetensors", rank=top, save_precision="fp32")
    out = read_lora(result.written.path)
    assert set(out.modules) == set(src.modules)
    for key, mod in src.modules.items():
        new = out.modules[key]
        assert new.is_plain and new.rank <= _delta_rank(mod) + 1
        assert rel_err(new.delta(), mod.delta()) < 1e-4, key
    assert sorted(result.converted) == sorted(src.modules)
    md = out.metadata
    assert "LoHa" in md["lorastudio_converted"] and "plain LoRA" in md["lorastudio_converted"]
    assert json.loads(md["lorastudio_sources"])[0]["types"] == ["LoHa"]
    # below the rank it is still the best approximation of the delta
    low = read_lora(resize_lora(files["loha"], tmp_path / "r2.safetensors", rank=2).written.path)
    key, mod = next(iter(src.modules.items()))
    s = torch.linalg.svdvals(mod.delta().double().reshape(mod.delta().shape[0], -1))
    best = float(s[2:].norm() / s.norm())
    assert rel_err(low.modules[key].delta(), mod.delta()) == pytest.approx(best, abs=5e-3)


@pytest.mark.parametrize("mode", ["concat", "full"])
def test_merge_of_a_loha_and_a_lora_reproduces_the_weighted_sum(files, tmp_path, mode):
    from trainer.lora.tools.merge import merge_loras

    a, b = read_lora(files["loha"]), read_lora(files["lora"])
    wa, wb = 0.7, -0.4
    kw = {"concat": True} if mode == "concat" else {}
    if mode == "full":  # the full rank: at most the layer's size, so the largest layer's bound
        from trainer.lora.tools.svd import low_rank_of
        kw["rank"] = min(low_rank_of(m).max_rank for m in a.modules.values())
    result = merge_loras([(files["loha"], wa), (files["lora"], wb)], tmp_path / f"m_{mode}.safetensors",
                         save_precision="fp32", **kw)
    out = read_lora(result.written.path)
    assert set(out.modules) == set(a.modules) | set(b.modules)
    for key, new in out.modules.items():
        want = sum(w * lf.modules[key].delta().flatten(1) for lf, w in ((a, wa), (b, wb)) if key in lf.modules)
        assert new.is_plain  # (a 1x1 conv may be a Linear-shaped delta in one file, a conv one in the other)
        assert rel_err(new.delta().flatten(1), want) < 1e-4, key
    assert set(result.converted) == set(a.modules)
    assert "LoHa" in out.metadata["lorastudio_converted"]


def test_resize_and_merge_refuse_a_dora_file_in_one_line(files, tmp_path):
    from trainer.lora.tools.merge import merge_loras
    from trainer.lora.tools.resize import resize_lora

    for call in (lambda: resize_lora(files["dora"], tmp_path / "d.safetensors", rank=2),
                 lambda: merge_loras([(files["lora"], 1.0), (files["dora"], 1.0)], tmp_path / "d.safetensors",
                                     concat=True)):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "style_dora.safetensors" in msg and "module " in msg and "DoRA" in msg
        assert "base" in msg
    assert not list(tmp_path.iterdir()), "nothing written"
