"""Every control of the page under a "tab.name" key, so one tab reaches another's controls by name.

The tabs are built one after another (Dataset, Train, Generate, Presets). A tab that needs a control of another
tab (the Dataset tab's bucket preview reads the Train form's ``train.data.resolution``; a finished training job
refreshes ``generate.lora``) asks the registry for it instead of sharing local variables. Wiring that needs a
control of a tab built later is registered with ``after_build`` and runs once every tab exists (still inside
the Blocks). The model is LLaMA-Factory's webui ``Manager``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


class Registry:
    def __init__(self):
        self._items: dict[str, Any] = {}
        self._deferred: list[Callable[[], None]] = []

    def add(self, key: str, component: Any) -> Any:
        """Register `component` under `key` ("tab.name"); returns it, so a layout line can register as it builds."""
        if "." not in key:
            raise ValueError(f"registry key {key!r}: use 'tab.name'")
        if key in self._items:
            raise ValueError(f"registry key {key!r} is already registered")
        self._items[key] = component
        return component

    def get(self, key: str) -> Any:
        try:
            return self._items[key]
        except KeyError:
            raise KeyError(f"no control registered as {key!r}; registered: {', '.join(sorted(self._items))}") \
                from None

    __getitem__ = get

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def many(self, keys: Iterable[str]) -> list[Any]:
        return [self.get(k) for k in keys]

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self._items if k.startswith(prefix)]

    def after_build(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run `fn` once all tabs are built (wiring that reaches a control of a later tab)."""
        self._deferred.append(fn)
        return fn

    def finish(self) -> None:
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            fn()
