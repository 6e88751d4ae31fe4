"""`Ref`, a reference to a remote capability, and the release of refs nobody will see."""

from __future__ import annotations

import functools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from ww.rpc.limits import DEFAULT_SINK_WINDOW, DEFAULT_WINDOW

if TYPE_CHECKING:
    from ww.rpc.connection import Connection
    from ww.rpc.flow import RefSink


class Ref:
    """A reference to a remote capability.

    ``await ref.call("m", *args, **kwargs)`` calls it (``await ref.m(*args, **kwargs)`` is
    the same);
    ``async with ref.stream("m", *args) as items`` iterates a remote generator with
    backpressure; ``async with ref.sink("m", *args) as tx`` pushes items into a remote sink
    method with ``await tx.send(item)``; ``await ref.release()`` (or leaving
    ``async with ref``, or dropping the last Python reference) tells the owner this handle
    is done.
    """

    __slots__ = ("__weakref__", "_conn", "_finalizer", "_id", "_released")

    def __init__(self, conn: Connection, cap_id: int, *, tracked: bool = True) -> None:
        self._conn = conn
        self._id = cap_id
        self._released = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if tracked:
            fin = weakref.finalize(self, conn._drop_collected, cap_id)
            fin.atexit = False
            self._finalizer = fin

    @property
    def connection(self) -> Connection:
        """The connection this reference travels over."""
        return self._conn

    @property
    def released(self) -> bool:
        return self._released

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call `method` remotely; raises RemoteError when it raises, ConnectionLost."""
        return await self._conn._call(self, method, args, kwargs)

    def stream(
        self, method: str, *args: Any, window: int = DEFAULT_WINDOW
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Iterate the remote async generator `method(*args)`.

        The producer runs at most `window` items ahead of the consumer; leaving the block
        cancels the remote generator.
        """
        return self._conn._stream(self, method, args, window)

    def sink(
        self, method: str, *args: Any, window: int = DEFAULT_SINK_WINDOW
    ) -> AbstractAsyncContextManager[RefSink]:
        """Push items into the remote sink method `method(items, *args)` (see `sink`).

        ``await tx.send(item)`` waits only while `window` items are pushed and not yet taken.
        Leaving the block normally tells the method the items ended and waits for its answer
        (``tx.result``; a RemoteError when it raised); leaving it by an exception cancels it.
        """
        return self._conn._sink(self, method, args, window)

    async def release(self) -> None:
        """Tell the owner this handle is done with the capability. Idempotent."""
        self._release_now()

    def _release_now(self) -> None:
        if self._released:
            return
        self._released = True
        fin = self._finalizer
        if fin is not None and fin.detach() is not None:
            self._conn._drop_import(self._id)

    async def __aenter__(self) -> Ref:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._release_now()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other._conn is self._conn and other._id == self._id

    def __hash__(self) -> int:
        return hash((id(self._conn), self._id))

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<Ref {self._id} on {self._conn.name}{state}>"


def _release_refs_in(value: Any) -> None:
    """Release every Ref inside a decoded value nobody will see."""
    if isinstance(value, Ref):
        value._release_now()
    elif isinstance(value, list):
        for v in value:
            _release_refs_in(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _release_refs_in(k)
            _release_refs_in(v)
