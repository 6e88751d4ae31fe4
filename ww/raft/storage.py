"""The storage interface the protocol core reads its stable log from, and an in-memory one.

As in etcd's raft: the core reads entries, terms and the snapshot through `Storage`; the
application writes what each Ready asks it to persist (hard state, entries, snapshot) and then
calls `advance()`. Index 0 of the in-memory log is a dummy entry holding the snapshot's index and
term, so `first_index()` is one past the last compacted index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ww.raft.types import ConfState, Entry, HardState, Snapshot


class StorageError(Exception):
    """Base of the errors a Storage raises."""


class CompactedError(StorageError):
    """The requested index is older than the last snapshot: the entries are gone."""


class UnavailableError(StorageError):
    """The requested index is past the end of the stored log."""


class SnapshotOutOfDateError(StorageError):
    """The snapshot offered is older than the one already stored."""


class Storage(Protocol):
    """Read side used by the protocol core. Implementations must be consistent with what the
    application has persisted from Readys."""

    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi), at least one if any, at most `max_size` bytes of data."""
        ...

    def term(self, index: int) -> int:
        """The term of the entry at `index` (first_index()-1 .. last_index())."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


class LogStorage(Storage, Protocol):
    """A storage the driver can also write: what a Ready asks to persist, and compaction.

    `MemoryStorage` and the durable `DiskStorage` both implement it, so the same driver runs
    over either.
    """

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        *,
        sync: bool = True,
    ) -> None:
        """Persist what one Ready requires, in order: the snapshot (if any), then the entries
        (replacing any stored suffix they conflict with), then the hard state. A durable
        storage has fsynced all of it when this returns if `sync` is true (`Ready.must_sync`);
        otherwise it may sync it later, with the next synced write. Raft needs the term, the
        vote, the entries and a snapshot on stable storage before it answers anyone; a commit
        index alone may be lost in a crash and is learned again from the leader."""
        ...

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the application's state `data` as of applied `index` as the snapshot."""
        ...

    def compact(self, index: int) -> None:
        """Discard the log up to and including `index` (which must be <= the snapshot index
        or the applied index the application has snapshotted)."""
        ...

    def close(self) -> None: ...
