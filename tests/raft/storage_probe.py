"""A probe for the one-step guarantee of the storages: what a reader sees mid-save."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ww.raft.types import Entry


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
