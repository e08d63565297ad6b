"""Names several parts of the engine share: the model families, what a hub id looks like."""

from __future__ import annotations

import re
from pathlib import Path

#: the base-model families LoRA Studio trains and reads (SD1.x, SD2.x, SDXL)
FAMILIES = ("sd1", "sd2", "sdxl")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: file suffixes of single-file checkpoints: "org/model.safetensors" is a path, never a hub id
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` that is not an existing path and not a checkpoint file name (then diffusers may download it)."""
    value = str(value).strip()
    return (bool(_HUB_ID.fullmatch(value)) and not value.lower().endswith(CHECKPOINT_SUFFIXES)
            and not Path(value).expanduser().exists())
