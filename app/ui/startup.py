"""Make `import gradio` about 2 s faster on a 2-core machine (gradio 5/6), before it happens.

Every time gradio is imported, its component metaclass (`gradio.component_meta.create_or_modify_pyi`) re-creates
the type-stub (.pyi) file of each of its ~80 component classes: it reads the class's source, parses it with
`ast`, renders the stub and compares it with the one on disk. That is a tool for gradio's own developers (the
stubs ship in the wheel) and about half of the import: 4.1 s -> 2.3 s here. `skip_stub_regeneration()` installs a
one-shot import hook that replaces that function with a no-op as soon as `gradio.component_meta` is executed, so
the component classes are built exactly as before, minus the stub writing. If gradio is already imported, or a
future gradio has no such function, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "gradio.component_meta"


class _SkipStubs(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        _remove_hook()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            if callable(getattr(module, "create_or_modify_pyi", None)):
                module.create_or_modify_pyi = _no_stub

        loader.exec_module = exec_module
        return spec


def _no_stub(*args, **kwargs) -> None:
    return None


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _SkipStubs)]


def skip_stub_regeneration() -> bool:
    """Install the hook unless gradio is already imported; True when gradio's next import will skip the stubs."""
    if _TARGET in sys.modules:
        return False
    if not any(isinstance(f, _SkipStubs) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipStubs())
    return True
