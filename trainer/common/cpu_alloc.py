"""Keep large CPU buffers in the process instead of mmapping them afresh on every call (Linux/glibc only).

PyTorch's oneDNN convolutions reorder their weights into a blocked layout on every call. Those buffers are larger
than glibc's mmap threshold, so by default each one is a fresh mmap, zero-filled page by page and unmapped again:
about 465,000 minor page faults (some 1.8 GB of zero-filling) per SD1.5 UNet call once the process has touched
its weights (for example after fusing LoRAs). With mmap disabled for malloc and a high trim threshold, freed blocks
are reused from the heap: one UNet call on CPU went from 1.98 s (base) / 2.62 s (fused) to 1.41 s / 1.44 s
(docs/benchmarks.md). The cost is that memory freed by the process stays with it for reuse rather than going back
to the OS at once, which is what a long-running generation or training process wants anyway. When the process
drops something large for good (the trainer's VAE and text encoders once their outputs are cached),
``give_back_freed()`` hands the freed pages back explicitly (glibc's ``malloc_trim``).

Set ``LORASTUDIO_MALLOC=default`` to leave glibc's settings alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_state: dict[str, bool] = {}


def keep_cpu_buffers() -> bool:
    """Apply the settings once per process; returns True when they are in effect."""
    if "applied" in _state:
        return _state["applied"]
    _state["applied"] = ok = _apply()
    return ok


def _apply() -> bool:
    if os.environ.get("LORASTUDIO_MALLOC", "").strip().lower() in ("default", "off", "0", "no"):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; order matters: the trim threshold before mmap is switched off
    return bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) and mallopt(_M_TOP_PAD, 64 << 20)
                and mallopt(_M_MMAP_MAX, 0))


def give_back_freed() -> bool:
    """Return the heap's free pages to the OS now (glibc ``malloc_trim(0)``, which also releases free pages in
    the middle of the heap); True when glibc did release memory. A no-op elsewhere."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(trim(0))


def is_cpu(device) -> bool:
    return str(device).split(":")[0] == "cpu"
