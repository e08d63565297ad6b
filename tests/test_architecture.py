"""Architecture rules (docs/architecture.md): imports go app -> trainer -> datasets_tools, the engine never starts
the front-end, test fixtures and research code stay out of the product, gradio only in app/, cheap imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = {"app": 0, "trainer": 1, "datasets_tools": 2}
#: packages a product package may never import (benchmarks may use all three; nothing imports tests but tests)
OUTSIDE = ("benchmarks", "tests")


def _imports(path: Path) -> set[str]:
    """Top-level package of every import in the file, lazy imports inside functions included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.add(path.relative_to(ROOT).parts[0])  # a relative import stays inside its package
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.add(str(node.args[0].value).split(".")[0])
    return out


def _module_runs(path: Path) -> set[str]:
    """Packages the file starts as a subprocess: ``-m pkg`` in a string or list of strings."""
    text = path.read_text(encoding="utf-8")
    found = set(re.findall(r"""["']-m["']\s*,\s*["'](\w+)""", text))
    found |= set(re.findall(r"""-m\s+(\w+)[\w.]*""", text))
    return found


def _product_files():
    for pkg, rank in ORDER.items():
        for f in (ROOT / pkg).rglob("*.py"):
            yield pkg, rank, f


def test_imports_go_app_trainer_datasets_tools_never_backwards():
    bad = []
    for pkg, rank, f in _product_files():
        for mod in _imports(f):
            if (mod in ORDER and ORDER[mod] < rank) or mod in OUTSIDE:
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_the_engine_never_starts_the_front_end():
    """`python -m app...` from trainer/ or datasets_tools/ would make the engine depend on the front-end."""
    bad = []
    for pkg, rank, f in _product_files():
        for mod in _module_runs(f):
            if (mod in ORDER and ORDER[mod] < rank) or mod in OUTSIDE:
                bad.append(f"{f.relative_to(ROOT)} runs -m {mod}")
    assert not bad, bad


def test_the_rule_checker_sees_lazy_imports_and_module_runs(tmp_path):
    f = ROOT / "trainer" / "_probe_architecture.py"
    f.write_text("def f():\n    from app.cli import main\n    import subprocess, sys\n"
                 "    subprocess.run([sys.executable, '-m', 'app.cli'])\n", encoding="utf-8")
    try:
        assert "app" in _imports(f) and "app" in _module_runs(f)
    finally:
        f.unlink()


def test_gradio_only_in_app():
    bad = [str(f.relative_to(ROOT)) for pkg in ("trainer", "datasets_tools") for f in (ROOT / pkg).rglob("*.py")
           if "gradio" in _imports(f)]
    assert not bad, bad


def test_research_code_and_fixtures_live_outside_the_engine():
    names = {f.stem for pkg in ORDER for f in (ROOT / pkg).rglob("*.py")}
    assert not names & {"toyworld_pretrain", "toyworld_lora", "tiny_models", "lora_fixtures"}, names


def test_cheap_imports_do_not_load_torch():
    code = ("import sys, trainer, trainer.config, trainer.config.presets, trainer.train.events, "
            "datasets_tools.bucketing, datasets_tools.folder, datasets_tools.images, datasets_tools.toyworld, app.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
