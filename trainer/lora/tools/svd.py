"""The maths the LoRA tools share: a module as a low-rank pair, exact thin SVDs, rank choice, factors back
(docs/lora-format.md, 'LoRA tools')."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.errors import UserError
from trainer.lora.io import LoraModule
from trainer.lora.tools import DYNAMIC_MODES


@dataclass(frozen=True)
class Dynamic:
    """A dynamic rank rule: ``sv_fro=0.9`` keeps 90 % of the Frobenius norm, ``sv_cumulative=0.9`` 90 % of the sum
    of singular values, ``sv_ratio=20`` every singular value at least the largest / 20."""
    mode: str
    value: float

    def __str__(self) -> str:
        return f"{self.mode}={self.value:g}"


def parse_dynamic(text: str | None, flag: str = "--dynamic") -> Dynamic | None:
    """``"sv_fro=0.9"`` -> Dynamic; None or "" -> None; anything else a one-line UserError."""
    if not text:
        return None
    mode, sep, raw = str(text).partition("=")
    mode = mode.strip()
    if not sep or mode not in DYNAMIC_MODES:
        raise UserError(f"{flag}: {text!r} is not MODE=VALUE with MODE one of {', '.join(DYNAMIC_MODES)}")
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{flag}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag}: {mode} must be above 0, got {raw}")
    if mode == "sv_ratio" and value < 1:
        raise UserError(f"{flag}: sv_ratio is largest / smallest kept singular value, so at least 1, got {raw}")
    if mode != "sv_ratio" and value > 1:
        raise UserError(f"{flag}: {mode} is a share of the module's norm, so at most 1, got {raw}")
    return Dynamic(mode, value)


def check_rank(rank: int | None, flag: str = "--rank") -> None:
    if rank is not None and rank < 1:
        raise UserError(f"{flag}: the rank must be at least 1, got {rank}")


# ------------------------------------------------------------------------------------------ low-rank form

@dataclass
class LowRank:
    """ΔW = a @ b, the scale folded in: ``a`` [out, r], ``b`` [r, in·kh·kw]; ``kernel`` () for Linear."""
    a: torch.Tensor
    b: torch.Tensor
    kernel: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.b.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        """In channels (without the kernel)."""
        k = math.prod(self.kernel) if self.kernel else 1
        return int(self.b.shape[1]) // k

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def max_rank(self) -> int:
        """The rank of a full matrix of the layer's (flattened) shape."""
        return min(int(self.a.shape[0]), int(self.b.shape[1]))


def same_layer(x: LowRank, y: LowRank) -> bool:
    """Two modules patch layers of the same shape (a Linear-shaped pair fits a 1x1 conv)."""
    def norm(s):
        return s[:2] if tuple(s[2:]) in ((), (1, 1)) else s
    return norm(x.weight_shape) == norm(y.weight_shape)


def low_rank(mod: LoraModule, weight: float = 1.0) -> LowRank:
    """A module as weight · ΔW = a @ b. A LyCORIS Tucker core is absorbed into ``b``, exactly: ΔW's flattened
    rows are up @ (core contracted with down), so a Tucker module is a plain conv LoRA of the same rank."""
    r = mod.rank
    a = mod.up.float().reshape(mod.up.shape[0], -1) * float(weight * mod.scale)
    if mod.mid is not None:
        b = torch.einsum("nmkl,mj->njkl", mod.mid.float(), mod.down.float().reshape(r, -1))
        return LowRank(a, b.reshape(r, -1), tuple(int(k) for k in mod.mid.shape[2:]))
    kernel = tuple(int(k) for k in mod.down.shape[2:]) if mod.down.dim() == 4 else ()
    return LowRank(a, mod.down.float().reshape(r, -1), kernel)


def refuse_dora(mod: LoraModule, key: str, source, tool: str) -> None:
    """A DoRA module cannot be resized or merged: its update depends on the base weight, which a LoRA file does
    not carry. One line naming the file and the module."""
    if mod.dora_scale is not None:
        name = getattr(source, "name", None) or str(source)
        raise UserError(f"{name}: module {key} is {mod.label}, whose update depends on the base model's weight, which "
                        f"a LoRA file alone does not have; {tool} cannot take DoRA files (bake it into a checkpoint "
                        f"with 'lorastudio lora bake' instead)", path=str(source))


