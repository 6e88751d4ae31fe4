"""Leases: who holds ephemeral state on a host.

Every value stored in the anchor tree belongs to a lease holder — a client connection, a
host↔host connection acting for a remote client, or a spawned process. When the holder goes,
its lease ends and everything it held goes with it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

log = logging.getLogger("ww.host")

_ids = itertools.count(1)


class Lease:
    """One holder of ephemeral state. `end()` runs the cleanup callbacks once, newest first."""

    __slots__ = ("_callbacks", "ended", "id", "name")

    def __init__(self, name: str) -> None:
        self.id = next(_ids)
        self.name = name
        self.ended = False
        self._callbacks: list[Callable[[], None]] = []

    def on_end(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the lease ends (at once if it already has)."""
        if self.ended:
            callback()
        else:
            self._callbacks.append(callback)

    def end(self) -> None:
        """End the lease; idempotent. A failing callback is logged and the rest still run."""
        if self.ended:
            return
        self.ended = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception:
                log.exception("cleanup for %s failed", self.name)

    def __repr__(self) -> str:
        state = "ended" if self.ended else "live"
        return f"<Lease {self.id} {self.name} {state}>"
