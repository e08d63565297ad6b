"""Map the modules of a read LoRA file to the live layers of a loaded model, refusing what does not fit."""

from __future__ import annotations

import logging

import torch

from trainer.errors import UserError
from trainer.lora.form import FAMILY_LABELS, LoraFile, LoraModule, _few, is_row_scale
from trainer.lora.keymap import TE_COMPONENTS
from trainer.lora.reader import _metadata_family

log = logging.getLogger(__name__)


def _family_class(family: str) -> str:
    return "sdxl" if family == "sdxl" else "sd1"


def _lookup(root, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _base_layer(module):
    # a model that already carries PEFT adapters wraps the original layer
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _fits(mod: LoraModule, layer) -> bool:
    w = getattr(layer, "weight", None)
    if w is None or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    if mod.dora_scale is not None and not _dora_fits(mod.dora_scale, w.shape):
        return False
    if mod.kind != "lora":  # LoHa/LoKr: the update's element count per output, and its kernel where it has one
        out, n_in, kernel = mod.out_in()
        if out != w.shape[0] or n_in != int(w[0].numel()):
            return False
        return kernel is None or kernel == tuple(w.shape[2:])
    out_features, in_total = w.shape[0], int(w[0].numel())
    if mod.up.shape[0] != out_features:
        return False
    if isinstance(layer, torch.nn.Conv2d):
        if mod.down.dim() == 2:  # Linear-shaped factors for a 1x1 conv (SD2/SDXL-style proj_in on SD1)
            return tuple(w.shape[2:]) == (1, 1) and mod.down.shape[1] == w.shape[1]
        if mod.down.shape[1] != w.shape[1]:
            return False
        kernel = tuple(mod.mid.shape[2:]) if mod.mid is not None else tuple(mod.down.shape[2:])
        return kernel == tuple(w.shape[2:])
    return int(mod.down[0].numel()) == in_total and mod.mid is None


def _shapes(mod: LoraModule) -> str:
    parts = [f"{k} {tuple(v.shape)}" for k, v in mod.factors.items()] if mod.kind != "lora" else \
        [f"LoRA down {tuple(mod.down.shape)} up {tuple(mod.up.shape)}"]
    if mod.dora_scale is not None:
        parts.append(f"dora_scale {tuple(mod.dora_scale.shape)}")
    return ", ".join(parts)


def _dora_fits(scale: torch.Tensor, shape) -> bool:
    """A DoRA scale of one magnitude per input column ([1, in, 1, 1] / [1, in]) or per output row ([out, ...])."""
    if is_row_scale(scale, shape):
        return True
    return int(scale.shape[0]) == 1 and scale.numel() == int(shape[1])


def match_modules(lora_file: LoraFile, unet, text_encoders: list, *, family: str,
                  allow_partial: bool = False) -> dict[str, torch.nn.Module]:
    """Map every module of a read LoRA to the live base layer (nn.Linear / nn.Conv2d) it patches."""
    name = lora_file.path.name
    want = _family_class(family)
    if lora_file.family is not None and lora_file.family != want:
        raise UserError(f"{name} is a LoRA for {FAMILY_LABELS[lora_file.family]} models, but the loaded base "
                        f"model is {FAMILY_LABELS[want]}; pick a {FAMILY_LABELS[lora_file.family]} base model "
                        f"or another LoRA", path=str(lora_file.path))
    claimed = _metadata_family(lora_file.metadata)
    if claimed is not None and claimed != want:
        # the tensors fit (checked below) but the file says otherwise: tell the user, do not refuse
        # (docs/lora-format.md, 'What we read')
        log.warning("%s: its metadata says it is for %s models, but its layers fit the loaded %s model",
                    name, FAMILY_LABELS[claimed], FAMILY_LABELS[want])
    roots = {"unet": unet}
    for i, te in enumerate(text_encoders or []):
        roots[TE_COMPONENTS[i]] = te
    matched: dict[str, torch.nn.Module] = {}
    missing: list[str] = []
    misfit: list[str] = []
    for key, mod in lora_file.modules.items():
        component, _, mpath = key.partition(":")
        root = roots.get(component)
        layer = None
        if root is not None:
            layer = _lookup(root, mpath)
            if layer is None and mpath.startswith("text_model."):  # transformers 5 CLIPTextModel
                layer = _lookup(root, mpath[len("text_model."):])
        if layer is None:
            missing.append(key)
            continue
        layer = _base_layer(layer)
        if not _fits(mod, layer):
            w = getattr(layer, "weight", None)
            misfit.append(f"{key} ({_shapes(mod)} vs layer {tuple(w.shape) if w is not None else type(layer).__name__})")
            continue
        matched[key] = layer
    if misfit and not allow_partial:
        raise UserError(f"{name}: {len(misfit)} LoRA modules do not fit the loaded model's layers, so the LoRA was "
                        f"made for a different base model (e.g. {_few(misfit, 2)})", path=str(lora_file.path))
    if missing and not allow_partial:
        raise UserError(f"{name}: {len(missing)} LoRA modules have no matching layer in the loaded model: "
                        f"{_few(missing)}", path=str(lora_file.path))
    return matched
