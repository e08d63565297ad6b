"""benchmarks/gpu_check.py --smoke: the GPU check runs end to end on CPU with tiny models, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from tests.fixtures.waits import HANG_S

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_writes_json_and_markdown(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["smoke"] and [(s["family"], s["batch"]) for s in res["steps"]] == [("sd1", 4), ("sdxl", 1)]
    assert all(s["s_per_step"] > 0 and s["step_flops"] > 0 for s in res["steps"])
    assert [c["cap_gib"] for c in res["caps"]] == [8, 12, 16]
    assert res["ours_vs_bare"]["ratio"] > 0
    assert res["generation"]["returncode"] == 0 and any("fused/base" in ln for ln in res["generation"]["lines"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check") and "our step / bare step" in md and "| 8 GiB |" in md
