"""The internal form every LoRA file is read into, and the file hash (docs/lora-format.md, 'What we read', 'Hashes')."""

from __future__ import annotations

import hashlib
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
    """One LoRA module normalised to fp32 factors; ``rank`` always comes from the tensors (docs/lora-format.md, 'Alpha and scale')."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None
    keys: tuple[str, ...] = ()
    format: str = ""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, multiplier: float = 1.0, shape: torch.Size | tuple | None = None) -> torch.Tensor:
        """ΔW to add to the base weight at strength ``multiplier``: multiplier * alpha/rank * (up ∘ down), fp32.

        Convs use the conv composition (up [out,r,1,1] after down [r,in,kh,kw]); a LyCORIS Tucker core
        (``lora_mid``, [r,r,kh,kw]) sits between them. ``shape`` reshapes the result (e.g. a 1x1-conv LoRA
        for a Linear layer).
        """
        up = self.up.float().reshape(self.up.shape[0], -1)
        down = self.down.float().reshape(self.rank, -1)
        if self.mid is not None:
            w = torch.einsum("nmkl,in,mj->ijkl", self.mid.float(), up, down)
        elif self.down.dim() == 4:
            w = (up @ down).reshape(up.shape[0], *self.down.shape[1:])
        else:
            w = up @ down
        w = w * (multiplier * self.scale)
        return w.reshape(shape) if shape is not None else w


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

