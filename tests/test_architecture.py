"""Architecture rules from design.md: import direction, no torch on cheap imports, no gradio outside app/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = {"app": 0, "trainer": 1, "datasets_tools": 2}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_imports_go_app_trainer_datasets_tools_never_backwards():
    bad = []
    for pkg, rank in ORDER.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for mod in _imports(f):
                if mod in ORDER and ORDER[mod] < rank:
                    bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_gradio_only_in_app():
    bad = [str(f.relative_to(ROOT)) for pkg in ("trainer", "datasets_tools") for f in (ROOT / pkg).rglob("*.py")
           if "gradio" in _imports(f)]
    assert not bad, bad


def test_cheap_imports_do_not_load_torch():
    code = ("import sys, trainer, trainer.config, trainer.presets, trainer.events, datasets_tools.bucketing, "
            "datasets_tools.folder, datasets_tools.images, app.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
