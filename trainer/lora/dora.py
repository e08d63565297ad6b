"""DoRA as A1111 and ComfyUI apply it: one magnitude per input column (docs/lora-format.md, 'DoRA and LyCORIS').

peft's ``use_dora`` builds the LoRA factors and a magnitude per output row; neither A1111 (which only knows the
column form) nor ComfyUI (whose row form divides by the base weight's norms) renders that form exactly. So after
peft has built the layer its magnitude module is swapped for :class:`ColumnDora`, the form LyCORIS trains with
``wd_on_out=False``:

    W' = m * (W + s·BA) / ||W + s·BA||_col        (m: [in], the norm over the outputs and the kernel)

and the layer's output is ``base(x) + conv_or_linear(x, W' - W)``. As in the DoRA paper and peft, the norm is
treated as a constant in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _column_norm(w: torch.Tensor) -> torch.Tensor:
    """||w[:, j, ...]|| for every input column j (over the outputs and the kernel), shape [in]."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def _view(vec: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return vec.view(1, -1, *[1] * (w.dim() - 2))


class ColumnDora(torch.nn.Module):
    """The magnitude of one DoRA layer, per input column; called by peft's DoRA variant in place of its own."""

    def __init__(self, layer, adapter_name: str):
        super().__init__()
        w = self.merged(layer, adapter_name, magnitude=False)
        self.weight = torch.nn.Parameter(_column_norm(w).detach().float(), requires_grad=True)

    @staticmethod
    def lora_weight(layer, adapter_name: str) -> torch.Tensor:
        """s·BA in the base weight's shape, fp32."""
        base = layer.get_base_layer().weight
        a = layer.lora_A[adapter_name].weight
        b = layer.lora_B[adapter_name].weight
        ba = b.reshape(b.shape[0], -1).float() @ a.reshape(a.shape[0], -1).float()
        return ba.reshape(base.shape) * layer.scaling[adapter_name]

    def merged(self, layer, adapter_name: str, magnitude: bool = True) -> torch.Tensor:
        """W' (``magnitude``) or W + s·BA, fp32."""
        w0 = layer.get_base_layer().weight.float()
        m = w0 + self.lora_weight(layer, adapter_name)
        if not magnitude:
            return m
        norm = _column_norm(m).detach() + torch.finfo(torch.float32).eps
        return m * _view(self.weight / norm, m)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        w0 = base_layer.weight.float()
        ba = lora_B.weight.reshape(lora_B.weight.shape[0], -1).float() @ \
            lora_A.weight.reshape(lora_A.weight.shape[0], -1).float()
        m = w0 + ba.reshape(w0.shape) * scaling
        norm = _column_norm(m).detach() + torch.finfo(torch.float32).eps
        delta = (m * _view(self.weight / norm, m) - w0).to(x.dtype)
        if isinstance(base_layer, torch.nn.Conv2d):
            return F.conv2d(x, delta, None, base_layer.stride, base_layer.padding, base_layer.dilation,
                            base_layer.groups)
        return F.linear(x, delta)


def use_column_dora(layer, adapter_name: str) -> ColumnDora:
    """Replace peft's per-row magnitude of ``layer`` by the per-column one (initialised to ||W + s·BA||_col)."""
    col = ColumnDora(layer, adapter_name)
    layer.lora_magnitude_vector[adapter_name] = col
    return col


def dora_delta(layer, adapter_name: str) -> torch.Tensor:
    """W' - W of a trained column-DoRA layer, fp32 (what the file must encode)."""
    col = layer.lora_magnitude_vector[adapter_name]
    w0 = layer.get_base_layer().weight.float()
    return col.merged(layer, adapter_name) - w0
