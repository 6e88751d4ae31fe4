"""`MemoryStorage`: the log, hard state and snapshot kept in memory, for tests and simulators.

Shaped like etcd's MemoryStorage: `_ents[0]` is a dummy entry holding the index and term of the
last snapshot (or of index 0), so `first_index()` is one past the last compacted index and
`term(first_index() - 1)` still answers. `DiskStorage` keeps one as its in-memory copy of what
it has on disk and serves every read from it.

Each write changes the log in one step (one slice assignment, or one new list), and each read
takes the list once, so a reader in another thread sees the log before or after that step: never
a conflicting suffix cut off and its replacement not yet in.
"""

from __future__ import annotations

from collections.abc import Sequence

from ww.raft.log import size_limited_end
from ww.raft.storage import CompactedError, SnapshotOutOfDateError, UnavailableError
from ww.raft.types import (
    EMPTY_HARD_STATE,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
)


class MemoryStorage:
    """An in-memory `LogStorage`. A new cluster starts from a storage whose `conf_state`
    lists its voters (the snapshot at index 0 carries it); a node that joins later starts
    from an empty one and learns the configuration from the leader."""

    def __init__(self, conf_state: ConfState | None = None) -> None:
        self.hard_state: HardState = EMPTY_HARD_STATE
        self._snapshot = Snapshot(metadata=SnapshotMetadata(conf_state=conf_state or ConfState()))
        self._ents: list[Entry] = [Entry(term=0, index=0)]

    # -- Storage (read side) ------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self._snapshot.metadata.conf_state

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        ents = self._ents
        offset = ents[0].index
        if lo <= offset:
            raise CompactedError(f"entries from {lo}: compacted up to {offset}")
        if hi > offset + len(ents):
            raise UnavailableError(
                f"entries up to {hi - 1}: last index is {offset + len(ents) - 1}"
            )
        if lo >= hi:
            return []
        return ents[lo - offset : size_limited_end(ents, lo - offset, hi - offset, max_size)]

    def term(self, index: int) -> int:
        ents = self._ents
        offset = ents[0].index
        if index < offset:
            raise CompactedError(f"term of {index}: compacted up to {offset}")
        if index - offset >= len(ents):
            raise UnavailableError(f"term of {index}: last index is {offset + len(ents) - 1}")
        return ents[index - offset].term

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        ents = self._ents
        return ents[0].index + len(ents) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- writes ------------------------------------------------------------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self.hard_state = hard_state

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log with `snapshot` (a follower installing the leader's)."""
        index = snapshot.metadata.index
        if index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDateError(
                f"snapshot at {index} is not newer than {self._snapshot.metadata.index}"
            )
        self._snapshot = snapshot
        self.reset_log(index, snapshot.metadata.term)

    def append(self, entries: Sequence[Entry]) -> None:
        """Append `entries`, replacing the stored suffix they conflict with in one step."""
        if not entries:
            return
        first = self.first_index()
        if entries[-1].index < first:
            return  # all compacted already
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise UnavailableError(
                f"missing log entries: last index {self.last_index()}, "
                f"appending at {entries[0].index}"
            )
        self._ents[offset:] = entries

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        *,
        sync: bool = True,
    ) -> None:
        if snapshot is not None and not snapshot.is_empty():
            self.apply_snapshot(snapshot)
        self.append(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        if index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDateError(
                f"snapshot at {index} is not newer than {self._snapshot.metadata.index}"
            )
        if index > self.last_index():
            raise UnavailableError(f"snapshot at {index}: last index is {self.last_index()}")
        term = self.term(index)  # CompactedError if the log was compacted past it
        self._snapshot = Snapshot(data, SnapshotMetadata(index, term, conf_state))
        return self._snapshot

    def compact(self, index: int) -> None:
        offset = self._ents[0].index
        if index <= offset:
            raise CompactedError(f"compact to {index}: already compacted up to {offset}")
        if index > self.last_index():
            raise UnavailableError(f"compact to {index}: last index is {self.last_index()}")
        i = index - offset
        self._ents = [Entry(term=self._ents[i].term, index=index), *self._ents[i + 1 :]]

    # -- restoring (a durable storage rebuilding its copy from its own records) ----------------

    def set_snapshot(self, snapshot: Snapshot) -> None:
        """Make `snapshot` the stored snapshot; the log is left as it is."""
        self._snapshot = snapshot

    def reset_log(self, index: int, term: int) -> None:
        """Discard the whole log: it goes on after `index`, an entry of `term`. The snapshot
        and the hard state are left as they are."""
        self._ents = [Entry(term=term, index=index)]

    def close(self) -> None:
        pass
