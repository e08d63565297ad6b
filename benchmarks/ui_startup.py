"""`lorastudio ui` start-up to the first served page, as seconds and as a ratio to `import gradio` in the same run.

    python benchmarks/ui_startup.py [--repeat 3]

Start-up time used to be a test (< 5 s of CPU) and flaked at 5.3 s on a busy 2-core machine: it is a figure, not a
pass/fail, so it lives here. Each round times, one after the other on the same machine:
  1. baseline: a fresh `python -c "import gradio"` (what any gradio app pays before its own code runs);
  2. the same import as the app does it (stub regeneration skipped, no IPython hooks: app/ui/startup.py);
  3. `python -m app.cli ui --root TMP --port P` from its start until `GET /` answers 200.
Both are wall-clock times of fresh processes, and the server's CPU seconds (utime+stime from /proc) at the moment
the page is served are printed too. (3)/(1) compares the whole start-up with a plain gradio import (below 1: the
app's import shortcuts save more than building its page costs); (3)/(2) is what building and serving the page
adds to the import the app pays. The medians of the rounds are reported. Measured figures and what they mean: docs/gui.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "LORASTUDIO_HOME": str(home)}


APP_IMPORT = ("import sys; sys.modules.setdefault('IPython', None); from app.ui.startup import skip_stub_regeneration; "
              "skip_stub_regeneration(); import gradio")


def import_gradio_s(env: dict[str, str], code: str = "import gradio") -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ui_first_page_s(env: dict[str, str], root: Path, timeout: float = 120.0) -> tuple[float, float | None]:
    port = _free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ui", "--root", str(root), "--port", str(port)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                raise SystemExit(f"lorastudio ui exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0, _cpu_s(proc.pid)
            except OSError:
                time.sleep(0.02)
        raise SystemExit("the page was not served in time")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds (median reported; default 3)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp) / "home")
        import_gradio_s(env)  # warm the page cache once, for both
        rounds = []
        for i in range(args.repeat):
            base = import_gradio_s(env)
            fast = import_gradio_s(env, APP_IMPORT)
            ui, cpu = ui_first_page_s(env, Path(tmp) / f"root{i}")
            rounds.append((base, fast, ui))
            print(f"round {i + 1}: import gradio {base:.2f} s, as the app imports it {fast:.2f} s, lorastudio ui to "
                  f"first page {ui:.2f} s ({ui / base:.2f}x / {ui / fast:.2f}x)"
                  + (f", server CPU {cpu:.2f} s" if cpu is not None else ""))
    med = [statistics.median(r[k] for r in rounds) for k in range(3)]
    ratio = statistics.median(r[2] / r[0] for r in rounds)
    ratio_fast = statistics.median(r[2] / r[1] for r in rounds)
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    print(f"median: import gradio {med[0]:.2f} s, as the app imports it {med[1]:.2f} s; lorastudio ui first page "
          f"{med[2]:.2f} s; ratio {ratio:.2f}x to import gradio, {ratio_fast:.2f}x to the app's import "
          f"(load {load:.2f} per core, {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
