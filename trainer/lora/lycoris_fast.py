"""Cheaper training forwards for peft's LoHa and LoKr layers, with the same maths.

peft computes a LoHa or LoKr layer as ``base(x) + F.linear(x, delta)`` (or ``F.conv2d``) with the delta weight rebuilt
in full at every step: an extra full-size matmul or convolution per layer, forward and backward (two more: the input
gradient and the delta's gradient). That is what made a LoHa/LoKr training step cost about twice a LoRA's.
The delta has structure that gives the same output for less (docs/lora-format.md, 'DoRA and LyCORIS'):

* LoHa: ``(w1a @ w1b) * (w2a @ w2b)`` equals ``U @ V`` with ``U[o, p*r2+q] = w1a[o, p] * w2a[o, q]`` and
  ``V[p*r2+q, k] = w1b[p, k] * w2b[q, k]``: a LoRA of rank r1*r2. Applied as two thin matmuls (or a conv with V as the
  kernel and a 1x1 conv with U) on each call where that is cheaper than rebuilding and applying the dense delta.
* LoKr: ``kron(w1, w2) @ x`` is ``w1 @ X @ w2.T`` with x seen as a (b, d) matrix; for a conv, a convolution with w2
  on each of the b channel groups, then w1 across the groups.

* LoHa, where the rank-r1*r2 pair costs more than the layer itself (narrow layers, many positions): the delta is
  folded into the base weight for the call, ``F.linear(x, W + delta)``: the forward is one matmul instead of two and
  the backward two (the input's and the folded weight's gradient) instead of three. Only with an fp32 base and no
  autocast: in bf16/fp16, ``W + delta`` would round a small delta away, so there the separate forms stay.

Only the order of the sums changes (float rounding, not the function). The file, the saved delta, merging and the
generator are untouched: they all use peft's ``get_delta_weight``. Layers this does not cover (Tucker convs, grouped
or non-zero-padded convs, Conv1d) keep peft's own code.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _row_drop(layer, adapter: str, n_out: int, dtype, device, kind: str):
    """The rank-dropout mask over output rows, drawn exactly as peft's get_delta_weight draws it (same RNG calls)."""
    if not (layer.training and bool(layer.rank_dropout[adapter])):
        return None
    p = layer.rank_dropout[adapter]
    if kind == "loha":
        drop = (torch.rand(n_out) > p).to(dtype)
        drop /= drop.mean()
    else:
        drop = (torch.rand(n_out) > p).float()
        if layer.rank_dropout_scale[adapter]:
            drop /= drop.mean()
    return drop.to(device)


def _apply_drop(y, drop, channel_dim: int):
    if drop is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y * drop.view(shape).to(y.dtype)


def _conv_kw(base):
    return dict(stride=base.stride, padding=base.padding, dilation=base.dilation)


def _loha_factors(layer, a: str):
    w1a, w1b = layer.hada_w1_a[a], layer.hada_w1_b[a]
    w2a, w2b = layer.hada_w2_a[a], layer.hada_w2_b[a]
    out, r1, r2 = w1a.shape[0], w1a.shape[1], w2a.shape[1]
    u = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, r1 * r2)
    v = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, w1b.shape[1])
    return u, v


def _loha_low_rank_pays(layer, adapter: str, x: torch.Tensor) -> bool:
    """Multiply-adds of one forward: the rank-r1*r2 pair (building U and V, then two thin products over the t
    positions of x) against the dense delta (two rank-r products rebuilding it, then one full product)."""
    base = layer.get_base_layer()
    r1, r2 = layer.hada_w1_a[adapter].shape[1], layer.hada_w2_a[adapter].shape[1]
    n_out, n_in = base.weight.shape[0], layer.hada_w1_b[adapter].shape[1]   # n_in: in * kh * kw for a conv
    t = _positions(base, x)
    r = r1 * r2
    return (t + 1) * r * (n_in + n_out) < (t + r1 + r2) * n_in * n_out


def _loha_fold_pays(layer, adapter: str, x: torch.Tensor) -> bool:
    """Multiply-adds beyond the base layer's, forward and backward: the rank-r1*r2 pair (about three products of it
    over the t positions) against the folded weight (its gradient, one full product over t, plus rebuilding the
    delta from the factors, forward and backward)."""
    base = layer.get_base_layer()
    if type(base) not in (torch.nn.Linear, torch.nn.Conv2d) or base._forward_hooks or base._forward_pre_hooks:
        return False
    if base.weight.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
        return False  # W + delta in half precision would round a small delta away
    r1, r2 = layer.hada_w1_a[adapter].shape[1], layer.hada_w2_a[adapter].shape[1]
    n_out, n_in = base.weight.shape[0], layer.hada_w1_b[adapter].shape[1]
    t = _positions(base, x)
    return t * n_in * n_out + 3 * (r1 + r2) * n_in * n_out < 3 * (t + 1) * r1 * r2 * (n_in + n_out)


def _positions(base, x: torch.Tensor) -> int:
    if isinstance(base, torch.nn.Conv2d):
        return x.shape[0] * x.shape[-2] * x.shape[-1] // (base.stride[0] * base.stride[1])
    return x.numel() // x.shape[-1]


