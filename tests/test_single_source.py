"""Every list and limit has one source: front-ends (app/) take sampler, captioner and family names, choices and
ranges from the settings and registries, never from literals they type themselves.

The checker reads app/**/*.py with ``ast`` and reports (a) a tuple/list/set of strings holding a sampler,
captioner or family name, (b) ``choices=`` given a literal, (c) gradio ``minimum=`` / ``maximum=`` given a
number, (d) in app/cli, an ordering comparison against a numeric literal past 1 (``args.batch > 64``). A
self-test plants one of each in a temporary file and checks the checker finds them. The CLI and the GUI are
also checked to agree on every limit: both are built from the same FieldInfo.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import pytest

from datasets_tools.captioners import CAPTIONERS, REGISTRY
from trainer.common.names import FAMILIES
from trainer.generate.samplers import SAMPLERS

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app"
CLI = APP / "cli"

#: Names that only a registry may list.
NAMES = (set(SAMPLERS) | set(CAPTIONERS) | {a for c in REGISTRY.values() for a in c.aliases} | set(FAMILIES))
_ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _number(node) -> float | None:
    """The value of a numeric literal (``5``, ``-2.0``), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _number(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    return None


def _is_literal(node) -> bool:
    return isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)) or isinstance(node, ast.Constant)


def hard_coded(path: Path, *, limits: bool) -> list[str]:
    """'file:line: what' for every hard-coded list or limit in one file; ``limits`` adds check (d)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []

    def report(node, what: str) -> None:
        found.append(f"{rel}:{node.lineno}: {what}")

    exempt: set[int] = set()
    for node in ast.walk(tree):  # __all__ lists names of the module, not choices
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exempt.add(id(node.value))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in exempt:
            hits = sorted({e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in NAMES})
            if hits:
                report(node, f"(a) a list of names written out: {', '.join(hits)} (use SAMPLERS / CAPTIONERS / "
                       f"FAMILY_CHOICES)")
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "choices" and _is_literal(kw.value):
                    report(kw.value, "(b/c) choices= given a literal (take them from the setting or registry)")
                elif kw.arg in ("minimum", "maximum") and _number(kw.value) is not None:
                    report(kw.value, f"(c) {kw.arg}={_number(kw.value):g} written out (use the setting's min/max)")
        elif limits and isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(op, _ORDERING) for op in node.ops):
                for o in operands:
                    v = _number(o)
                    if v is not None and abs(v) > 1:
                        report(node, f"(d) a comparison against the literal limit {v:g} (check_value does it)")
    return found


def check_tree(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        out += hard_coded(path, limits=path.is_relative_to(CLI))
    return out


def test_checker_finds_planted_examples():
    planted = '''
import argparse
from trainer.generate.samplers import SAMPLERS
__all__ = ["euler"]
SAMPLER_CHOICES = ("euler", "euler_a", "ddim")
caps = ["template", "wd14"]
fams = {"sd1", "sdxl"}
p = argparse.ArgumentParser()
p.add_argument("--dtype", choices=["auto", "fp16"])
p.add_argument("--ok", choices=list(SAMPLERS))
slider = Slider(minimum=0, maximum=16, step=1)
fine = Slider(minimum=fi.min, maximum=fi.max)
def run(args):
    if args.batch > 64 or 1 <= args.clip_skip <= 12:
        raise SystemExit
    seed = 0 if args.seed == -1 else args.seed
    if len(args.x) < 1:
        pass
'''
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "planted.py"
        f.write_text(planted, encoding="utf-8")
        found = hard_coded(f, limits=True)
        cli_off = hard_coded(f, limits=False)
    text = "\n".join(found)
    lines = {int(x.split(":")[1]) for x in found}
    assert sum("(a)" in x for x in found) == 3 and {5, 6, 7} <= lines, text  # tuple, list, set; not __all__
    assert 4 not in lines and 3 not in lines and 10 not in lines and 12 not in lines, text
    assert any("(b/c) choices=" in x and ":9:" in x for x in found), text
    assert any("(c) minimum=0" in x for x in found) and any("(c) maximum=16" in x for x in found), text
    assert any("(d)" in x and "64" in x for x in found) and any("(d)" in x and "12" in x for x in found), text
    assert not any(":16:" in x or ":17:" in x for x in found), text  # == -1 and < 1 are not limits
    assert not any("(d)" in x for x in cli_off)
    assert not f.exists()


def test_cli_hard_codes_no_list_or_limit():
    found = check_tree(CLI)
    assert not found, "hard-coded lists or limits in app/cli:\n" + "\n".join(found)


def test_app_hard_codes_no_list_or_limit():
    """The whole of app/ (the web app too): its controls come from FieldInfo and the registries."""
    found = check_tree(APP)
    assert not found, "hard-coded lists or limits in app/:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------ CLI == GUI


def _limited():
    from trainer.generate.settings import GENERATE_FIELDS, GRID_FIELDS
    return [fi for fi in [*GENERATE_FIELDS.values(), *GRID_FIELDS.values()] if fi.max is not None]


def test_batch_17_fails_on_the_command_line_as_in_the_gui(capsys, tmp_path):
    from app.cli import main
    from trainer.generate.settings import GENERATE_FIELDS
    assert GENERATE_FIELDS["batch"].max == 16
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "p", "--batch", "17"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --batch") and "16" in err[0], err


@pytest.mark.parametrize("fi", _limited(), ids=lambda fi: fi.key)
def test_cli_and_gui_share_each_limit(fi, capsys, tmp_path):
    """The GUI control's ends are the setting's, and the CLI flag accepts the same largest value and refuses the
    next one."""
    from app.cli import build_parser
    from app.cli.generate import GENERATE_FLAGS, GRID_FLAGS
    from app.ui import form
    from trainer.errors import UserError

    control = form.setting_control(fi, "probe")
    assert control.maximum == fi.max and control.minimum == fi.min
    with pytest.raises(UserError):
        form.value_from_form(fi, fi.max + (fi.multiple_of or 1))
    flag = (GENERATE_FLAGS if fi.section == "generate" else GRID_FLAGS)[fi.name]
    command = "grid" if fi.section == "grid" else "generate"
    base = [command, "--model", str(tmp_path / "m"), "--prompt", "p"]
    top = int(fi.max) if fi.type is int else fi.max
    args = build_parser().parse_args(base + [flag, str(top)])
    assert getattr(args, fi.name) == top
    with pytest.raises(UserError, match=flag):
        build_parser().parse_args(base + [flag, str(top + (fi.multiple_of or 1))])


def test_no_test_waits_on_a_speed_figure_of_its_own():
    """A test's wait for a child, a server or a browser element uses tests/fixtures/waits.py (a hang guard), never a
    number of its own: a figure like ``timeout=120`` fails the suite on a slow machine (CI run of stop 21 did)."""
    bad = []
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "timeout":
                v = _number(node.value)
                if v is not None and v > 10:      # a socket's 2 s poll or a kill grace is not a wait for work
                    bad.append(f"{path.relative_to(REPO)}:{node.value.lineno} timeout={v}")
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = fn.args.args + fn.args.kwonlyargs
                for a, d in zip(args[len(args) - len(fn.args.defaults):], fn.args.defaults):
                    if a.arg == "timeout" and (_number(d) or 0) > 10:
                        bad.append(f"{path.relative_to(REPO)}:{fn.lineno} def {fn.name}(timeout={_number(d)})")
    assert not bad, "waits with their own speed figure (use tests.fixtures.waits.HANG_S/HANG_MS):\n" + "\n".join(bad)
