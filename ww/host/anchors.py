"""The anchor tree of one host (sans-I/O).

A node exists while it holds a value or has a descendant that does. Every value is owned by
a `Lease`; when the lease ends, what it stored is removed and empty branches vanish with it.
Every value that leaves the tree (replaced, cleared, or dropped) is handed to `on_removed`, so
the caller can release capabilities it held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ww.host.lease import Lease
from ww.host.paths import Parts


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    value: Any = None
    owner: Lease | None = None


class AnchorTree:
    """Values hung at paths, each owned by a lease. Paths here are already validated parts."""

    def __init__(self, on_removed: Callable[[Any], None] | None = None) -> None:
        self._root = _Node()
        self._owned: dict[Lease, set[Parts]] = {}
        self._on_removed = on_removed

    def store(self, parts: Parts, value: Any, owner: Lease) -> None:
        """Hang `value` at `parts` for `owner`, replacing what was there (None clears)."""
        if value is None:
            self.clear(parts)
            return
        if owner.ended:
            raise ValueError(f"{owner.name} has ended and can no longer store anchors")
        node = self._root
        for name in parts:
            node = node.children.setdefault(name, _Node())
        previous = node.value
        if node.owner is not None:
            self._disown(node.owner, parts)
        node.value, node.owner = value, owner
        if owner not in self._owned:
            self._owned[owner] = set()
            owner.on_end(lambda: self.drop(owner))
        self._owned[owner].add(parts)
        self._removed(previous)

    def load(self, parts: Parts) -> Any:
        """The value at `parts`, or None."""
        node = self._find(parts)
        return None if node is None else node.value

    def ls(self, parts: Parts) -> list[str]:
        """Names of the children of `parts`, sorted (empty when the anchor does not exist)."""
        node = self._find(parts)
        return [] if node is None else sorted(node.children)

    def clear(self, parts: Parts) -> None:
        """Remove the value at `parts`, if any."""
        node = self._find(parts)
        if node is None or node.value is None:
            return
        previous = node.value
        if node.owner is not None:
            self._disown(node.owner, parts)
        node.value, node.owner = None, None
        self._prune(parts)
        self._removed(previous)

    def drop(self, owner: Lease) -> None:
        """Remove every value `owner` stored (runs by itself when the lease ends)."""
        for parts in sorted(self._owned.pop(owner, set()), key=len, reverse=True):
            node = self._find(parts)
            if node is not None and node.owner is owner:
                previous = node.value
                node.value, node.owner = None, None
                self._prune(parts)
                self._removed(previous)

    def owned_by(self, owner: Lease) -> list[Parts]:
        """The paths `owner` holds values at, sorted."""
        return sorted(self._owned.get(owner, ()))

    def __len__(self) -> int:
        """The number of stored values."""
        return sum(len(paths) for paths in self._owned.values())

    def _removed(self, value: Any) -> None:
        if value is not None and self._on_removed is not None:
            self._on_removed(value)

    def _disown(self, owner: Lease, parts: Parts) -> None:
        paths = self._owned.get(owner)
        if paths is not None:
            paths.discard(parts)

    def _find(self, parts: Parts) -> _Node | None:
        node = self._root
        for name in parts:
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def _prune(self, parts: Parts) -> None:
        """Remove empty nodes along `parts`, deepest first."""
        trail = [self._root]
        for name in parts:
            child = trail[-1].children.get(name)
            if child is None:
                return
            trail.append(child)
        for depth in range(len(parts), 0, -1):
            node = trail[depth]
            if node.value is not None or node.children:
                return
            del trail[depth - 1].children[parts[depth - 1]]
