"""Baking LoRAs into a checkpoint on tiny SD1/SD2/SDXL models: the baked model draws the images the base with the
same LoRAs fused draws, the file loads with its family and prediction type, carries how it was made, and bad
input is one line naming the file with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.errors import UserError

from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401 (autouse: one torch thread)

SIZE = dict(width=64, height=64, steps=2, guidance_scale=5.0)
PROMPT = "a castle on a hill"


# ------------------------------------------------------------------------------------------------ fixtures


def _load(source, dtype=torch.float32):
    from trainer.config import ModelConfig
    from trainer.models.loading import load_base_model
    return load_base_model(ModelConfig(base=str(source)), dtype=dtype, device="cpu")


def _image(source, specs=()) -> np.ndarray:
    """One picture from ``source`` with ``specs`` fused by the generator (none: the model as it is)."""
    from trainer.generate.engine import Generator
    g = Generator(_load(source))
    g.set_loras(list(specs))
    return np.asarray(g.generate(PROMPT, seed=3, **SIZE)[0], dtype=np.int16)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd1_dir):
    """An SD1 single-file base (so base and baked file share the loader's scheduler config) and LoRA files."""
    from trainer.models.ldm_export import save_single_file
    d = tmp_path_factory.mktemp("bake")
    base = save_single_file(_load(tiny_sd1_dir).make_pipeline(), d / "base_sd1.safetensors")
    return {
        "dir": d,
        "sd1": base,
        "a": make_lora(d / "style_a.safetensors", "sd1", 1),
        "b": make_lora(d / "char_b.safetensors", "sd1", 2, rank=8, alpha=8.0),
        "xl": make_lora(d / "xl_c.safetensors", "sdxl", 3),
        "sd2": make_lora(d / "sd2_d.safetensors", "sd2", 4),
    }


def _specs(files):
    from trainer.generate.engine import LoraSpec
    return [LoraSpec(str(files["a"]), 0.8), LoraSpec(str(files["b"]), 0.5, te_weight=0.3, unet_weight=0.6)]


@pytest.fixture(scope="module")
def baked_sd1(files):
    from trainer.lora.tools.bake import bake
    return bake(files["sd1"], _specs(files), files["dir"] / "out" / "baked_fp32.safetensors", dtype="fp32")


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _header(path: Path) -> tuple[dict, dict]:
    """(tensor name -> dtype, metadata) from the file's own header."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}, dict(f.metadata() or {})


# ------------------------------------------------------------------------------------------------ images


def test_sd1_baked_checkpoint_draws_what_the_fused_generator_draws(files, baked_sd1):
    fused = _image(files["sd1"], _specs(files))
    baked = _image(baked_sd1.path)
    assert np.abs(baked - _image(files["sd1"])).max() > 10, "the LoRAs should change the image"
    assert np.abs(baked - fused).max() <= 2
    assert [b.modules for b in baked_sd1.loras] and all(b.modules > 0 for b in baked_sd1.loras)


def test_sdxl_baked_checkpoint_draws_what_the_fused_generator_draws(files, tiny_sdxl_dir):
    from trainer.generate.engine import LoraSpec
    from trainer.lora.tools.bake import bake
    from trainer.models.single_file import load_single_file
    spec = LoraSpec(str(files["xl"]), 0.9)
    out = bake(tiny_sdxl_dir, [spec], files["dir"] / "xl" / "baked.safetensors", dtype="fp32")
    assert load_single_file(out.path).family == "sdxl"
    fused = _image(tiny_sdxl_dir, [LoraSpec(str(files["xl"]), 0.9)])
    baked = _image(out.path)
    assert np.abs(baked - _image(tiny_sdxl_dir)).max() > 10
    assert np.abs(baked - fused).max() <= 2


def test_fp16_is_the_default_and_stays_within_half_precision_rounding(files, baked_sd1):
    from trainer.lora.tools.bake import bake
    out = bake(files["sd1"], _specs(files), files["dir"] / "half" / "baked.safetensors")
    dtypes, meta = _header(out.path)
    floats = {dt for k, dt in dtypes.items() if "position_ids" not in k and k not in ("v_pred", "ztsnr")}
    assert floats == {"F16"}, floats
    assert out.dtype == "fp16" and meta["lorastudio_dtype"] == "fp16"
    assert out.size < 0.6 * baked_sd1.size and out.size == out.path.stat().st_size
    diff = np.abs(_image(out.path) - _image(baked_sd1.path))
    assert diff.max() <= 8 and diff.mean() <= 1.0, (diff.max(), diff.mean())


# ------------------------------------------------------------------------------------------------ the file


def test_the_file_says_how_it_was_made_and_loads_as_sd1(files, baked_sd1):
    from trainer.lora.io import lora_addnet_hash
    from trainer.models.single_file import load_single_file
    _, meta = _header(baked_sd1.path)
    assert meta["lorastudio_tool"] == "bake"
    assert meta["lorastudio_base"] == "base_sd1.safetensors" and meta["lorastudio_family"] == "sd1"
    assert str(files["dir"]) not in json.dumps(meta), "no local folder names in a file meant to be shared"
    assert meta["modelspec.title"] == "baked_fp32"
    loras = json.loads(meta["lorastudio_loras"])
    assert [x["file"] for x in loras] == ["style_a.safetensors", "char_b.safetensors"]
    assert [x["sshs_model_hash"] for x in loras] == [lora_addnet_hash(files["a"]), lora_addnet_hash(files["b"])]
    assert [(x["te_weight"], x["unet_weight"]) for x in loras] == [(0.8, 0.8), (0.3, 0.6)]
    assert all(x["modules"] > 0 for x in loras)
    parts = load_single_file(baked_sd1.path)
    assert parts.family == "sd1" and parts.prediction_type == "epsilon"
    assert _listing(baked_sd1.path.parent) == {"baked_fp32.safetensors"}, "no temporary file may stay behind"


def test_sd2_v_prediction_is_kept(files, tiny_sd2_dir):
    from trainer.lora.tools.bake import bake
    from trainer.models.single_file import load_single_file
    out = bake(tiny_sd2_dir, [f"{files['sd2']}:0.7"], files["dir"] / "sd2" / "baked.safetensors")
    parts = load_single_file(out.path)
    assert (parts.family, parts.prediction_type) == ("sd2", "v_prediction")
    assert (out.family, out.prediction_type) == ("sd2", "v_prediction")


def test_diffusers_folder_output(files, tiny_sd1_dir):
    from trainer.generate.engine import LoraSpec
    from trainer.lora.tools.bake import DIFFUSERS_RECORD, bake
    folder = files["dir"] / "as_diffusers"
    out = bake(tiny_sd1_dir, [f"{files['a']}:0.8"], folder, diffusers=True, dtype="fp32")
    assert out.path == folder and (folder / "model_index.json").is_file()
    record = json.loads((folder / DIFFUSERS_RECORD).read_text(encoding="utf-8"))
    assert record["lorastudio_tool"] == "bake" and record["lorastudio_loras"][0]["unet_weight"] == 0.8
    # a diffusers folder keeps the base's scheduler, so base and baked folder draw with the same one
    assert np.abs(_image(folder) - _image(tiny_sd1_dir, [LoraSpec(str(files["a"]), 0.8)])).max() <= 2
    with pytest.raises(UserError, match="exists"):
        bake(tiny_sd1_dir, [str(files["a"])], folder, diffusers=True)
    bake(tiny_sd1_dir, [f"{files['a']}:0.1"], folder, diffusers=True, overwrite=True)
    record = json.loads((folder / DIFFUSERS_RECORD).read_text(encoding="utf-8"))
    assert record["lorastudio_loras"][0]["unet_weight"] == 0.1
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_single_file_base_is_streamed_and_gives_what_the_model_bake_gives(files, family, request, monkeypatch):
    """From a single file the bake reads one tensor at a time (never the whole checkpoint) and writes the same
    tensors, with the same names, as the bake through the loaded model (text encoders included: SD2's and SDXL's
    second are OpenCLIP, with q/k/v fused in one matrix)."""
    from safetensors.torch import load_file

    import trainer.models.single_file as sf
    from trainer.lora.tools.bake import bake
    from trainer.models.ldm_export import save_single_file
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    lora = {"sd1": files["a"], "sd2": files["sd2"], "sdxl": files["xl"]}[family]
    d = files["dir"] / f"streamed_{family}"
    single = save_single_file(_load(folder).make_pipeline(), d / "base.safetensors")
    via_model = bake(folder, [f"{lora}:0.7"], d / "via_model.safetensors", dtype="fp32")

    def whole_file(*a, **kw):
        raise AssertionError("the streamed bake must not read the whole checkpoint")

    monkeypatch.setattr(sf, "read_checkpoint", whole_file)
    streamed = bake(single, [f"{lora}:0.7"], d / "streamed.safetensors", dtype="fp32")
    a, b = load_file(str(streamed.path)), load_file(str(via_model.path))
    assert set(a) == set(b)
    differ = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5)]
    if family == "sd2":  # the exporter's copy of OpenCLIP's unused last block is made after the fusing
        last = max(int(k.split(".")[4]) for k in a if ".resblocks." in k)
        differ = [k for k in differ if f".resblocks.{last}." not in k]
    assert differ == []
    base = load_file(str(single))
    for prefix in {"sd1": ["cond_stage_model."], "sd2": ["cond_stage_model."],
                   "sdxl": ["conditioner.embedders.0.", "conditioner.embedders.1."]}[family]:
        qs = [k for k in a if k.startswith(prefix) and k.endswith(("in_proj_weight", "self_attn.q_proj.weight"))]
        assert qs and any(not torch.equal(a[k], base[k]) for k in qs), f"{prefix}* should be patched"
    assert (streamed.family, streamed.prediction_type) == (via_model.family, via_model.prediction_type)
    assert [x.modules for x in streamed.loras] == [x.modules for x in via_model.loras]


def test_the_model_bake_fuses_in_place_and_writes_without_a_second_copy(files, tiny_sd1_dir, monkeypatch):
    """From a diffusers folder the writer is handed the loaded model's own tensors (fp16 base, fp16 file)."""
    import safetensors.torch

    import trainer.lora.tools.bake as bake_mod
    seen: dict = {}
    real_load, real_save = bake_mod._load_base, safetensors.torch.save_file

    def load(*a, **kw):
        seen["model"] = real_load(*a, **kw)
        return seen["model"]

    def save(tensors, *a, **kw):
        seen["ptrs"] = {t.untyped_storage().data_ptr() for t in tensors.values()}
        return real_save(tensors, *a, **kw)

    monkeypatch.setattr(bake_mod, "_load_base", load)
    monkeypatch.setattr(safetensors.torch, "save_file", save)
    bake_mod.bake(tiny_sd1_dir, _specs(files), files["dir"] / "stream" / "baked.safetensors")
    m = seen["model"]
    params = [p for mod in (m.unet, m.vae, *m.text_encoders) for p in mod.parameters()]
    assert {p.dtype for p in params} == {torch.float16}
    shared = sum(p.numel() for p in params if p.untyped_storage().data_ptr() in seen["ptrs"])
    assert shared >= 0.9 * sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------ bad input


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return path


def _no_match_lora(path: Path) -> Path:
    """An SD1-shaped LoRA for a UNet level the tiny model does not have."""
    from safetensors.torch import save_file
    n = "lora_unet_down_blocks_3_attentions_0_proj_in"
    save_file({n + ".lora_down.weight": torch.randn(4, 32), n + ".lora_up.weight": torch.randn(32, 4),
               n + ".alpha": torch.tensor(4.0)}, str(path))
    return path


BAD_LORAS = {
    "another family": (lambda f, d: f["xl"], "SDXL"),
    "shapes that do not fit": (lambda f, d: f["sd2"], "do not fit"),
    "not safetensors": (lambda f, d: _garbage(d / "broken.safetensors"), "not a valid .safetensors"),
    "a pickle": (lambda f, d: _garbage(d / "old.ckpt"), "only .safetensors"),
    "missing": (lambda f, d: d / "nowhere.safetensors", "not found"),
    "matches no layer": (lambda f, d: _no_match_lora(d / "nomatch.safetensors"), "no matching layer"),
}


@pytest.mark.parametrize("case", list(BAD_LORAS))
def test_bad_lora_is_one_line_naming_it_and_writes_nothing(files, tmp_path, case):
    from trainer.lora.tools.bake import bake
    make, words = BAD_LORAS[case]
    src = tmp_path / "inputs"
    src.mkdir()
    lora = make(files, src)
    out_dir = tmp_path / "out"
    with pytest.raises(UserError) as e:
        bake(files["sd1"], [str(files["a"]), f"{lora}:0.5"], out_dir / "baked.safetensors")
    msg = str(e.value)
    assert lora.name in msg and words in msg and "\n" not in msg, msg
    assert not out_dir.exists()


def test_a_lora_matching_nothing_is_refused_even_when_partial_loads_are_allowed(files, tmp_path):
    from trainer.lora.tools.bake import bake
    lora = _no_match_lora(tmp_path / "nomatch.safetensors")
    with pytest.raises(UserError, match="none of its 1 modules matches"):
        bake(files["sd1"], [str(lora)], tmp_path / "baked.safetensors", allow_partial=True)
    assert _listing(tmp_path) == {"nomatch.safetensors"}


@pytest.mark.parametrize("case", ["not safetensors", "missing", "not a checkpoint"])
def test_bad_base_is_one_line_naming_it(files, tmp_path, case):
    from trainer.lora.tools.bake import bake
    base = {"not safetensors": lambda: _garbage(tmp_path / "model.safetensors"),
            "missing": lambda: tmp_path / "no_model.safetensors",
            "not a checkpoint": lambda: _garbage(tmp_path / "model.txt")}[case]()
    with pytest.raises(UserError) as e:
        bake(base, [str(files["a"])], tmp_path / "out" / "baked.safetensors")
    assert base.name in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(files, tmp_path):
    from trainer.lora.tools.bake import bake
    out = tmp_path / "baked.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="--overwrite"):
        bake(files["sd1"], [str(files["a"])], out)
    assert out.read_bytes() == b"keep me"
    for wrong, words in ((files["a"], "LoRA files"), (files["sd1"], "base model"),
                         (tmp_path / "baked.ckpt", ".safetensors file")):
        with pytest.raises(UserError, match=words):
            bake(files["sd1"], [str(files["a"])], wrong, overwrite=True)
    bake(files["sd1"], [str(files["a"])], out, overwrite=True)
    assert _header(out)[1]["lorastudio_tool"] == "bake"
    assert _listing(tmp_path) == {"baked.safetensors"}


@pytest.mark.parametrize("base", ["single file (streamed)", "diffusers folder"])
def test_a_failed_write_leaves_no_file(files, tiny_sd1_dir, tmp_path, monkeypatch, base):
    import safetensors.torch

    import trainer.lora.tools.bake as bake_mod

    def full_disk(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    real_read, reads = bake_mod._read_tensor, []

    def disk_fills_up(*a, **kw):  # the streamed writer has written a part of the file when the disk is full
        reads.append(1)
        if len(reads) > 5:
            raise OSError(28, "No space left on device")
        return real_read(*a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(bake_mod, "_read_tensor", disk_fills_up)
    source = files["sd1"] if base.startswith("single") else tiny_sd1_dir
    with pytest.raises(UserError, match="No space left"):
        bake_mod.bake(source, [str(files["a"])], tmp_path / "baked.safetensors")
    assert _listing(tmp_path) == set()
