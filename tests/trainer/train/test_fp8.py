"""train.fp8_base (trainer/models/fp8.py): the frozen UNet's Linear/Conv weights are one byte each, a run trains
about as the full-precision one does with every adapter type, and stop + resume is exact (checkpoints hold the
adapter only)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import config as C
from trainer.errors import UserError
from trainer.models.fp8 import FP8, UNET_KEEP, store_fp8, weight_bytes
from trainer.train.recipe import train

from tests.fixtures.runs import tiny_overrides, train_seeing_base

SMALL = {"data.resolution": 64, "data.max_bucket_px": 128, "train.batch_size": 1}


def test_full_size_sd15_unet_weights_fall_to_at_most_55_percent_of_bf16():
    from diffusers import UNet2DConditionModel

    from benchmarks.train_speed import SD15_UNET
    with torch.device("meta"):  # the real architecture's shapes, no memory
        unet = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16).requires_grad_(False)
    before = weight_bytes(unet)
    store_fp8(unet, torch.bfloat16, keep=UNET_KEEP)
    assert weight_bytes(unet) <= 0.55 * before
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == FP8
    assert unet.dtype == torch.bfloat16  # what diffusers' pipelines read


def _losses(cfg) -> tuple[list[float], object]:
    losses, res, base = train_seeing_base(cfg)
    return losses, (res, base)


def test_10_steps_lose_as_much_as_the_full_precision_run(tiny_sd1_dir, image_folder, tmp_path):
    runs = {}
    for fp8 in (False, True):
        cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / str(fp8), steps=10,
                                                 **SMALL, **{"train.fp8_base": fp8, "lora.train_text_encoder": False}))
        runs[fp8] = _losses(cfg)
    (ref, (_, base32)), (got, (res, base8)) = runs[False], runs[True]
    assert len(got) == len(ref) == 10 and res.status == "completed"
    mean_ref, mean_got = sum(ref) / 10, sum(got) / 10
    assert abs(mean_got - mean_ref) <= 0.05 * mean_ref, (mean_ref, mean_got)
    assert weight_bytes(base8.unet) < 0.5 * weight_bytes(base32.unet)  # fp32 run: the base is 4 bytes a weight


@pytest.mark.parametrize("kind,suffix", [("locon", "lora_down"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1"),
                                         ("dora", "dora_scale")])
def test_every_adapter_type_trains_over_fp8_weights(kind, suffix, tiny_sd1_dir, image_folder, tmp_path):
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path, steps=2, **SMALL, **{
        "lora.type": kind, "lora.conv_rank": 2, "train.fp8_base": True, "lora.train_text_encoder": False}))
    losses, (res, base) = _losses(cfg)
    assert res.status == "completed" and len(losses) == 2 and all(0 < v < 10 for v in losses)
    out = load_file(str(res.lora_path))
    assert any(f".{suffix}" in k for k in out) and all(torch.isfinite(t).all() for t in out.values())
    layer = base.unet.down_blocks[0].resnets[0].conv1  # a LoCon/LyCORIS conv: peft's wrapper over the fp8 conv
    assert layer.get_base_layer().weight.dtype == FP8


def test_stop_and_resume_equals_uninterrupted_and_checkpoints_hold_the_adapter_only(tiny_sd1_dir, image_folder,
                                                                                    tmp_path):
    sets = {**SMALL, "train.fp8_base": True, "train.fp8_base_text_encoder": True, "train.save_every_steps": 2,
            "train.mixed_precision": "bf16"}
    ref = train(C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "a", steps=3, **sets)))
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "b", steps=3, **sets))
    step = {"n": 0}
    stopped = train(cfg, on_event=lambda e: e.type == "step" and step.update(n=e.step),
                    should_stop=lambda: step["n"] >= 2)
    assert stopped.status == "stopped"
    ckpt = sorted((cfg.run_dir / "checkpoints").glob("step-*"))[-1]
    with safe_open(str(ckpt / "lora_state.safetensors"), "pt") as f:  # adapter tensors only, never the base
        assert all(f.get_slice(k).get_dtype() != "F8_E4M3" for k in f.keys())
        assert not any("base_layer" in k for k in f.keys())
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed" and resumed.step == 3
    a, b = load_file(str(ref.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and any("lora_te" in k for k in a)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in a.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_fp8_text_encoder_alone_is_a_one_line_error(tiny_sd1_dir, image_folder, tmp_path):
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path, steps=1,
                                             **{"train.fp8_base_text_encoder": True}))
    with pytest.raises(UserError, match="train.fp8_base_text_encoder") as e:
        train(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_straight_to_fp8_gives_the_weights_of_a_full_load_then_conversion(tiny_sd1_dir, dtype):
    from diffusers import UNet2DConditionModel

    from trainer.models.fp8 import load_unet_fp8
    ref = UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet", torch_dtype=dtype).eval()
    ref.requires_grad_(False)
    store_fp8(ref, dtype, keep=UNET_KEEP)
    got = load_unet_fp8(tiny_sd1_dir, dtype)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # bit for bit, fp8 included
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert [type(m) for m in ref.modules()] == [type(m) for m in got.modules()]
    assert not any(p.requires_grad or p.is_meta for p in got.parameters()) and got.dtype == dtype
    x, ctx = torch.randn(1, 4, 8, 8, dtype=dtype), torch.randn(1, 77, 32, dtype=dtype)
    assert torch.equal(ref(x, 10, ctx).sample, got(x, 10, ctx).sample)


def test_an_fp8_run_from_a_diffusers_folder_never_holds_the_full_precision_unet(tiny_sd1_dir, image_folder,
                                                                                 tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel
    loaded = []
    real = UNet2DConditionModel.from_pretrained.__func__
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(a) or real(cls, *a, **k)))
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path, steps=2, **SMALL, **{
        "train.fp8_base": True, "lora.train_text_encoder": False}))
    losses, (res, base) = _losses(cfg)
    assert res.status == "completed" and len(losses) == 2 and not loaded  # read straight into fp8
    assert base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.get_base_layer().weight.dtype == FP8


def test_the_reused_upcast_buffer_gives_the_same_outputs_and_gradients(monkeypatch):
    """On CPU the large fp8 weights are upcast into one reused buffer (trainer/models/fp8.py, _upcast). A stack of
    fp8 convs and linears, where each layer's upcast overwrites the previous one's before the backward pass runs,
    must give bit for bit the outputs and input gradients of fresh upcasts."""
    from trainer.models import fp8

    def run(min_numel):
        monkeypatch.setattr(fp8, "_SCRATCH_MIN", min_numel)
        monkeypatch.setattr(fp8, "_scratch", {})
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 3, padding=1),
                                  torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 32), torch.nn.Linear(32, 5))
        net.requires_grad_(False)
        store_fp8(net, torch.float32)
        x = torch.randn(2, 4, 6, 6, requires_grad=True)
        y = net(x)
        y.square().sum().backward()
        return y.detach(), x.grad, dict(fp8._scratch)

    fresh_y, fresh_g, none = run(1 << 62)
    reused_y, reused_g, used = run(0)
    assert not none and used  # the second run really went through the buffer
    assert torch.equal(fresh_y, reused_y) and torch.equal(fresh_g, reused_g)
