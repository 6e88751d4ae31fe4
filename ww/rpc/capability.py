"""Capabilities: server-side objects whose public async methods are callable remotely."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar


class Capability:
    """Server-side object. Subclass it.

    Every public (no leading underscore) ``async def`` method is callable remotely; every public
    async *generator* method is a stream; a method marked `@sink` takes the items its caller
    pushes as its first argument. A `Capability` in an argument or a result is exported and
    arrives on the other side as a `Ref`.
    """

    async def _on_release(self) -> None:
        """Called once when the last remote reference to this object is dropped.

        Either the holder released it or the holding connection closed. Default: nothing.
        """


NOT_NOW: Any = object()
"""What a method's ``_<name>_nowait`` twin returns when it cannot finish without waiting."""


class Kind(enum.Enum):
    """What kind of remotely callable method an entry is."""

    METHOD = "method"
    STREAM = "stream"
    SINK = "sink"


Entry = tuple[Callable[..., Any], Kind, Callable[..., Any] | None]
"""A remotely callable method: its function, its kind and its nowait twin."""

_F = TypeVar("_F", bound=Callable[..., Coroutine[Any, Any, Any]])


def sink(method: _F) -> _F:
    """Mark an ``async def`` method as a sink: ``method(self, items, *args)``.

    A caller opens it with ``ref.sink("name", *args)`` and pushes items without waiting for
    each to be taken; `items` is an async iterator of them, in order, ending when the caller
    is done. The caller may push a window of items ahead: the connection grants more as the
    method takes them, so a method that stops taking them holds its caller back. What the
    method returns is the caller's result.
    """
    if not inspect.iscoroutinefunction(method):
        raise TypeError("@sink marks an async def method")
    method.__ww_sink__ = True  # type: ignore[attr-defined]
    return method


_METHODS: dict[type, dict[str, Entry]] = {}


def method_table(cls: type) -> dict[str, Entry]:
    """The remotely callable methods of a Capability class (cached).

    A method ``name`` may have a synchronous twin ``_<name>_nowait`` taking the same arguments:
    it returns the method's result when it can finish at once, or NOT_NOW (having done
    nothing). It must raise only when it did nothing either; the method then runs as usual.
    The connection tries it first, which spares a task for calls that need no waiting.
    A sink's twin takes one pushed item: it returns True when it took the item at once, False
    (having done nothing) when the sink method must take it; the connection tries it while
    the method is waiting for its next item.
    """
    table = _METHODS.get(cls)
    if table is None:
        table = {}
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                if name.startswith("_"):
                    continue
                if inspect.isasyncgenfunction(fn):
                    table[name] = (fn, Kind.STREAM, None)
                elif inspect.iscoroutinefunction(fn):
                    kind = Kind.SINK if getattr(fn, "__ww_sink__", False) else Kind.METHOD
                    table[name] = (fn, kind, getattr(cls, f"_{name}_nowait", None))
                else:
                    table.pop(name, None)
        _METHODS[cls] = table
    return table
