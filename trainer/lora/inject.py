"""Inject trainable PEFT LoRA layers into a frozen SD UNet and CLIP text encoders (docs/lora-format.md, 'Which modules we train')."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

from trainer.lora.keymap import TE_COMPONENTS
from trainer.lora.kinds import check_adapter_options

UNET_ATTENTION_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                          "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
UNET_KOHYA_EXTRA = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_ATTENTION_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
TE_MLP_TARGETS = ("mlp.fc1", "mlp.fc2")


@dataclass
class LoraHandles:
    """What the training loop and the exporter need after injection."""
    adapter_name: str
    unet_params: list[torch.nn.Parameter]
    text_encoder_params: list[list[torch.nn.Parameter]]
    #: (component, live module path, peft LoRA layer); component is "unet", "text_encoder" or "text_encoder_2"
    modules: list[tuple[str, str, torch.nn.Module]] = field(default_factory=list)
    peft_configs: dict = field(default_factory=dict)

    def scaling_of(self, component: str, module_path: str) -> float:
        for comp, path, layer in self.modules:
            if comp == component and path == module_path:
                return float(layer.scaling[self.adapter_name])
        raise KeyError(f"{component}:{module_path} has no LoRA")

    @property
    def all_params(self) -> list[torch.nn.Parameter]:
        return self.unet_params + [p for ps in self.text_encoder_params for p in ps]


def _is_class(module, name: str) -> bool:
    return type(module).__name__ == name


def unet_target_module_names(unet, lora_cfg) -> tuple[list[str], list[str]]:
    """(all target module paths, the subset that gets the conv rank/alpha) for a diffusers UNet."""
    targets: list[str] = []
    conv_targets: list[str] = []
    wanted = UNET_ATTENTION_TARGETS + (UNET_KOHYA_EXTRA if lora_cfg.unet_targets == "kohya" else ())
    for name, module in unet.named_modules():
        # kohya only looks inside Transformer2DModel for the attention/ff/proj layers
        if _is_class(module, "Transformer2DModel"):
            for sub, child in module.named_modules():
                if not sub or not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                if sub in ("proj_in", "proj_out"):
                    hit = "proj_in" in wanted
                else:
                    hit = any(sub.endswith("." + w) for w in wanted) and ".transformer_blocks." in "." + sub
                if hit:
                    targets.append(f"{name}.{sub}")
        elif conv_rank_of(lora_cfg) > 0 and _is_class(module, "ResnetBlock2D"):
            # LoCon (docs/lora-format.md, 'Which modules we train'): 3x3 convs at the conv rank; the Linear/1x1 layers
            # of the block at the normal rank
            for sub in ("conv1", "time_emb_proj", "conv2", "conv_shortcut"):
                child = getattr(module, sub, None)
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    targets.append(f"{name}.{sub}")
                    if _is_spatial_conv(child):
                        conv_targets.append(f"{name}.{sub}")
        elif conv_rank_of(lora_cfg) > 0 and (_is_class(module, "Downsample2D") or _is_class(module, "Upsample2D")):
            child = getattr(module, "conv", None)
            if isinstance(child, torch.nn.Conv2d):
                targets.append(f"{name}.conv")
                if _is_spatial_conv(child):
                    conv_targets.append(f"{name}.conv")
    return targets, conv_targets


def _is_spatial_conv(module) -> bool:
    """A 3x3 (not 1x1) conv: these get the LoCon rank."""
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def text_encoder_target_module_names(text_encoder, lora_cfg) -> list[str]:
    wanted = TE_ATTENTION_TARGETS + (TE_MLP_TARGETS if lora_cfg.text_encoder_targets == "attention_mlp" else ())
    return [name for name, module in text_encoder.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in "." + name
            and any(name.endswith("." + w) for w in wanted)]


def untrainable_te_layers(family: str, clip_skip: int) -> list[int]:
    """How many of the last layers of each text encoder can get no gradient, because the model reads an earlier
    hidden state: SD1/SD2 read ``hidden_states[-clip_skip]`` (1 = the last layer), SDXL's first encoder reads
    ``hidden_states[-(clip_skip + 1)]`` (the penultimate layer by default), while its second encoder's pooled
    output comes from its final layer, so all of it trains (see TextConditioner in trainer/train/recipe.py).
    LoRA layers there would ship as zeros; ComfyUI showed them on our SDXL files."""
    if family == "sdxl":
        return [clip_skip, 0]
    return [clip_skip - 1]


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _drop_last_layers(te, tcfg, n_drop: int) -> None:
    """Take the LoRA back out of the last ``n_drop`` encoder layers (put the base Linear back in place) and out
    of the config. Injected first and removed after, so the random draws of every other layer's init, and with
    them the tensors of every other module, are the same as without the removal."""
    if n_drop <= 0:
        return
    n_layers = te.config.num_hidden_layers
    keep = []
    for name in list(tcfg.target_modules):
        m = _LAYER_INDEX.search(name)
        if m and int(m.group(1)) >= n_layers - n_drop:
            parent, _, child = name.rpartition(".")
            layer = te.get_submodule(name)
            setattr(te.get_submodule(parent), child, layer.get_base_layer())
        else:
            keep.append(name)
    tcfg.target_modules = keep


def conv_rank_of(lora_cfg) -> int:
    """The rank of the 3x3 convs: ``conv_rank``; ``locon`` without one uses ``rank`` (0 = convs not trained)."""
    if lora_cfg.conv_rank > 0:
        return lora_cfg.conv_rank
    return lora_cfg.rank if getattr(lora_cfg, "type", "lora") == "locon" else 0


def conv_alpha_of(lora_cfg) -> float:
    return lora_cfg.conv_alpha or conv_rank_of(lora_cfg)


def _peft_config(targets: list[str], conv_targets: list[str], lora_cfg, shapes: dict | None = None):
    """The peft config of the chosen type (docs/lora-format.md, 'DoRA and LyCORIS'); ``shapes`` (target -> base
    weight shape) sizes LoKr's full-matrix mode."""
    kind = getattr(lora_cfg, "type", "lora")
    # kohya trains alpha 0 as alpha = rank (docs/lora-format.md, 'Alpha and scale'); doing the same keeps the file's
    # alpha meaningful everywhere
    alpha = lora_cfg.alpha or lora_cfg.rank
    conv_rank, conv_alpha = conv_rank_of(lora_cfg), conv_alpha_of(lora_cfg)
    rank_pattern = {p: conv_rank for p in conv_targets}
    alpha_pattern = {p: conv_alpha for p in conv_targets}
    if kind in ("loha", "lokr"):
        from peft import LoHaConfig, LoKrConfig
        common = dict(r=lora_cfg.rank, alpha=alpha, rank_dropout=lora_cfg.rank_dropout,
                      module_dropout=lora_cfg.module_dropout, target_modules=list(targets),
                      use_effective_conv2d=bool(lora_cfg.use_tucker), init_weights=True)
        if kind == "loha":
            return LoHaConfig(**common, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        if lora_cfg.lokr_full_matrix:
            # peft keeps a factor full when r >= half its larger side: a rank that large (alpha equal, scale 1)
            # makes both factors full, LyCORIS' full_matrix
            for p in targets:
                big = max(int(d) for d in (shapes or {}).get(p, (1 << 16,))[:2])
                rank_pattern[p] = alpha_pattern[p] = big
        return LoKrConfig(**common, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                          decompose_both=bool(lora_cfg.lokr_decompose_both),
                          decompose_factor=int(lora_cfg.lokr_factor), rank_dropout_scale=True)
    from peft import LoraConfig as PeftLoraConfig
    # exact module paths, so nothing outside the intended blocks is ever matched by a short name
    return PeftLoraConfig(
        r=lora_cfg.rank, lora_alpha=alpha, lora_dropout=lora_cfg.dropout, target_modules=list(targets),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True,
        **({"use_dora": True} if kind == "dora" else {}))


def _is_adapter_layer(module, adapter_name: str) -> bool:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer
    if isinstance(module, LoraLayer):
        return adapter_name in module.lora_A
    return isinstance(module, LycorisLayer) and adapter_name in module._available_adapters


def iter_lora_layers(model, adapter_name: str):
    """(name, peft layer) of every adapter layer: LoRA/DoRA (peft LoraLayer) or LoHa/LoKr (peft LycorisLayer)."""
    for name, module in model.named_modules():
        if _is_adapter_layer(module, adapter_name):
            yield name, module


def adapter_tensors(layer, adapter_name: str) -> dict[str, "torch.nn.Parameter"]:
    """A peft layer's trainable tensors of one adapter by their peft name (``lora_A``, ``hada_w1_a``, ...)."""
    from peft.tuners.lora import LoraLayer
    if isinstance(layer, LoraLayer):
        out = {"lora_A": layer.lora_A[adapter_name].weight, "lora_B": layer.lora_B[adapter_name].weight}
        mag = getattr(layer, "lora_magnitude_vector", None)
        if mag is not None and adapter_name in mag:
            out["magnitude"] = mag[adapter_name].weight
        return out
    return {n: getattr(layer, n)[adapter_name] for n in layer.adapter_layer_names
            if adapter_name in getattr(layer, n)}


def _finish(model, adapter_name: str, component: str, handles_modules: list) -> list[torch.nn.Parameter]:
    """Freeze the base, make the adapter fp32 and trainable; return its parameters in a stable order."""
    from peft.tuners.lora import LoraLayer
    params: list[torch.nn.Parameter] = []
    for name, layer in iter_lora_layers(model, adapter_name):
        if isinstance(layer, LoraLayer):
            subs = [layer.lora_A[adapter_name], layer.lora_B[adapter_name]]
            mag = getattr(layer, "lora_magnitude_vector", None)
            if mag is not None and adapter_name in mag:
                from trainer.lora.dora import use_column_dora
                subs.append(use_column_dora(layer, adapter_name))
            for sub in subs:
                # fp32 master weights over a fp16/bf16 base (docs/lora-format.md, 'dtypes')
                sub.float()
                for p in sub.parameters():
                    p.requires_grad_(True)
                    params.append(p)
        else:  # LoHa / LoKr: ParameterDicts
            for p in adapter_tensors(layer, adapter_name).values():
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
            from trainer.lora.lycoris_fast import install
            install(layer, adapter_name)  # the same output without rebuilding the full delta each step
        handles_modules.append((component, name, layer))
    return params


def inject_lora(unet, text_encoders: list, lora_cfg, *, train_text_encoder: bool,
                adapter_name: str = "default", skip_last_layers: Sequence[int] = ()) -> LoraHandles:
    """Add a LoRA adapter to the UNet (and the text encoders when trained); the base stays frozen.
    ``skip_last_layers[i]``: the number of last layers of text encoder i that get no LoRA because they cannot
    train (``untrainable_te_layers``)."""
    from peft import inject_adapter_in_model

    check_adapter_options(lora_cfg)
    unet.requires_grad_(False)
    for te in text_encoders:
        te.requires_grad_(False)
    modules: list = []
    configs: dict = {}

    targets, conv_targets = unet_target_module_names(unet, lora_cfg)
    ucfg = _peft_config(targets, conv_targets, lora_cfg, _shapes(unet, targets))
    # diffusers' add_adapter also registers the config so set_adapters/save_lora_weights work on it
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(ucfg, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(ucfg, unet, adapter_name)
    configs["unet"] = ucfg
    unet_params = _finish(unet, adapter_name, "unet", modules)

    te_params: list[list[torch.nn.Parameter]] = []
    for i, te in enumerate(text_encoders):
        if not train_text_encoder:
            te_params.append([])
            continue
        te_targets = text_encoder_target_module_names(te, lora_cfg)
        tcfg = _peft_config(te_targets, [], lora_cfg, _shapes(te, te_targets))
        # transformers 5's add_adapter wants peft>=0.22; peft's own injection works on any version
        inject_adapter_in_model(tcfg, te, adapter_name)
        _drop_last_layers(te, tcfg, skip_last_layers[i] if i < len(skip_last_layers) else 0)
        configs[TE_COMPONENTS[i]] = tcfg
        te_params.append(_finish(te, adapter_name, TE_COMPONENTS[i], modules))
    return LoraHandles(adapter_name, unet_params, te_params, modules, configs)


def _shapes(model, targets) -> dict:
    return {p: tuple(model.get_submodule(p).weight.shape) for p in targets}


@contextmanager
def adapters_off(*models):
    """Every adapter layer of the models (LoRA, DoRA, LoHa, LoKr; any adapter name) answers as its base layer for
    the duration: what the base model alone predicts (the inverted-mask prior's target). The trainable tensors and
    their requires_grad are untouched (peft's enable_adapters would reset them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def lora_modules(unet, text_encoders: list, adapter_name: str = "default") -> list[tuple[str, str, torch.nn.Module]]:
    """(component, live path, peft layer) of every LoRA layer of one adapter, UNet first."""
    out = [("unet", name, layer) for name, layer in iter_lora_layers(unet, adapter_name)]
    for i, te in enumerate(text_encoders):
        if te is not None:
            out += [(TE_COMPONENTS[i], name, layer) for name, layer in iter_lora_layers(te, adapter_name)]
    return out
