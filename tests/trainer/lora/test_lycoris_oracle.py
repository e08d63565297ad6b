"""LoHa, LoKr and DoRA checked against the real implementation, the ``lycoris-lora`` package (docs/lora-format.md,
'DoRA and LyCORIS'): the update LyCORIS' own functions compute from the tensors of our files equals ours, and files
LyCORIS' own network code writes (saved as kohya's ``lycoris.kohya`` does) give our generator the update LyCORIS
applies. Linear and 3x3 conv layers, tiny SD1 and SDXL models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer.lora.io import match_modules, read_lora, save_lora

from tests.fixtures.lora_files import metadata_for, one_torch_thread, text_encoders_of  # noqa: F401
from tests.fixtures.tiny_models import build_tiny_pipeline

lycoris = pytest.importorskip("lycoris")

from lycoris.functional import general as ly_general  # noqa: E402
from lycoris.functional import locon as ly_locon  # noqa: E402
from lycoris.functional import loha as ly_loha  # noqa: E402
from lycoris.functional import lokr as ly_lokr  # noqa: E402

# (lora.type, options) as our trainer writes them
OURS = [("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {}), ("lokr", {"lokr_full_matrix": True}),
        ("lokr", {"lokr_decompose_both": True, "use_tucker": True, "lokr_factor": 4}), ("dora", {})]


def _lycoris_delta(t: dict, weight: torch.Tensor) -> torch.Tensor:
    """ΔW of one module's file tensors by LyCORIS' functional code; scale alpha/rank the way readers take it."""
    g = lambda k: t[k].float() if k in t else None  # noqa: E731
    alpha = float(t["alpha"])
    if "hada_w1_a" in t:
        d = ly_loha.diff_weight(g("hada_w1_b"), g("hada_w1_a"), g("hada_w2_b"), g("hada_w2_a"), g("hada_t1"),
                                g("hada_t2"), gamma=alpha / t["hada_w1_b"].shape[0])
        return d.reshape(weight.shape)
    if any(k.startswith("lokr_") for k in t):
        rank = next((t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t), None)
        d = ly_lokr.kron_weight(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"),
                                g("lokr_w2_b"), g("lokr_t2"), scale=alpha / rank if rank else 1.0)
        return d.reshape(weight.shape)
    d = ly_locon.diff_weight(g("lora_down.weight"), g("lora_up.weight"), g("lora_mid.weight"),
                             gamma=alpha / t["lora_down.weight"].shape[0]).reshape(weight.shape)
    merged = ly_general.weight_decompose(weight.float() + d, g("dora_scale"), 1, wd_on_out=False)
    return merged - weight.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lycoris_computes_our_files_delta(family, tmp_path):
    from tests.fixtures.lora_files import lora_cfg
    from trainer.lora.inject import inject_lora

    for kind, options in OURS:
        pipe = build_tiny_pipeline(family)
        tes = text_encoders_of(pipe)
        torch.manual_seed(0)
        handles = inject_lora(pipe.unet, tes, lora_cfg(type=kind, **options), train_text_encoder=True)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in handles.all_params:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        path = save_lora(tmp_path / f"{kind}.safetensors", pipe.unet, tes, family=family,
                         metadata=metadata_for(family), save_precision="fp32").path
        tensors = load_file(str(path))
        lf = read_lora(path)
        layers = match_modules(lf, pipe.unet, tes, family=family)
        kinds, convs = set(), 0
        for key, lm in lf.modules.items():
            name = lm.keys[0].split(".", 1)[0]
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
            w = layers[key].weight.detach()
            ref = _lycoris_delta(mine, w)
            assert _rel(lm.delta(1.0, w.shape, base_weight=w), ref) < 1e-5, (kind, options, key)
            kinds.add(lm.label)
            convs += w.dim() == 4 and w.shape[-1] == 3
        assert convs > 0 and len(kinds) >= 1, (kind, kinds)


_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

# what LyCORIS' own network writes (kohya's --network_module lycoris.kohya --network_args ...)
THEIRS = [("loha", {}), ("loha", {"use_tucker": "True"}), ("lokr", {}), ("lokr", {"full_matrix": "True"}),
          ("lokr", {"use_tucker": "True", "factor": "4"}), ("locon", {"dora_wd": "True", "wd_on_output": "False"}),
          ("locon", {"dora_wd": "True"})]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_files_lycoris_writes_load_in_our_generator_with_its_delta(family, tmp_path):
    from lycoris.kohya import create_network

    from trainer.generate.engine import Generator, LoraSpec

    preset = tmp_path / "preset.toml"
    preset.write_text(_PRESET)
    for algo, args in THEIRS:
        pipe = build_tiny_pipeline(family)
        tes = text_encoders_of(pipe)
        torch.manual_seed(0)
        te_arg = tes if len(tes) > 1 else tes[0]
        net = create_network(1.0, 4, 2.0, None, te_arg, pipe.unet, algo=algo, conv_dim=2, conv_alpha=1.0,
                             preset=str(preset), **args)
        net.apply_to(te_arg, pipe.unet, True, True)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        path = tmp_path / f"{algo}.safetensors"
        net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
        modules = net.unet_loras + net.text_encoder_loras
        with torch.no_grad():  # what LyCORIS applies, taken before anything patches the weights
            want = {m.lora_name: ((m.get_merged_weight(1.0, shape=m.org_weight.shape)[0] - m.org_weight) if m.wd
                                  else m.get_weight(m.org_weight.shape)).detach().float() for m in modules}
        # (apply_to only wraps the layers' forward; their weights are the base weights the generator patches)

        lf = read_lora(path)
        assert len(lf.modules) == len(modules)
        layers = match_modules(lf, pipe.unet, tes, family=family)
        base = {id(layer): layer.weight.detach().clone() for layer in layers.values()}
        by_name = {lm.keys[0].split(".", 1)[0]: key for key, lm in lf.modules.items()}
        gen = Generator(_Base(pipe, family))
        gen.set_loras([LoraSpec(lf, 1.0)])
        for name, delta in want.items():
            layer = layers[by_name[name]]
            got = layer.weight.detach().float() - base[id(layer)].float()
            assert _rel(got, delta.reshape(got.shape)) < 1e-5, (algo, args, name)
        gen.clear_loras()
        assert all(torch.equal(layer.weight, base[id(layer)]) for layer in layers.values())


class _Base:
    """The little of a loaded base model the generator needs to patch weights."""

    def __init__(self, pipe, family):
        self.unet, self.family = pipe.unet, family
        self.text_encoders = text_encoders_of(pipe)
