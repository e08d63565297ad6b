"""Extract a LoRA from a fine-tuned model: per layer, the rank-R SVD of TUNED - BASE (docs/lora-format.md,
'LoRA tools')."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from trainer.errors import UserError
from trainer.lora.keymap import TE_COMPONENTS, UnetLayout, te_canonical_path
from trainer.lora.tools import EXTRACT_THRESHOLD
from trainer.lora.tools.resize import check_layer_rank
from trainer.lora.tools.svd import Dynamic, check_rank, choose_rank, energy, svd_of_matrix, to_module
from trainer.lora.tools.write import (ModuleReport, ToolResult, base_metadata, check_output, tool_metadata,
                                      write_lora)


def _load(source: str | Path, what: str):
    from trainer.config import ModelConfig
    from trainer.models.loading import load_base_model
    try:
        return load_base_model(ModelConfig(base=str(source)), dtype=torch.float32)
    except UserError as e:
        raise UserError(f"--{what}: {e}") from None


def target_layers(model, *, convs: bool) -> list[tuple[str, str, str, bool]]:
    """(module key, component, live path, is a 3x3 conv) of every layer a LoRA of ours can patch: the UNet's
    attention, proj and ff layers (and with ``convs`` its resnet and sampler layers), and each text encoder's
    attention and MLP projections (docs/lora-format.md, 'Which modules we train')."""
    from trainer.config import LoraConfig
    from trainer.lora.inject import text_encoder_target_module_names, unet_target_module_names

    cfg = LoraConfig(unet_targets="kohya", text_encoder_targets="attention_mlp", conv_rank=1 if convs else 0)
    targets, conv_targets = unet_target_module_names(model.unet, cfg)
    conv_set = set(conv_targets)
    out = [(f"unet:{p}", "unet", p, p in conv_set) for p in targets]
    for i, te in enumerate(model.text_encoders):
        for p in text_encoder_target_module_names(te, cfg):
            out.append((f"{TE_COMPONENTS[i]}:{te_canonical_path(p)}", TE_COMPONENTS[i], p, False))
    return out


def _weight(root, path: str, key: str, name: str) -> torch.Tensor:
    try:
        layer = root.get_submodule(path)
    except AttributeError:
        raise UserError(f"module {key}: {name} has no such layer; the two models have different "
                        "architectures") from None
    return layer.weight.detach()


def _file_hash(source: str) -> str | None:
    from trainer.lora.io import lora_addnet_hash
    p = Path(source).expanduser()
    if p.is_file() and p.suffix.lower() == ".safetensors":
        try:
            return lora_addnet_hash(p)
        except UserError:
            return None
    return None


def extract_lora(tuned: str | Path, base: str | Path, out: str | Path, *, rank: int, conv_rank: int | None = None,
                 threshold: float = EXTRACT_THRESHOLD, dynamic: Dynamic | None = None, save_precision: str = "fp16",
                 overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> ToolResult:
    """Write the LoRA whose delta best approximates ``tuned`` - ``base`` (Frobenius norm, per layer) to ``out``.

    Both models are single files, diffusers folders or hub ids, loaded in fp32 by the project's loader; see
    :func:`extract_from_models` for the rest.
    """
    _check_args(rank, conv_rank, threshold)
    out = check_output(out, overwrite=overwrite)
    tuned_model = _load(tuned, "tuned")
    base_model = _load(base, "base")
    sources = [{"role": "tuned", "model": tuned_model.name, "sshs_model_hash": _file_hash(str(tuned))},
               {"role": "base", "model": base_model.name, "sshs_model_hash": _file_hash(str(base))}]
    return extract_from_models(tuned_model, base_model, out, rank=rank, conv_rank=conv_rank, threshold=threshold,
                               dynamic=dynamic, save_precision=save_precision, overwrite=overwrite,
                               progress=progress, sources=sources)


def _check_args(rank: int, conv_rank: int | None, threshold: float) -> None:
    check_rank(rank)
    if conv_rank is not None and conv_rank < 0:
        raise UserError(f"--conv-rank: must be 0 (no conv layers) or more, got {conv_rank}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise UserError(f"--threshold: must be 0 or more, got {threshold}")


def extract_from_models(tuned_model, base_model, out: str | Path, *, rank: int, conv_rank: int | None = None,
                        threshold: float = EXTRACT_THRESHOLD, dynamic: Dynamic | None = None,
                        save_precision: str = "fp16", overwrite: bool = False,
                        progress: Callable[[int, int], None] | None = None,
                        sources: list[dict] | None = None) -> ToolResult:
    """Extract from two loaded models (``BaseModel``-like: unet, text_encoders, family, prediction_type, name).

    Each target layer's difference is formed on its own, left out when ||ΔW|| / ||W_base|| < ``threshold``, else
    cut to ``rank`` (3x3 convs to ``conv_rank``, default ``rank``; 0 leaves the resnet and sampler layers out) by
    an SVD (:func:`trainer.lora.tools.svd.svd_of_matrix`). Output alpha = rank (scale 1).
    """
    _check_args(rank, conv_rank, threshold)
    if conv_rank is None:
        conv_rank = rank
    out = check_output(out, overwrite=overwrite)
    if tuned_model.family != base_model.family:
        raise UserError(f"--tuned {tuned_model.name} is an {tuned_model.family} model but --base "
                        f"{base_model.name} is an {base_model.family} model")
    if len(tuned_model.text_encoders) != len(base_model.text_encoders):
        raise UserError(f"{tuned_model.name} and {base_model.name} have different text encoders")

    roots = {"unet": (tuned_model.unet, base_model.unet)}
    for i, comp in enumerate(TE_COMPONENTS[:len(base_model.text_encoders)]):
        roots[comp] = (tuned_model.text_encoders[i], base_model.text_encoders[i])
    layers = target_layers(base_model, convs=conv_rank > 0)
    modules, reports, left_out = {}, [], []
    with torch.no_grad():
        for i, (key, component, path, is_conv) in enumerate(layers):
            t_root, b_root = roots[component]
            w_base = _weight(b_root, path, key, base_model.name).float()
            w_tuned = _weight(t_root, path, key, tuned_model.name).float()
            if w_base.shape != w_tuned.shape:
                raise UserError(f"module {key}: {tuned_model.name} has shape {tuple(w_tuned.shape)}, "
                                f"{base_model.name} {tuple(w_base.shape)}; the models do not match")
            delta = w_tuned - w_base
            norm = float(delta.norm())
            if norm == 0.0 or norm < threshold * float(w_base.norm()):
                left_out.append(key)
            else:
                r = conv_rank if is_conv else rank
                shape = tuple(delta.shape)
                check_layer_rank(r, key, min(shape[0], math.prod(shape[1:])), shape,
                                 "--conv-rank" if is_conv else "--rank")
                # sv_cumulative needs every singular value; the other rules the leading ones and the norm
                full = dynamic is not None and dynamic.mode == "sv_cumulative"
                svd = svd_of_matrix(delta, None if full else r)
                k = choose_rank(svd.s, r, dynamic, total=norm * norm)
                modules[key] = to_module(svd, k)
                reports.append(ModuleReport(key, min(shape[0], math.prod(shape[1:])), k, norm * norm,
                                            min(energy(svd.s, k), norm * norm)))
            del delta, w_base, w_tuned
            if progress:
                progress(i + 1, len(layers))
    if not modules:
        raise UserError(f"{tuned_model.name} differs from {base_model.name} in no layer by more than "
                        f"--threshold {threshold:g} (relative); nothing to extract")

    family = base_model.family
    md = base_metadata(family, base_model.prediction_type)
    md["ss_sd_model_name"] = base_model.name
    sources = sources or [{"role": "tuned", "model": tuned_model.name}, {"role": "base", "model": base_model.name}]
    md = tool_metadata("extract", modules, sources=sources, inherited=md, title=out.stem, family=family,
                       args={"rank": rank, "conv_rank": conv_rank, "threshold": threshold,
                             "dynamic": str(dynamic) if dynamic else None, "precision": save_precision,
                             "left_out": len(left_out)})
    written = write_lora(out, modules, family=family, metadata=md, save_precision=save_precision,
                         overwrite=overwrite, layout=UnetLayout.from_unet(base_model.unet))
    return ToolResult(written, reports, left_out)