def _loha_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoHa forward, except that a call where folding pays computes ``base(x) + delta(x)`` as one
    ``F.linear(x, W + delta)`` (or conv). Module dropout and rank dropout draw what peft's forward draws."""
    active = [a for a in self.active_adapters if a in self._available_adapters]
    if self.disable_adapters or self.merged or len(active) != 1 or args or kwargs \
            or not _loha_fold_pays(self, active[0], x):
        return type(self).forward(self, x, *args, **kwargs)
    a, base = active[0], self.get_base_layer()
    if self.training and not torch.rand(1) > self.module_dropout[a]:
        return base(x)
    w1a, w1b, w2a, w2b = self.hada_w1_a[a], self.hada_w1_b[a], self.hada_w2_a[a], self.hada_w2_b[a]
    delta = ((w1a @ w1b) * (w2a @ w2b) * self.scaling[a]).reshape(base.weight.shape)
    drop = _row_drop(self, a, delta.shape[0], delta.dtype, delta.device, "loha")
    if drop is not None:
        delta = delta * drop.view(-1, *[1] * (delta.dim() - 1))
    w = base.weight.to(delta.dtype) + delta
    xc = self._cast_input_dtype(x, delta.dtype)
    if isinstance(base, torch.nn.Conv2d):
        y = F.conv2d(xc, w, base.bias, base.stride, base.padding, base.dilation, base.groups)
    else:
        y = F.linear(xc, w, base.bias)
    return y.to(x.dtype)


def _loha_delta(self, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _loha_low_rank_pays(self, adapter, x):
        return type(self)._get_delta_activations(self, adapter, x, *args, **kwargs)  # peft's dense delta
    base = self.get_base_layer()
    u, v = _loha_factors(self, adapter)
    drop = _row_drop(self, adapter, u.shape[0], u.dtype, u.device, "loha")
    x = self._cast_input_dtype(x, u.dtype)
    s = self.scaling[adapter]
    if isinstance(base, torch.nn.Conv2d):
        k = v.reshape(v.shape[0], base.in_channels, *base.kernel_size)
        y = F.conv2d(F.conv2d(x, k, **_conv_kw(base)), u[:, :, None, None]) * s
        return _apply_drop(y, drop, 1)
    y = F.linear(F.linear(x, v), u) * s
    return _apply_drop(y, drop, -1)


def _lokr_w(layer, a: str, which: str):
    d = getattr(layer, f"lokr_{which}")
    if a in d:
        return d[a]
    return getattr(layer, f"lokr_{which}_a")[a] @ getattr(layer, f"lokr_{which}_b")[a]


def _lokr_delta(self, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    w1, w2 = _lokr_w(self, adapter, "w1"), _lokr_w(self, adapter, "w2")
    a_, b_ = w1.shape
    c_ = w2.shape[0]
    drop = _row_drop(self, adapter, a_ * c_, w1.dtype, w1.device, "lokr")
    x = self._cast_input_dtype(x, w1.dtype)
    s = self.scaling[adapter]
    if isinstance(base, torch.nn.Conv2d):
        d_ = base.in_channels // b_
        k = w2.reshape(c_, d_, *base.kernel_size)
        n = x.shape[0]
        z = F.conv2d(x.reshape(n * b_, d_, *x.shape[2:]), k, **_conv_kw(base))   # w2 on each group of d channels
        z = z.reshape(n, b_, c_, *z.shape[2:])
        y = torch.einsum("ij,njc...->nic...", w1, z).reshape(n, a_ * c_, *z.shape[3:]) * s
        return _apply_drop(y, drop, 1)
    d_ = w2.shape[1]
    xs = x.reshape(*x.shape[:-1], b_, d_)
    y = torch.matmul(w1, torch.matmul(xs, w2.t()))      # (..., a, c): w1 @ X @ w2.T
    return _apply_drop(y.reshape(*x.shape[:-1], a_ * c_) * s, drop, -1)


def install(layer, adapter: str) -> bool:
    """Give one peft LoHa/LoKr layer the structured forward when it applies; True if it did. A LoHa layer takes,
    call by call, the cheapest of: the folded weight (fp32 only), the rank-r1*r2 pair, peft's dense delta. The
    instance methods shadow the class's ``_get_delta_activations`` (and, for LoHa, ``forward``, which hands every
    call it does not fold to peft's own), so module dropout, merging and disabling are peft's."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            return False
    elif not isinstance(base, torch.nn.Linear):
        return False
    if isinstance(layer, LoHaLayer):
        if adapter in layer.hada_t1 or adapter not in layer.hada_w1_a:
            return False
        layer._get_delta_activations = types.MethodType(_loha_delta, layer)
        layer.forward = types.MethodType(_loha_forward, layer)
        return True
    if isinstance(layer, LoKrLayer):
        if adapter in layer.lokr_t2:
            return False
        layer._get_delta_activations = types.MethodType(_lokr_delta, layer)
        return True
    return False
