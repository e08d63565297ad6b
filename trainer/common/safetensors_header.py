"""The one reader of a .safetensors header: tensor names, dtypes, shapes and ``__metadata__``, no tensor data.

A safetensors file starts with an 8-byte little-endian header length and a JSON header
(https://github.com/huggingface/safetensors#format). Reading only that is fast on a 7 GB checkpoint, needs no
torch, and is what A1111's "AutoV3" hash and our inspect, preset and LoRA-list code build on.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

#: Headers larger than this are refused: real ones are a few MB even for SDXL checkpoints with thousands of keys.
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    dtype: str          # safetensors spelling: F16, BF16, F32, ...
    shape: tuple
    offsets: tuple      # (begin, end) in the data section


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    header_length: int  # bytes of JSON after the 8-byte length
    tensors: dict       # name -> TensorInfo, in file order
    metadata: dict      # __metadata__, str -> str

    @property
    def data_start(self) -> int:
        return 8 + self.header_length


def header_length(blob: bytes | memoryview) -> int:
    """The JSON header's length from a file's first 8 bytes."""
    return struct.unpack("<Q", bytes(blob[:8]))[0]


def read_header(path: str | Path) -> SafetensorsHeader:
    """The parsed header; a UserError naming the file if it is missing or not a safetensors file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            n = header_length(head)
            if n > MAX_HEADER_BYTES:
                raise ValueError("header too large")
            raw = f.read(n)
            if len(raw) < n:
                raise ValueError("truncated header")
            header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            tensors[name] = TensorInfo(str(info["dtype"]), tuple(info["shape"]), tuple(info["data_offsets"]))
    except FileNotFoundError:
        raise UserError(f"file not found: {p}", path=str(p)) from None
    except IsADirectoryError:
        raise UserError(f"{p} is a folder, not a .safetensors file", path=str(p)) from None
    except (ValueError, UnicodeDecodeError, struct.error, KeyError, TypeError) as e:
        raise UserError(f"{p} is not a safetensors file ({e})", path=str(p)) from None
    return SafetensorsHeader(p, n, tensors, {str(k): str(v) for k, v in meta.items()})


def read_metadata(path: str | Path) -> dict[str, str]:
    """Only the ``__metadata__`` (UserError if the file is not a safetensors file)."""
    return read_header(path).metadata
