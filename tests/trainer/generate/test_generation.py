"""Multi-LoRA generation on tiny SD1/SDXL models: fused vs unfused, exact restore, weights, tags, PNG info, grids, RSS."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.errors import UserError

from tests.fixtures.lora_files import make_lora, one_torch_thread  # noqa: F401 (autouse: one torch thread)

SIZE = dict(width=64, height=64, steps=2, guidance_scale=5.0)


# ------------------------------------------------------------------------------------------------ fixtures




def _base(model_dir: Path):
    from trainer.config import ModelConfig
    from trainer.models.loading import load_base_model
    return load_base_model(ModelConfig(base=str(model_dir)), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return _base(tiny_sd1_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return _base(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(d / "style_a.safetensors", "sd1", 1, output_name="zxq-style"),
        "b": make_lora(d / "char_b.safetensors", "sd1", 2, rank=8, alpha=8.0),
        "xl": make_lora(d / "xl_c.safetensors", "sdxl", 3),
        "dir": d,
    }


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _state(models) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(models) for k, v in m.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _models(base):
    return [base.unet, *base.text_encoders]


# ------------------------------------------------------------------------------------------------ mixing


def test_fused_equals_unfused_and_differs_from_base(sd1, loras):
    from trainer.generate.engine import Generator, LoraSpec
    g = Generator(sd1)
    base_img = g.generate("a castle", seed=3, **SIZE)[0]
    specs = [LoraSpec(loras["a"], 0.8), LoraSpec(loras["b"], 0.6)]
    g.set_loras(specs)
    fused = g.generate("a castle", seed=3, **SIZE)[0]
    g.set_loras(specs, mode="unfused")
    unfused = g.generate("a castle", seed=3, **SIZE)[0]
    assert np.abs(_arr(fused) - _arr(base_img)).max() > 10, "the LoRAs should change the image"
    assert np.abs(_arr(fused) - _arr(unfused)).max() <= 2
    g.clear_loras()


def test_fused_model_has_the_base_structure(sd1, loras):
    """Fused LoRAs add no latency by construction: same modules, same shapes and dtypes, no hooks."""
    from trainer.generate.engine import Generator, LoraSpec

    def layout(m):
        return [(n, type(x).__name__, len(x._forward_hooks) + len(x._forward_pre_hooks)) for n, x in m.named_modules()] \
            + [(n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()]
    before = [layout(m) for m in _models(sd1)]
    g = Generator(sd1)
    g.set_loras([LoraSpec(loras["a"], 0.8), LoraSpec(loras["b"], 0.6)])
    assert [layout(m) for m in _models(sd1)] == before
    g.set_loras([LoraSpec(loras["a"], 0.8)], mode="unfused")
    assert [layout(m) for m in _models(sd1)] != before
    g.clear_loras()
    assert [layout(m) for m in _models(sd1)] == before


def test_exact_restore_after_changing_weights_and_clearing(sd1, loras):
    from trainer.generate.engine import Generator, LoraSpec
    original = _state(_models(sd1))
    g = Generator(sd1)
    g.set_loras([LoraSpec(loras["a"], 0.8), LoraSpec(loras["b"], 0.6)])
    assert not _same_state(original, _state(_models(sd1)))
    g.set_loras([LoraSpec(loras["a"], 0.3)])
    changed = _state(_models(sd1))
    g.clear_loras()
    assert _same_state(original, _state(_models(sd1))), "unfusing must give the original weights bit for bit"
    g.set_loras([LoraSpec(loras["a"], 0.3)])
    assert _same_state(changed, _state(_models(sd1))), "re-fusing must start from the originals"
    g.set_loras([LoraSpec(loras["a"], 0.5)], mode="unfused")  # switching mode restores the fused weights first
    g.clear_loras()
    assert _same_state(original, _state(_models(sd1)))
    assert not any("lora" in n for m in _models(sd1) for n, _ in m.named_modules())


def test_exact_restore_in_half_precision(tiny_sd1_dir, loras):
    """bf16 layers: merged in fp32 and cast once; the originals still come back bit for bit."""
    from trainer.config import ModelConfig
    from trainer.generate.engine import Generator, LoraSpec
    from trainer.models.loading import load_base_model
    half = load_base_model(ModelConfig(base=str(tiny_sd1_dir)), dtype=torch.bfloat16, device="cpu")
    original = _state(_models(half))
    g = Generator(half)
    g.set_loras([LoraSpec(loras["a"], 0.8), LoraSpec(loras["b"], 0.6)])
    merged = _state(_models(half))
    assert not _same_state(original, merged)
    assert all(v.dtype == original[k].dtype for k, v in merged.items())
    g.set_loras([LoraSpec(loras["a"], 0.1)])
    g.clear_loras()
    assert _same_state(original, _state(_models(half)))


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_all_weights_zero_is_the_base_image(sd1, loras, mode):
    from trainer.generate.engine import Generator, LoraSpec
    g = Generator(sd1)
    base_img = g.generate("a castle", seed=4, **SIZE)[0]
    g.set_loras([LoraSpec(loras["a"], 0.0), LoraSpec(loras["b"], 0.0)], mode=mode)
    assert np.array_equal(_arr(base_img), _arr(g.generate("a castle", seed=4, **SIZE)[0]))
    g.clear_loras()


def test_separate_text_encoder_and_unet_weights(sd1, loras):
    from trainer.generate.engine import Generator, LoraSpec
    g = Generator(sd1)
    te_before = _state(sd1.text_encoders)
    unet_before = _state([sd1.unet])
    g.set_loras([LoraSpec(loras["a"], te_weight=0.0, unet_weight=1.0)])
    assert _same_state(te_before, _state(sd1.text_encoders))
    assert not _same_state(unet_before, _state([sd1.unet]))
    g.set_loras([LoraSpec(loras["a"], te_weight=1.0, unet_weight=0.0)])
    assert _same_state(unet_before, _state([sd1.unet]))
    assert not _same_state(te_before, _state(sd1.text_encoders))
    fused = g.generate("a castle", seed=5, **SIZE)[0]
    g.set_loras([LoraSpec(loras["a"], te_weight=1.0, unet_weight=0.0)], mode="unfused")
    unfused = g.generate("a castle", seed=5, **SIZE)[0]
    assert np.abs(_arr(fused) - _arr(unfused)).max() <= 2
    g.clear_loras()


def test_changing_weights_does_not_read_the_file_again(sd1, loras, monkeypatch, tmp_path):
    import shutil

    import trainer.lora.io as lora_io
    from trainer.generate.engine import Generator, LoraSpec
    reads = []
    real = lora_io.read_lora
    monkeypatch.setattr(lora_io, "read_lora", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    f = shutil.copy(loras["a"], tmp_path / "copy.safetensors")
    g = Generator(sd1)
    for w in (0.2, 0.4, 0.6):
        g.set_loras([LoraSpec(f, w)])
    g.set_loras([LoraSpec(f, 0.6)], mode="unfused")
    g.set_loras([LoraSpec(f, 0.1)], mode="unfused")
    assert len(reads) == 1
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10_000_000))  # the file changed on disk
    g.set_loras([LoraSpec(f, 0.1)])
    assert len(reads) == 2
    g.clear_loras()


# ------------------------------------------------------------------------------------------------ prompts, PNG


def test_prompt_tags_are_applied_and_stripped(sd1, loras):
    from trainer.generate.engine import Generator, LoraSpec
    g = Generator(sd1, lora_dir=loras["dir"])
    tagged = g.generate("<lora:style_a:0.8> a castle <lora:zxq-style:0.2>", seed=6, **SIZE)[0]
    g.set_loras([LoraSpec(loras["a"], 0.8), LoraSpec(loras["a"], 0.2)])  # zxq-style = ss_output_name of style_a
    explicit = g.generate("a castle", seed=6, **SIZE)[0]
    assert np.array_equal(_arr(tagged), _arr(explicit))
    g.clear_loras()
    assert np.abs(_arr(g.generate("a castle", seed=6, **SIZE)[0]) - _arr(explicit)).max() > 10
    with pytest.raises(UserError, match="not in the LoRA folder"):
        g.generate("<lora:nope:1> a castle", seed=6, **SIZE)


def test_png_parameters_chunk(sd1, loras, tmp_path):
    from trainer.generate.engine import Generator, LoraSpec, save_image
    from trainer.lora.io import lora_addnet_hash
    g = Generator(sd1, lora_dir=loras["dir"])
    g.set_loras([LoraSpec(loras["b"], te_weight=0.5, unet_weight=0.7)])
    images = g.generate("<lora:style_a:0.8> a castle", "blurry", seed=11, batch_size=2, sampler="euler_a", **SIZE)
    assert len(images) == 2
    paths = [save_image(im, tmp_path / f"img{i}.png") for i, im in enumerate(images)]
    text = Image.open(paths[1]).info["parameters"]
    lines = text.split("\n")
    assert lines[0] == "<lora:style_a:0.8> a castle <lora:char_b:0.5:0.7>"
    assert lines[1] == "Negative prompt: blurry"
    fields = lines[2]
    for part in ["Steps: 2", "Sampler: Euler a", "CFG scale: 5", "Seed: 12", "Size: 64x64", "Model: "]:
        assert part in fields
    ha, hb = lora_addnet_hash(loras["a"])[:12], lora_addnet_hash(loras["b"])[:12]
    assert f'Lora hashes: "char_b: {hb}, style_a: {ha}"' in fields
    # image 2 of the batch is image 1 of a run with seed + 1
    again = g.generate("<lora:style_a:0.8> a castle", "blurry", seed=12, sampler="euler_a", **SIZE)[0]
    assert np.abs(_arr(again) - _arr(images[1])).max() <= 2
    g.clear_loras()


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc"])
def test_samplers(sd1, sampler):
    from trainer.generate.engine import Generator
    img = Generator(sd1).generate("a castle", seed=1, sampler=sampler, **{**SIZE, "width": 72})[0]
    assert img.size == (72, 64)
    assert sampler.split("_")[0].lower() in img.info["parameters"].lower().replace("+", "p").replace(" ", "")


# ------------------------------------------------------------------------------------------------ grids


def test_weight_seed_grid(sd1, loras):
    from trainer.generate.engine import Generator
    g = Generator(sd1)
    res = g.grid_weight_seed(str(loras["a"]), [0, 0.5, 1], [1, 2], "a castle", **SIZE)
    assert res.col_labels == ["0", "0.5", "1"] and res.row_labels == ["1", "2"]
    assert res.col_title == "style_a weight" and res.row_title == "seed"
    w, h = res.image.size
    left, top = w - 3 * 64, h - 2 * 64
    assert left >= 64 and top > 8
    # a cell is exactly the image generate() makes for that seed and weight
    from trainer.generate.engine import LoraSpec
    g.set_loras([LoraSpec(loras["a"], 0.5)])
    single = g.generate("a castle", seed=2, **SIZE)[0]
    cell = res.image.crop((left + 64, top + 64, left + 128, top + 128))
    assert np.array_equal(_arr(cell), _arr(single))
    # labels are drawn (dark pixels in the margins), and the grid says what it shows
    margin = np.asarray(res.image.crop((0, 0, w, top)).convert("L"))
    assert (margin < 128).sum() > 20
    assert 'Grid: "rows seed [1; 2], columns style_a weight [0; 0.5; 1]"' in res.parameters
    g.clear_loras()


def test_checkpoint_and_prompt_grids(sd1, loras, tmp_path):
    import shutil

    from trainer.generate.engine import Generator, LoraSpec, list_lora_saves
    run = tmp_path / "run"
    run.mkdir()
    for n in ("my-step00000010", "my-step00000005", "my"):
        shutil.copy(loras["a"], run / f"{n}.safetensors")
    (run / "diffusers").mkdir()
    files = list_lora_saves(run)
    assert [f.name for f in files] == ["my-step00000005.safetensors", "my-step00000010.safetensors",
                                       "my.safetensors"]
    g = Generator(sd1)
    res = g.grid_checkpoint_weight(files, [0.5, 1], "a castle", seed=1, **SIZE)
    assert res.row_labels == ["step 5", "step 10", "my (final)"] and res.col_labels == ["0.5", "1"]
    assert res.image.size[1] - 3 * 64 > 0
    res = g.grid_prompt_lora(["a castle", "a dog"], [LoraSpec(loras["a"], 0.8), str(loras["b"])], seed=1, **SIZE)
    assert res.row_labels == ["a castle", "a dog"] and res.col_labels == ["base", "style_a 0.8", "char_b"]
    assert res.image.size[0] - 3 * 64 >= 64
    with pytest.raises(UserError):
        list_lora_saves(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ formats, errors


def test_wrong_family_is_refused(sd1, sdxl, loras):
    from trainer.generate.engine import Generator, LoraSpec
    with pytest.raises(UserError, match="(?i)sdxl"):
        Generator(sd1).set_loras([LoraSpec(loras["xl"], 1.0)])
    with pytest.raises(UserError, match="(?i)sd1|sd 1|sd1.5"):
        Generator(sdxl).set_loras([LoraSpec(loras["a"], 1.0)])


def test_missing_and_corrupt_files(sd1, tmp_path):
    from trainer.generate.engine import Generator, LoraSpec
    g = Generator(sd1)
    with pytest.raises(UserError, match="not found"):
        g.set_loras([LoraSpec(tmp_path / "nope.safetensors")])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError) as e:
        g.set_loras([LoraSpec(bad)])
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a number"):
        g.set_loras(["x.safetensors:abc"])


def test_sdxl_fused_unfused_and_restore(sdxl, loras):
    from trainer.generate.engine import Generator, LoraSpec
    original = _state(_models(sdxl))
    g = Generator(sdxl)
    base_img = g.generate("a castle", seed=2, **SIZE)[0]
    te2_before = _state([sdxl.text_encoders[1]])
    g.set_loras([LoraSpec(loras["xl"], 0.9)])
    assert not _same_state(te2_before, _state([sdxl.text_encoders[1]])), "lora_te2 must reach text_encoder_2"
    fused = g.generate("a castle", seed=2, **SIZE)[0]
    g.set_loras([LoraSpec(loras["xl"], 0.9)], mode="unfused")
    unfused = g.generate("a castle", seed=2, **SIZE)[0]
    assert np.abs(_arr(fused) - _arr(base_img)).max() > 10
    assert np.abs(_arr(fused) - _arr(unfused)).max() <= 2
    g.clear_loras()
    assert _same_state(original, _state(_models(sdxl)))


def test_diffusers_save_lora_weights_file_loads(sd1, tmp_path):
    """A file written by diffusers' own save_lora_weights (PEFT names, no alphas) loads and matches diffusers."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from trainer.generate.engine import Generator, LoraSpec
    from tests.fixtures.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False), pipe.text_encoder)
    g_ = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g_) * 0.3)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                                              safe_serialization=True)
    f = tmp_path / "pytorch_lora_weights.safetensors"
    g = Generator(sd1)
    g.set_loras([LoraSpec(f, 1.0)])
    ours = g.generate("a castle", seed=8, **SIZE)[0]
    g.clear_loras()
    # the same LoRA through diffusers' own loader on a fresh copy of the same tiny model
    ref = build_tiny_pipeline("sd1")
    ref.load_lora_weights(str(f))
    ref.set_progress_bar_config(disable=True)
    from trainer.generate.samplers import make_sampler
    ref.scheduler = make_sampler("euler", dict(sd1.scheduler_config))
    theirs = ref(prompt="a castle", num_inference_steps=SIZE["steps"], guidance_scale=SIZE["guidance_scale"],
                 width=64, height=64, generator=[torch.Generator("cpu").manual_seed(8)]).images[0]
    assert np.abs(_arr(ours) - _arr(theirs)).max() <= 2


