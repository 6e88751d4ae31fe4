"""Capabilities: server-side objects whose public async methods are callable remotely."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class Capability:
    """Server-side object. Subclass it.

    Every public (no leading underscore) ``async def`` method is callable remotely; every public
    async *generator* method is a stream. A `Capability` in an argument or a result is exported
    and arrives on the other side as a `Ref`.
    """

    async def _on_release(self) -> None:
        """Called once when the last remote reference to this object is dropped.

        Either the holder released it or the holding connection closed. Default: nothing.
        """


# class -> {name: (function, is_stream)}
_METHODS: dict[type, dict[str, tuple[Callable[..., Any], bool]]] = {}


def method_table(cls: type) -> dict[str, tuple[Callable[..., Any], bool]]:
    """The remotely callable methods of a Capability class (cached)."""
    table = _METHODS.get(cls)
    if table is None:
        table = {}
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                if name.startswith("_"):
                    continue
                if inspect.isasyncgenfunction(fn):
                    table[name] = (fn, True)
                elif inspect.iscoroutinefunction(fn):
                    table[name] = (fn, False)
                else:
                    table.pop(name, None)
        _METHODS[cls] = table
    return table