def delta_pair(w: torch.Tensor) -> LowRank:
    """A full delta ([out, in] or [out, in, kh, kw]) as an exact pair of its numerical rank: a = U·S, b = Vᵀ from
    a float64 SVD, singular values at or below max(shape) · fp32 epsilon · the largest dropped (rounding)."""
    kernel = tuple(int(k) for k in w.shape[2:])
    m = w.reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    tol = float(s[0]) * max(m.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    k = max(1, int((s > tol).sum()))
    return LowRank((u[:, :k] * s[:k]).float(), vh[:k].float().contiguous(), kernel)


def low_rank_of(mod: LoraModule, weight: float = 1.0, *, key: str = "", source="", tool: str = "") -> LowRank:
    """Any module the tools take as weight · ΔW = a @ b: LoRA/LoCon/Tucker exactly from the factors, LoHa/LoKr
    from the SVD of their full delta (:func:`delta_pair`, exact to rounding); DoRA refused (:func:`refuse_dora`)."""
    refuse_dora(mod, key, source, tool)
    if mod.kind == "lora":
        return low_rank(mod, weight)
    return delta_pair(mod.delta(weight))


def stack(parts: list[LowRank]) -> LowRank:
    """The sum of several deltas of one layer as one pair of the summed rank (exact)."""
    first = parts[0]
    kernel = first.kernel
    return LowRank(torch.cat([p.a for p in parts], dim=1), torch.cat([p.b for p in parts], dim=0), kernel)


@dataclass
class Svd:
    """ΔW = u @ diag(s) @ vh with s descending."""
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    kernel: tuple[int, ...] = ()


def svd_of_pair(lr: LowRank) -> Svd:
    """The thin SVD of a @ b without forming the product: QR of both factors, SVD of the small r x r core
    (float64, so a file's own rank comes back to rounding)."""
    a, b = lr.a.double(), lr.b.double()
    qa, ra = torch.linalg.qr(a)             # a = qa ra
    qb, rb = torch.linalg.qr(b.T)           # b = rb^T qb^T
    uc, s, vch = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return Svd(qa @ uc, s, vch @ qb.T, lr.kernel)


#: extra columns and power iterations of the randomized SVD of a full delta (docs/lora-format.md, 'LoRA tools')
OVERSAMPLE, POWER_ITERATIONS = 8, 4


def svd_of_matrix(w: torch.Tensor, rank: int | None = None) -> Svd:
    """The thin SVD of a full delta ([out, in] or [out, in, kh, kw], flattened to [out, in·kh·kw]).

    With ``rank``, only the leading ``rank`` + OVERSAMPLE triplets are computed when the matrix is much larger
    than that (randomized range finder with power iterations, ``torch.svd_lowrank``): exact for a delta of at
    most that rank, and minutes faster than a full SVD on SD-sized convs."""
    kernel = tuple(int(k) for k in w.shape[2:])
    m = w.reshape(w.shape[0], -1).float()
    if rank is not None and min(m.shape) > 2 * (rank + OVERSAMPLE):
        with torch.random.fork_rng(devices=[]):  # the same file every run, the caller's RNG untouched
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(m, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
        return Svd(u, s, v.T, kernel)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return Svd(u, s, vh, kernel)


def choose_rank(s: torch.Tensor, rank: int | None, dynamic: Dynamic | None, total: float | None = None) -> int:
    """How many singular values to keep: ``rank`` caps it (and is it without ``dynamic``), never above len(s),
    at least 1. ``total``: the squared Frobenius norm of the whole delta when ``s`` holds only the leading
    values (enough for sv_fro and sv_ratio, not for sv_cumulative)."""
    n = int(s.numel())
    cap = n if rank is None else min(rank, n)
    if dynamic is None or n == 0:
        return max(1, cap)
    s = s.double()
    if float(s[0]) <= 0:
        return 1
    if dynamic.mode == "sv_ratio":
        k = int((s >= s[0] / dynamic.value).sum())
    elif dynamic.mode == "sv_cumulative":
        share = torch.cumsum(s, 0) / s.sum()
        k = int(torch.searchsorted(share, torch.tensor(dynamic.value, dtype=share.dtype) - 1e-12)) + 1
    else:  # sv_fro: the kept part's Frobenius norm is at least value x the whole's
        share = torch.cumsum(s * s, 0) / (total if total else (s * s).sum())
        k = int(torch.searchsorted(share, torch.tensor(dynamic.value ** 2, dtype=share.dtype) - 1e-12)) + 1
    return max(1, min(k, cap))


def energy(s: torch.Tensor, k: int | None = None) -> float:
    """Sum of squared singular values (the first ``k``): the squared Frobenius norm of that part."""
    s = s.double()
    return float((s[:k] * s[:k]).sum()) if k is not None else float((s * s).sum())


def pair_energy(lr: LowRank) -> float:
    """||a @ b||_F² from the r x r Gram matrices, without forming the product."""
    a, b = lr.a.double(), lr.b.double()
    return float(((a.T @ a) * (b @ b.T)).sum())


def to_module(svd: Svd, k: int, *, scale: float = 1.0) -> LoraModule:
    """The first ``k`` singular triplets as a LoRA module with alpha/rank = ``scale``: the factors carry
    sqrt(s / scale) each, so they have the same size (good for fp16) and the delta is u s vh."""
    if not (math.isfinite(scale) and scale > 0):
        scale = 1.0
    root = torch.sqrt(svd.s[:k].double() / scale)
    up = (svd.u[:, :k].double() * root).float()
    down = (root[:, None] * svd.vh[:k].double()).float()
    if svd.kernel:
        up = up.reshape(up.shape[0], k, 1, 1)
        down = down.reshape(k, -1, *svd.kernel)
    return LoraModule(down.contiguous(), up.contiguous(), float(scale * k))


def pair_to_module(lr: LowRank) -> LoraModule:
    """A low-rank pair as it is (alpha = rank, scale 1), with conv shapes for a conv layer."""
    r = lr.rank
    up, down = lr.a, lr.b
    if lr.kernel:
        up = up.reshape(up.shape[0], r, 1, 1)
        down = down.reshape(r, -1, *lr.kernel)
    return LoraModule(down.contiguous(), up.contiguous(), float(r))