def test_inspect_lora(loras, tmp_path):
    from trainer.generate.engine import format_inspection, inspect_lora
    from trainer.lora.io import lora_addnet_hash
    info = inspect_lora(loras["b"])
    assert info["family"] == "sd1"
    assert info["ranks"] == [8] and info["alphas"] == [8.0]
    assert info["addnet_hash"] == lora_addnet_hash(loras["b"])
    assert set(info["components"]) == {"unet", "text_encoder"}
    assert info["modules"] == sum(c["modules"] for c in info["components"].values())
    assert info["keys"] == 3 * info["modules"]
    text = format_inspection(info)
    assert "rank(s):     8" in text and info["short_hash"] in text
    assert inspect_lora(loras["xl"])["family"] == "sdxl"
    half = inspect_lora(make_lora(tmp_path / "half.safetensors", "sd1", 4, save_precision="fp16"))
    assert half["dtypes"] == ["float16"]


def test_unknown_keys_refused_unless_partial_allowed(sd1, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    from trainer.generate.engine import Generator, LoraSpec
    tensors = load_file(loras["a"])
    tensors["some_other_network.weight"] = torch.zeros(2)
    f = tmp_path / "extra.safetensors"
    save_file(tensors, f)
    with pytest.raises(UserError, match="some_other_network.weight"):
        Generator(sd1).set_loras([LoraSpec(f)])
    g = Generator(sd1, allow_partial=True)
    g.set_loras([LoraSpec(f, 0.5)])
    assert g.active_loras[0]["name"] == "extra"
    g.clear_loras()


def test_dyn_keeps_the_first_ranks_in_both_modes(sd1, loras):
    from trainer.generate.engine import Generator, LoraSpec
    g = Generator(sd1)
    g.set_loras([LoraSpec(loras["b"], 1.0)])
    full = g.generate("a castle", seed=9, **SIZE)[0]
    g.set_loras([LoraSpec(loras["b"], 1.0, dyn=2)])
    fused = g.generate("a castle", seed=9, **SIZE)[0]
    g.set_loras([LoraSpec(loras["b"], 1.0, dyn=2)], mode="unfused")
    unfused = g.generate("a castle", seed=9, **SIZE)[0]
    g.clear_loras()
    assert np.abs(_arr(fused) - _arr(unfused)).max() <= 2
    assert np.abs(_arr(fused) - _arr(full)).max() > 5


# ------------------------------------------------------------------------------------------------ memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("mode", ["unfused", "fused", "fused-reread"])
def test_rss_does_not_grow_over_load_generate_unload_cycles(sd1, loras, mode):
    """20 cycles of set LoRAs / generate / unload; "reread" also drops the RAM cache so files are read each time."""
    from trainer.generate.engine import Generator, LoraSpec
    g = Generator(sd1)
    specs = [LoraSpec(loras["a"], 0.7), LoraSpec(loras["b"], 0.4)]
    small = dict(width=64, height=64, steps=1, guidance_scale=5.0)

    def cycle():
        g.set_loras(specs, mode=mode.split("-")[0])
        g.generate("a castle", seed=1, **small)
        g.release() if mode.endswith("reread") else g.clear_loras()

    for _ in range(5):  # warm-up: allocator pools, caches, lazy imports
        cycle()
    gc.collect()
    before = _rss_mib()
    for _ in range(20):
        cycle()
    gc.collect()
    grown = _rss_mib() - before
    assert grown < 6, f"RSS grew by {grown:.1f} MiB over 20 cycles"


def test_grid_labels_stay_in_their_columns_however_long_the_lora_name():
    """The weight x seed grid of a LoRA named like a training save (demo-lora-step00000013) in 64 px cells: the
    title is drawn once across the top, and no column label crosses into its neighbour (the GUI showed them
    overlapping)."""
    from trainer.generate.engine import _wrap, make_grid
    cw = 64
    cells = [[Image.new("RGB", (cw, cw), (40 * i + 10 * j, 80, 120)) for j in range(5)] for i in range(2)]
    labels = ["0", "0.25", "0.5", "0.75", "demo-lora-step00000013"]
    grid = make_grid(cells, ["1", "2"], labels, row_title="seed", col_title="demo-lora-step00000013 weight")
    pixels = np.asarray(grid.convert("L"))
    top = grid.height - 2 * cw
    left = grid.width - 5 * cw
    assert (pixels[:top, left:] < 128).any()  # labels are drawn
    for j in range(1, 5):  # between two columns the label band is blank: no text runs across
        x = left + j * cw
        assert (pixels[top // 2:top, x - 1:x + 1] > 250).all(), f"a label crosses the border of column {j}"
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = lambda s: (probe.textbbox((0, 0), s, font=font)[2], 0)  # noqa: E731
    lines = _wrap("demo-lora-step00000013 weight", 40, size)
    assert all(size(line)[0] <= 40 for line in lines) and "".join(lines).replace(" ", "") == \
        "demo-lora-step00000013weight"
