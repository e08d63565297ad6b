"""Optimizers and learning-rate schedules by name, plus safetensors-only optimizer state (no pickles)."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from trainer.errors import UserError


def make_optimizer(name: str, param_groups: list[dict], *, lr: float, weight_decay: float):
    """param_groups: [{'params': [...], 'lr': x}, ...] (UNet and text-encoder LoRA have their own lr)."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:  # ImportError, or its own CUDA set-up failure
            raise UserError(f"train.optimizer: adamw8bit needs bitsandbytes ({type(e).__name__}: {e}); "
                            "install it with pip install bitsandbytes, or use adamw", field="train.optimizer") from None
        if not torch.cuda.is_available():
            raise UserError("train.optimizer: adamw8bit runs on a CUDA GPU only; use adamw on this machine",
                            field="train.optimizer")
        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("train.optimizer: prodigy needs the prodigyopt package (pip install prodigyopt)",
                            field="train.optimizer") from None
        # Prodigy estimates the step size itself; lr acts as a multiplier (1.0 is the usual value).
        return Prodigy(param_groups, lr=lr, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    if name == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise UserError("train.optimizer: lion needs the lion-pytorch package (pip install lion-pytorch)",
                            field="train.optimizer") from None
        return Lion(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor
        # Fixed lr (relative_step off) so the schedule and learning_rate mean what they say.
        return Adafactor(param_groups, lr=lr, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    raise UserError(f"train.optimizer: unknown optimizer {name!r}", field="train.optimizer")


def lr_lambda(name: str, warmup: int, total: int, cycles: int):
    """Multiplier of the base lr at a step: linear warm-up, then the named decay (diffusers' definitions)."""
    def f(step: int) -> float:
        if step < warmup:
            return float(step + 1) / float(max(1, warmup))
        if name == "constant":
            return 1.0
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
        raise UserError(f"train.lr_scheduler: unknown schedule {name!r}", field="train.lr_scheduler")
    return f


def make_scheduler(optimizer, name: str, *, warmup_steps: int, total_steps: int, num_cycles: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup_steps, total_steps, num_cycles))


# ------------------------------------------------------------------ optimizer state as safetensors + JSON

def optimizer_state_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Split an optimizer state_dict into tensors (for safetensors) and a JSON string of everything else."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            name = f"{idx}.{k}"
            if torch.is_tensor(v):
                tensors[name] = v.detach().cpu().contiguous()
            else:
                scalars[name] = v
    return tensors, json.dumps({"scalars": scalars, "param_groups": state["param_groups"]}, default=_jsonable)


def tensors_to_optimizer_state(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    info = json.loads(meta)
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = t
    for name, v in info["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = tuple(v) if isinstance(v, list) else v
    groups = info["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _jsonable(v):
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return str(v)
