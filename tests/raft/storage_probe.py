"""Probes of what a reader of a storage sees: all of it, or what it sees in the middle of a
save."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ww.raft.storage import LogStorage
from ww.raft.types import Entry


def observe(s: LogStorage) -> tuple[Any, ...]:
    """Everything a reader of the storage can see."""
    first, last = s.first_index(), s.last_index()
    return (
        s.initial_state(),
        first,
        last,
        s.term(first - 1),
        s.entries(first, last + 1),
        s.snapshot(),
    )


class ReadWhileCopied(list[Entry]):
    """Entries that read the storage whenever the storage goes through them: the moments in
    a save (or an append) at which a reader in another thread could run."""

    def __init__(self, entries: list[Entry], read: Callable[[], object]) -> None:
        super().__init__(entries)
        self.read = read
        self.seen: list[object] = []

    def __iter__(self) -> Iterator[Entry]:
        self.seen.append(self.read())
        return super().__iter__()
