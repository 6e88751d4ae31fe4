"""Export and import tables, sans I/O.

Exports: the objects this side lends to the peer, by id, with a reference count -- one per
time the id was sent. The same object exported twice is one entry. The peer's release message
subtracts what it received; at zero the entry goes away.

Imports: the peer's ids this side holds. ``count`` is how many times the id arrived (what we
owe the peer when we release); ``handles`` is how many live local `Ref` handles use it.
"""

from __future__ import annotations

from dataclasses import dataclass

BOOTSTRAP_ID = 0


@dataclass(slots=True)
class _Export:
    obj: object
    refs: int


class Exports:
    """The objects one connection lends to its peer."""

    __slots__ = ("_by_id", "_by_obj", "_next")

    def __init__(self) -> None:
        self._by_id: dict[int, _Export] = {}
        self._by_obj: dict[int, int] = {}
        self._next = BOOTSTRAP_ID + 1

    def set_bootstrap(self, obj: object) -> None:
        """Export `obj` under the well-known id 0; the peer cannot release it."""
        self._by_id[BOOTSTRAP_ID] = _Export(obj, 1)
        self._by_obj[id(obj)] = BOOTSTRAP_ID

    def add(self, obj: object) -> tuple[int, bool]:
        """Count one more reference to `obj` sent to the peer: ``(id, whether it is new)``."""
        cap_id = self._by_obj.get(id(obj))
        if cap_id is not None:
            self._by_id[cap_id].refs += 1
            return cap_id, False
        cap_id = self._next
        self._next += 1
        self._by_id[cap_id] = _Export(obj, 1)
        self._by_obj[id(obj)] = cap_id
        return cap_id, True

    def get(self, cap_id: int) -> object:
        """The object exported under `cap_id`; KeyError when there is none."""
        return self._by_id[cap_id].obj

    def release(self, cap_id: int, count: int) -> object | None:
        """Subtract `count` references; return the object when its entry went away.

        The bootstrap is pinned (its references are never counted down). Raises KeyError for
        an unknown id.
        """
        entry = self._by_id[cap_id]
        if cap_id == BOOTSTRAP_ID:
            return None
        entry.refs -= count
        if entry.refs > 0:
            return None
        del self._by_id[cap_id]
        del self._by_obj[id(entry.obj)]
        return entry.obj

    def clear(self) -> list[object]:
        """Drop every entry (the connection is gone); return the objects."""
        objs = [e.obj for e in self._by_id.values()]
        self._by_id.clear()
        self._by_obj.clear()
        return objs

    def __len__(self) -> int:
        """Live exports, not counting the bootstrap."""
        return len(self._by_id) - (BOOTSTRAP_ID in self._by_id)


@dataclass(slots=True)
class _Import:
    count: int
    handles: int


class Imports:
    """The peer's capabilities this side holds."""

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[int, _Import] = {}

    def received(self, cap_id: int) -> None:
        """The peer sent `cap_id`; a new local handle will use it."""
        entry = self._by_id.get(cap_id)
        if entry is None:
            self._by_id[cap_id] = _Import(1, 1)
        else:
            entry.count += 1
            entry.handles += 1

    def dup(self, cap_id: int) -> None:
        """One more local handle for a held id."""
        self._by_id[cap_id].handles += 1

    def drop(self, cap_id: int) -> int:
        """A local handle went away: the count to release to the peer, or 0 if others remain."""
        entry = self._by_id.get(cap_id)
        if entry is None:
            return 0
        entry.handles -= 1
        if entry.handles > 0:
            return 0
        del self._by_id[cap_id]
        return entry.count

    def clear(self) -> None:
        self._by_id.clear()

    def __len__(self) -> int:
        return len(self._by_id)


class Holders:
    """How many connections export each object, so `_on_release` runs once, after the last."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def acquire(self, obj: object) -> None:
        key = id(obj)
        self._counts[key] = self._counts.get(key, 0) + 1

    def drop(self, obj: object) -> bool:
        """One connection stopped exporting `obj`; True when it was the last."""
        key = id(obj)
        n = self._counts.get(key, 0) - 1
        if n > 0:
            self._counts[key] = n
            return False
        self._counts.pop(key, None)
        return True
