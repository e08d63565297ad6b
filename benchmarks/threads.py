"""The benchmarks' one ``--threads`` option. Its default, 0, leaves torch's own thread count, which follows
``OMP_NUM_THREADS``: a script's ``main()`` called inside a test process (one thread per test worker, see
tests/conftest.py) must not switch that process to more threads for every later test."""

from __future__ import annotations

import argparse

HELP = "torch CPU threads (0: torch's default, which follows OMP_NUM_THREADS)"


def add_threads_option(ap: argparse.ArgumentParser, default: int = 0) -> None:
    ap.add_argument("--threads", type=int, default=default, help=HELP)


def use_threads(n: int) -> None:
    """torch.set_num_threads(n) unless n is 0."""
    if n:
        import torch
        torch.set_num_threads(n)
