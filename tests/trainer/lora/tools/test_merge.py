"""lorastudio lora merge (engine): the SVD merge at the summed rank and the concat merge reproduce the weighted sum,
modules of one file are kept, a lower rank loses only the tail, files that do not belong together are refused."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401
from trainer.errors import UserError
from trainer.lora.io import lora_addnet_hash, read_lora
from trainer.lora.tools.merge import merge_loras, parse_source

WA, WB = 0.7, -0.5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two SD1 LoRAs: A rank 4 with text encoder, B rank 2 UNet only (so the TE modules are A's alone)."""
    d = tmp_path_factory.mktemp("merge")
    a = make_lora(d / "a.safetensors", "sd1", seed=1, rank=4, alpha=2.0)
    b = make_lora(d / "b.safetensors", "sd1", seed=2, rank=2, alpha=2.0, te=False)
    return a, b


def weighted_sum(key, files):
    return sum(w * lf.modules[key].delta() for lf, w in files if key in lf.modules)


def rel_err(a, b):
    return float((a.reshape(-1) - b.reshape(-1)).norm() / b.norm())


@pytest.mark.parametrize("concat", [False, True], ids=["svd", "concat"])
def test_merge_at_the_summed_rank_and_concat_reproduce_the_weighted_sum(pair, tmp_path, concat):
    a, b = pair
    la, lb = read_lora(a), read_lora(b)
    kw = {"concat": True} if concat else {"rank": 6}
    result = merge_loras([(a, WA), (b, WB)], tmp_path / "m.safetensors", save_precision="fp32", **kw)
    out = read_lora(result.written.path)
    assert set(out.modules) == set(la.modules) | set(lb.modules)
    only_a = set(la.modules) - set(lb.modules)
    assert only_a and all(k.startswith("text_encoder:") for k in only_a)  # kept, at A's weight
    for key, mod in out.modules.items():
        assert rel_err(mod.delta(), weighted_sum(key, [(la, WA), (lb, WB)])) < 1e-5, key
        assert mod.rank == (4 if key in only_a else 6)
    assert result.kept == pytest.approx(1.0, abs=1e-9)


def test_a_lower_merge_rank_loses_only_the_tail(pair, tmp_path):
    a, b = pair
    files = [(read_lora(a), WA), (read_lora(b), WB)]
    result = merge_loras([(a, WA), (b, WB)], tmp_path / "m3.safetensors", rank=3)
    out = read_lora(result.written.path)
    for key, mod in out.modules.items():
        want = weighted_sum(key, files).double()
        s = torch.linalg.svdvals(want.reshape(want.shape[0], -1))
        assert mod.rank == 3
        assert float((mod.delta().double() - want).norm()) == pytest.approx(float(s[3:].norm()), rel=2e-2), key
    assert 0 < result.kept < 1


def test_merge_metadata_names_every_source_with_hash_weight_and_rank(pair, tmp_path):
    a, b = pair
    md = read_lora(merge_loras([(a, WA), (b, WB)], tmp_path / "m.safetensors", rank=3).written.path).metadata
    assert md["lorastudio_tool"] == "merge"
    sources = json.loads(md["lorastudio_sources"])
    assert [(s["file"], s["weight"], s["rank"]) for s in sources] == [("a.safetensors", WA, 4), ("b.safetensors", WB, 2)]
    assert [s["sshs_model_hash"] for s in sources] == [lora_addnet_hash(a), lora_addnet_hash(b)]
    assert md["ss_network_dim"] == "3" and md["ss_network_alpha"] == "3.0"  # alpha = rank: scale 1
    assert json.loads(md["lorastudio_args"])["mode"] == "svd"


def test_source_specs_take_an_optional_weight():
    assert parse_source("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_source("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_source("dir:x/a.safetensors:-1") == ("dir:x/a.safetensors", -1.0)
    assert parse_source(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)


def test_files_that_do_not_belong_together_are_refused(pair, tmp_path):
    a, _ = pair
    xl = make_lora(tmp_path / "xl.safetensors", "sdxl", seed=1, rank=2)
    sd2 = make_lora(tmp_path / "sd2.safetensors", "sd2", seed=1, rank=2)
    out = tmp_path / "m.safetensors"
    with pytest.raises(UserError, match=r"a.safetensors is a LoRA for SD1.x/SD2.x .* xl.safetensors one for SDXL"):
        merge_loras([(a, 1.0), (xl, 1.0)], out, rank=4)
    with pytest.raises(UserError, match=r"module text_encoder:\S+: a.safetensors patches a \d+x\d+ layer, "
                                         r"sd2.safetensors a \d+x\d+ one; the files are for different models"):
        merge_loras([(a, 1.0), (sd2, 1.0)], out, concat=True)
    with pytest.raises(UserError, match="--concat stacks every rank"):
        merge_loras([(a, 1.0)], out, concat=True, rank=4)
    with pytest.raises(UserError, match="give --rank R"):
        merge_loras([(a, 1.0)], out)
    with pytest.raises(UserError, match=r"--rank 40 is above the size of module"):
        merge_loras([(a, 1.0)], out, rank=40)
    with pytest.raises(UserError, match="not found"):
        merge_loras([(a, 1.0), (tmp_path / "missing.safetensors", 1.0)], out, rank=4)
    assert not out.exists()
