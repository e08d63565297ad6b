"""The internal form every LoRA file is read into, and the file hash (docs/lora-format.md, 'What we read', 'Hashes')."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.common.names import FAMILIES
from trainer.common.safetensors_header import header_length
from trainer.errors import UserError

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float": torch.float32}
FAMILY_LABELS = {"sd1": "SD1.x/SD2.x", "sdxl": "SDXL"}


@dataclass
class LoraModule:
    """One adapter module normalised to fp32 tensors; ``rank`` always comes from the tensors (docs/lora-format.md,
    'Alpha and scale', 'DoRA and LyCORIS').

    ``kind`` is the tensor form: ``lora`` (``down``/``up``, optional Tucker ``mid``: LoRA and LoCon), ``loha``
    (``factors`` hada_w1_a/b, hada_w2_a/b, optional hada_t1/t2) or ``lokr`` (``factors`` lokr_w1 or lokr_w1_a/b,
    lokr_w2 or lokr_w2_a/b, optional lokr_t2). Any kind may carry a DoRA magnitude ``dora_scale``:
    ``[1, in(, 1, 1)]`` (per input column, what we write) or ``[out(, 1, 1, 1)]`` / ``[out]`` (per output row).
    """
    down: torch.Tensor | None
    up: torch.Tensor | None
    alpha: float
    mid: torch.Tensor | None = None
    keys: tuple[str, ...] = ()
    format: str = ""
    kind: str = "lora"
    #: the LoHa/LoKr tensors by their file name (``hada_w1_a``, ``lokr_w1``, ...); empty for ``lora``
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """The rank that alpha divides: LoRA's ``down`` rows, LoHa's ``hada_w1_b`` rows, LoKr's decomposed factor;
        a LoKr with both factors full has no rank (its scale is 1) and reports the Kronecker product's bound."""
        f = self.factors
        if self.kind == "loha":
            return int(f["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            for k in ("lokr_w2_b", "lokr_w1_b"):  # the order ComfyUI takes it in
                if k in f:
                    return int(f[k].shape[0])
            w1, w2 = f["lokr_w1"], f["lokr_w2"]
            return int(min(w1.shape[:2]) * min(w2.shape[0], w2[0].numel()))
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha/rank; 1 for a LoKr whose factors are both full (the readers ignore alpha there)."""
        if self.kind == "lokr" and "lokr_w1_b" not in self.factors and "lokr_w2_b" not in self.factors:
            return 1.0
        return self.alpha / self.rank

    @property
    def is_plain(self) -> bool:
        """Exactly up @ down (no Tucker core, no DoRA, not LoHa/LoKr): what low-rank tools and adapters take."""
        return self.kind == "lora" and self.mid is None and self.dora_scale is None

    @property
    def label(self) -> str:
        base = {"lora": "LoCon" if self.mid is not None or (self.down is not None and self.down.dim() == 4
                                                             and self.down.shape[-1] > 1) else "LoRA",
                "loha": "LoHa", "lokr": "LoKr"}[self.kind]
        return base + ("+DoRA" if self.dora_scale is not None else "")

    def out_in(self) -> tuple[int, int, tuple[int, ...] | None]:
        """(out features, input elements per output, kernel or None) of the update, from the tensor shapes alone."""
        f = self.factors
        if self.kind == "lora":
            kernel = tuple(self.mid.shape[2:]) if self.mid is not None else (
                tuple(self.down.shape[2:]) if self.down.dim() == 4 else None)
            n_in = int(self.down[0].numel()) * (int(math.prod(kernel)) if self.mid is not None else 1)
            return int(self.up.shape[0]), n_in, kernel
        if self.kind == "loha":
            if "hada_t1" in f:  # Tucker: w?_a [r, out], w?_b [r, in], t [r, r, kh, kw]
                kernel = tuple(f["hada_t1"].shape[2:])
                return int(f["hada_w1_a"].shape[1]), int(f["hada_w1_b"].shape[1] * math.prod(kernel)), kernel
            return int(f["hada_w1_a"].shape[0]), int(f["hada_w1_b"].shape[1]), None
        w1 = self._lokr_w1()
        b, d, kernel = self._lokr_w2_dims()
        return int(w1.shape[0] * b), int(w1.shape[1] * d), kernel

    def _lokr_w1(self) -> torch.Tensor:
        f = self.factors
        return f["lokr_w1"].float() if "lokr_w1" in f else f["lokr_w1_a"].float() @ f["lokr_w1_b"].float()

    def _lokr_w2_dims(self) -> tuple[int, int, tuple[int, ...] | None]:
        """(rows, elements per row, kernel or None) of LoKr's second factor."""
        f = self.factors
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
            return int(w2.shape[0]), int(w2[0].numel()), (tuple(w2.shape[2:]) if w2.dim() == 4 else None)
        if "lokr_t2" in f:  # Tucker: w2_a [r, b], w2_b [r, d], t2 [r, r, kh, kw]
            kernel = tuple(f["lokr_t2"].shape[2:])
            return int(f["lokr_w2_a"].shape[1]), int(f["lokr_w2_b"].shape[1] * math.prod(kernel)), kernel
        return int(f["lokr_w2_a"].shape[0]), int(f["lokr_w2_b"].shape[1]), None

    def _raw(self) -> torch.Tensor:
        """The update before alpha/rank, multiplier and DoRA, fp32, in the tensors' own layout."""
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "lora":
            up = self.up.float().reshape(self.up.shape[0], -1)
            down = self.down.float().reshape(self.down.shape[0], -1)
            if self.mid is not None:
                return torch.einsum("nmkl,in,mj->ijkl", self.mid.float(), up, down)
            if self.down.dim() == 4:
                return (up @ down).reshape(up.shape[0], *self.down.shape[1:])
            return up @ down
        if self.kind == "loha":
            if "hada_t1" in f:
                w1 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
                w2 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
            else:
                w1 = f["hada_w1_a"] @ f["hada_w1_b"]
                w2 = f["hada_w2_a"] @ f["hada_w2_b"]
            return w1.mul_(w2)  # in place: no third full-size temporary
        w1 = self._lokr_w1()
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = torch.einsum("ijkl,jr,ip->prkl", f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous())

    def delta(self, multiplier: float = 1.0, shape: torch.Size | tuple | None = None,
              base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW to add to the base weight at strength ``multiplier``, fp32 (docs/lora-format.md, 'DoRA and LyCORIS').

        LoRA/LoCon: m * alpha/rank * (up ∘ down) (convs: up [out,r,1,1] after down [r,in,kh,kw], a Tucker core
        ``lora_mid`` [r,r,kh,kw] between them); LoHa: m * alpha/rank * (w1a·w1b) ⊙ (w2a·w2b); LoKr:
        m * scale * kron(w1, w2). ``shape`` reshapes the result (e.g. a 1x1-conv LoRA for a Linear layer).

        DoRA (``dora_scale``) needs ``base_weight`` W (the original weight, before any other LoRA): with
        W1 = dora_scale * (W + ΔW) / ||W + ΔW|| (norm per input column, or per output row for a row-form scale),
        the update is m * (W1 - W), the way A1111 and ComfyUI apply a strength to a DoRA module.
        """
        w = self._raw()
        if self.dora_scale is None:
            w = w.mul_(self.scale * multiplier) if w.is_contiguous() else w * (self.scale * multiplier)
            return w.reshape(shape) if shape is not None else w
        w = w * self.scale
        if base_weight is None:
            raise UserError(f"{self.keys[0] if self.keys else 'a module'}: a DoRA module's update depends on the "
                            "base weight; give base_weight")
        w0 = base_weight.detach().float()
        merged = w0 + w.reshape(w0.shape)
        return (dora_merge(merged, self.dora_scale) - w0) * multiplier

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors by their kohya/LyCORIS name suffix (without ``alpha``)."""
        out: dict[str, torch.Tensor] = {}
        if self.kind == "lora":
            out["lora_down.weight"], out["lora_up.weight"] = self.down, self.up
            if self.mid is not None:
                out["lora_mid.weight"] = self.mid
        else:
            out.update(self.factors)
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out


def dora_merge(merged: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA's W1 = dora_scale * M / ||M|| for a merged weight M = W + ΔW, fp32 (docs/lora-format.md, 'DoRA and
    LyCORIS'): the norm per input column (over the outputs and the kernel) for a ``[1, in, ...]`` scale, per output
    row for an ``[out, ...]`` scale. A tiny epsilon keeps a zero column finite."""
    m = merged.float()
    s = dora_scale.float()
    if is_row_scale(s, m.shape):
        norm = m.reshape(m.shape[0], -1).norm(dim=1).reshape(m.shape[0], *[1] * (m.dim() - 1))
        s = s.reshape(norm.shape)
    else:
        norm = m.transpose(0, 1).reshape(m.shape[1], -1).norm(dim=1).reshape(1, m.shape[1], *[1] * (m.dim() - 2))
        s = s.reshape(norm.shape)
    return m * (s / (norm + torch.finfo(torch.float32).eps))


def is_row_scale(dora_scale: torch.Tensor, weight_shape) -> bool:
    """A per-output-row DoRA scale (LyCORIS' default ``wd_on_out``, PEFT's magnitude) rather than per input column."""
    out = int(weight_shape[0])
    return out > 1 and int(dora_scale.shape[0]) == out and dora_scale.numel() == out


@dataclass
class LoraFile:
    """A LoRA file read into the internal form; ``family`` is 'sd1' (SD1.x/SD2.x), 'sdxl' or None (unknown)."""
    path: Path
    formats: dict[str, int]
    family: str | None
    metadata: dict[str, str]
    #: "<component>:<module path>" -> module; diffusers UNet paths, ``text_model.encoder...`` TE paths
    modules: dict[str, LoraModule]
    #: keys that were not understood and left out (only with allow_partial)
    skipped: list[str] = field(default_factory=list)
    _addnet_hash: str | None = None

    @property
    def addnet_hash(self) -> str:
        if self._addnet_hash is None:
            self._addnet_hash = lora_addnet_hash(self.path)
        return self._addnet_hash

    @property
    def components(self) -> set[str]:
        return {k.split(":", 1)[0] for k in self.modules}


@dataclass(frozen=True)
class SavedLora:
    path: Path
    sha256: str  # of the tensor data after the header: the addnet hash stored as sshs_model_hash
    num_modules: int
    num_tensors: int


# ================================================================================================== hashing

def lora_addnet_hash(path: str | Path) -> str:
    """The "addnet" hash (= Civitai AutoV3, ``sshs_model_hash``): SHA-256 of everything after the header (docs/lora-format.md, 'Hashes')."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = header_length(head) if len(head) == 8 else -1
            # a bogus length would hash an empty tail: the "hash of nothing" bug (docs/lora-format.md, 'Hashes',
            # ai-toolkit #130)
            if n < 2 or 8 + n > os.fstat(f.fileno()).st_size:
                raise UserError(f"{path}: not a safetensors file (bad header length)", path=str(path))
            f.seek(8 + n)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise UserError(f"LoRA file not found: {path}", path=str(path)) from None
    return h.hexdigest()



def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', got {family!r}")



def _few(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more

