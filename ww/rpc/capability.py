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


NOT_NOW: Any = object()
"""What a method's ``_<name>_nowait`` twin returns when it cannot finish without waiting."""

Entry = tuple[Callable[..., Any], bool, Callable[..., Any] | None]
"""A remotely callable method: its function, whether it is a stream, and its nowait twin."""

_METHODS: dict[type, dict[str, Entry]] = {}


def method_table(cls: type) -> dict[str, Entry]:
    """The remotely callable methods of a Capability class (cached).

    A method ``name`` may have a synchronous twin ``_<name>_nowait`` taking the same arguments:
    it returns the method's result when it can finish at once, or NOT_NOW (having done
    nothing). It must raise only when it did nothing either; the method then runs as usual.
    The connection tries it first, which spares a task for calls that need no waiting.
    """
    table = _METHODS.get(cls)
    if table is None:
        table = {}
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                if name.startswith("_"):
                    continue
                if inspect.isasyncgenfunction(fn):
                    table[name] = (fn, True, None)
                elif inspect.iscoroutinefunction(fn):
                    table[name] = (fn, False, getattr(cls, f"_{name}_nowait", None))
                else:
                    table.pop(name, None)
        _METHODS[cls] = table
    return table
