"""The CPU allocator setting that keeps fused-LoRA generation as fast as the base model (trainer/common/cpu_alloc.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.fixtures.waits import HANG_S

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

# A 64 MiB buffer freed and allocated again, as oneDNN's weight reorders are on every conv call: by default glibc
# unmaps it on free, and the next one page-faults all 16,384 pages in again. With the setting, the first few rounds
# may still take fresh pages (torch's aligned allocation can be a few bytes too big for the chunk just freed, so
# glibc carves a new one) until the heap holds enough free chunks; measured: settled by round 6 in 24 processes.
_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from benchmarks.generate_speed import tiny_base_model
    from trainer.generate.engine import Generator
    if sys.argv[1] == "generator":
        Generator(tiny_base_model("cpu", torch.float32))
    faults = []
    for _ in range(12):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 << 20)  # 64 MiB
        x.fill_(1.0)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(sum(faults[-4:]))  # steady state: the first few can still carve new chunks from the heap's top
""")


def _faults(mode: str, **env) -> int:
    import os
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=HANG_S,
                         cwd=REPO, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_a_cpu_generator_keeps_large_buffers_instead_of_faulting_them_in_again():
    assert _faults("none") > 8000  # glibc's default: every large buffer comes back as fresh zero pages
    assert _faults("generator") < 500
    assert _faults("generator", LORASTUDIO_MALLOC="default") > 8000  # the documented opt-out


_FREE_SCRIPT = textwrap.dedent("""
    from pathlib import Path
    import torch
    from trainer.common.cpu_alloc import give_back_freed, keep_cpu_buffers
    def rss():
        return next(int(l.split()[1]) // 1024 for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith("VmRSS:"))
    assert keep_cpu_buffers()
    parts = [torch.ones(4 << 20) for _ in range(32)]  # 512 MiB in 16 MiB tensors, as a model's weights are
    full = rss()
    del parts
    kept = rss()
    give_back_freed()
    print(full, kept, rss())
""")


def test_memory_dropped_for_good_goes_back_to_the_os():
    """The trainer on CPU drops the VAE and text encoders once their outputs are cached (issue 18, item 3). Under
    keep_cpu_buffers the heap keeps freed blocks for reuse, so that memory would stay with the process;
    give_back_freed() returns it."""
    import os
    out = subprocess.run([sys.executable, "-c", _FREE_SCRIPT], capture_output=True, text=True, timeout=HANG_S,
                         cwd=REPO, env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    full, kept, after = map(int, out.stdout.split())
    assert kept > full - 100, (full, kept, after)    # freed, but still held by the heap
    assert after < full - 400, (full, kept, after)   # handed back
