"""lorastudio lora resize (engine) and the tools' one writer: exact at or above the rank, the best approximation
below it, dynamic ranks, LoCon and Tucker convs, kohya keys and metadata, nothing written when a check fails."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401
from trainer.errors import UserError
from trainer.lora.io import lora_addnet_hash, read_lora
from trainer.lora.tools.resize import resize_lora
from trainer.lora.tools.svd import parse_dynamic


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("resize")
    return {fam: make_lora(d / f"{fam}.safetensors", fam, seed=3, rank=4, alpha=2.0) for fam in ("sd1", "sdxl")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(-1) - b.reshape(-1)).norm() / b.norm())


def singular_values(mod) -> torch.Tensor:
    d = mod.delta().double()
    return torch.linalg.svdvals(d.reshape(d.shape[0], -1))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("rank", [4, 6])
def test_a_rank_at_or_above_the_files_keeps_every_delta(loras, tmp_path, family, rank):
    src = read_lora(loras[family])
    result = resize_lora(loras[family], tmp_path / "r.safetensors", rank=rank, save_precision="fp32")
    out = read_lora(result.written.path)
    assert set(out.modules) == set(src.modules)
    for key, mod in src.modules.items():
        assert out.modules[key].rank == 4  # never above the module's own rank
        assert rel_err(out.modules[key].delta(), mod.delta()) < 1e-5, key
    assert result.kept == pytest.approx(1.0, abs=1e-9)
    with safe_open(str(loras[family]), "pt") as a, safe_open(str(result.written.path), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # same kohya names: SGM dialect and lora_te1/te2 for SDXL


def test_a_lower_rank_is_the_best_approximation_and_keeps_the_scale(loras, tmp_path):
    src = read_lora(loras["sd1"])
    result = resize_lora(loras["sd1"], tmp_path / "r2.safetensors", rank=2)
    out = read_lora(result.written.path)
    reports = {m.key: m for m in result.modules}
    for key, mod in src.modules.items():
        new = out.modules[key]
        assert new.rank == 2 and reports[key].rank_in == 4 and reports[key].rank_out == 2
        assert new.scale == pytest.approx(mod.scale)  # alpha proportional to the rank
        s = singular_values(mod)
        tail = float(s[2:].pow(2).sum().sqrt())
        err = float((new.delta() - mod.delta()).norm())
        assert err == pytest.approx(tail, rel=2e-2, abs=1e-6), key  # Eckart-Young: only the tail is lost
        assert reports[key].kept == pytest.approx(float(s[:2].norm() / s.norm()), rel=1e-4)
    assert 0 < result.kept < 1


@pytest.mark.parametrize("spec", ["sv_fro=0.9", "sv_cumulative=0.8", "sv_ratio=3"])
def test_dynamic_ranks_are_the_smallest_that_meet_the_rule(loras, tmp_path, spec):
    dyn = parse_dynamic(spec)
    src = read_lora(loras["sd1"])
    result = resize_lora(loras["sd1"], tmp_path / "d.safetensors", dynamic=dyn)
    out = read_lora(result.written.path)
    for key, mod in src.modules.items():
        s = singular_values(mod)
        k = out.modules[key].rank

        def meets(n):
            if dyn.mode == "sv_fro":
                return float(s[:n].norm() / s.norm()) >= dyn.value - 1e-9
            if dyn.mode == "sv_cumulative":
                return float(s[:n].sum() / s.sum()) >= dyn.value - 1e-9
            return bool(s[n - 1] >= s[0] / dyn.value * (1 - 1e-6))

        if dyn.mode == "sv_ratio":  # every kept value is large enough, the next one is not
            assert meets(k) and (k == 4 or not meets(k + 1)), key
        else:
            assert meets(k) and (k == 1 or not meets(k - 1)), key
    assert len({m.rank_out for m in result.modules}) > 1  # ranks differ per module
    assert read_lora(result.written.path).metadata["ss_network_dim"] == "Dynamic"


def _conv_lora(path, *, with_text: bool = True):
    """A hand-written LoCon file for the tiny SD1 UNet: a 3x3 conv, a Tucker conv (lora_mid) and a Linear."""
    g = torch.Generator().manual_seed(5)
    t = {}

    def add(name, down, up, mid=None, alpha=2.0):
        t[f"lora_unet_{name}.lora_down.weight"] = torch.randn(down, generator=g)
        t[f"lora_unet_{name}.lora_up.weight"] = torch.randn(up, generator=g)
        if mid is not None:
            t[f"lora_unet_{name}.lora_mid.weight"] = torch.randn(mid, generator=g)
        t[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)

    add("down_blocks_0_resnets_0_conv1", (4, 32, 3, 3), (32, 4, 1, 1))
    add("down_blocks_0_resnets_1_conv1", (3, 32, 1, 1), (32, 3, 1, 1), mid=(3, 3, 3, 3), alpha=1.5)
    add("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (4, 32), (32, 4))
    save_file(t, str(path))
    return path


def test_conv_and_tucker_modules_resize_as_conv_loras(tmp_path):
    src_path = _conv_lora(tmp_path / "locon.safetensors")
    src = read_lora(src_path)
    full = read_lora(resize_lora(src_path, tmp_path / "full.safetensors", rank=4, save_precision="fp32").written.path)
    low = read_lora(resize_lora(src_path, tmp_path / "low.safetensors", rank=2).written.path)
    for key, mod in src.modules.items():
        assert rel_err(full.modules[key].delta(), mod.delta()) < 1e-5, key
        new = low.modules[key]
        assert new.mid is None and new.rank == 2
        if mod.down.dim() == 4:
            kernel = tuple(mod.mid.shape[2:]) if mod.mid is not None else tuple(mod.down.shape[2:])
            assert tuple(new.down.shape) == (2, 32, *kernel) and tuple(new.up.shape) == (32, 2, 1, 1)
        s = singular_values(mod)
        assert float((new.delta() - mod.delta()).norm()) == pytest.approx(float(s[2:].norm()), rel=2e-2)


def test_the_output_is_a_kohya_file_that_says_how_it_was_made(loras, tmp_path):
    out = tmp_path / "small.safetensors"
    result = resize_lora(loras["sd1"], out, rank=2)
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
        dtypes = {k.rsplit(".", 1)[0].split(".", 1)[1] if ".lora_" in k else "alpha": f.get_tensor(k).dtype
                  for k in keys}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert dtypes["lora_down"] == torch.float16 and dtypes["alpha"] == torch.float32
    assert md["lorastudio_tool"] == "resize"
    assert md["sshs_model_hash"] == lora_addnet_hash(out) == result.written.sha256
    assert md["ss_network_dim"] == "2" and float(md["ss_network_alpha"]) == pytest.approx(1.0)  # 2/4 scale kept
    (source,) = json.loads(md["lorastudio_sources"])
    assert source["file"] == loras["sd1"].name and source["sshs_model_hash"] == lora_addnet_hash(loras["sd1"])
    assert source["rank"] == 4
    assert json.loads(md["lorastudio_args"])["rank"] == 2


def test_sdxl_output_names_its_base(loras, tmp_path):
    md = read_lora(resize_lora(loras["sdxl"], tmp_path / "x.safetensors", rank=2).written.path).metadata
    assert md["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert md["ss_base_model_version"].startswith("sdxl")


def test_bad_ranks_and_an_existing_output_are_refused_before_any_work(loras, tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(UserError, match="at least 1"):
        resize_lora(loras["sd1"], out, rank=0)
    with pytest.raises(UserError, match=r"--rank 33 is above the size of module .*holds rank 32"):
        resize_lora(loras["sd1"], out, rank=33)
    with pytest.raises(UserError, match="--rank R, --dynamic"):
        resize_lora(loras["sd1"], out)
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists; give --overwrite"):
        resize_lora(loras["sd1"], out, rank=2)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(UserError, match="must be a .safetensors"):
        resize_lora(loras["sd1"], tmp_path / "o.ckpt", rank=2)
    with pytest.raises(UserError, match="sv_fro is a share"):
        parse_dynamic("sv_fro=1.5")
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]


def test_a_failed_self_check_leaves_no_file(loras, tmp_path, monkeypatch):
    """The writer checks the file under its temporary name; if what reads back is not what was meant, neither
    the final name nor the temporary file is left."""
    import trainer.lora.tools.write as write

    real = write.read_lora

    def corrupted(path):
        lf = real(path)
        key = next(iter(lf.modules))
        lf.modules[key].up.mul_(1.1)
        return lf

    monkeypatch.setattr(write, "read_lora", corrupted)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(RuntimeError, match="self-check .* failed, nothing written.*off by"):
        resize_lora(loras["sd1"], out, rank=2)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_output(loras, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    resize_lora(loras["sd1"], out, rank=3, overwrite=True)
    assert {m.rank for m in read_lora(out).modules.values()} == {3}
    assert not math.isnan(float(read_lora(out).metadata["ss_network_alpha"]))
