"""The Raft log: stable entries in a `Storage`, and the unstable tail the application has not
persisted yet (`Unstable`), as in etcd's raftLog and unstable.

Indices: `first_index()` is one past the last compacted index; the entry before it (the
snapshot's index) still has a known term. `committed` and `applied` are cursors into it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ww.raft.errors import InvalidMessageError
from ww.raft.storage import CompactedError, Storage, UnavailableError
from ww.raft.types import Entry, Snapshot

ENTRY_OVERHEAD = 16
"""Bytes counted per entry on top of its data when limiting a message's size."""


def entry_size(e: Entry) -> int:
    return len(e.data) + ENTRY_OVERHEAD


def payload_size(entries: Sequence[Entry]) -> int:
    """The bytes of data the entries carry (what the uncommitted-size limit counts)."""
    return sum(len(e.data) for e in entries)


def limit_size(entries: list[Entry], max_size: int | None) -> list[Entry]:
    """The longest prefix of `entries` within `max_size` bytes, but at least one entry."""
    if not entries:
        return entries
    return entries[: size_limited_end(entries, 0, len(entries), max_size)]


def size_limited_end(entries: list[Entry], lo: int, hi: int, max_size: int | None) -> int:
    """The end of the longest run `entries[lo:end]` (lo < end <= hi) within `max_size` bytes,
    but at least one entry; lets a storage slice its log once."""
    if max_size is None:
        return hi
    size = entry_size(entries[lo])
    for i in range(lo + 1, hi):
        size += entry_size(entries[i])
        if size > max_size:
            return i
    return hi
    size = entry_size(entries[0])
    for i in range(1, len(entries)):
        size += entry_size(entries[i])
        if size > max_size:
            return entries[:i]
    return entries


class Unstable:
    """Entries and a snapshot received but not yet persisted. `offset` is the index of
    `entries[0]` (or where it would be)."""

    __slots__ = ("entries", "offset", "snapshot")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        return None if self.snapshot is None else self.snapshot.metadata.index + 1

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        return None if self.snapshot is None else self.snapshot.metadata.index

    def maybe_term(self, i: int) -> int | None:
        if i < self.offset:
            if self.snapshot is not None and self.snapshot.metadata.index == i:
                return self.snapshot.metadata.term
            return None
        last = self.maybe_last_index()
        if last is None or i > last:
            return None
        return self.entries[i - self.offset].term

    def stable_to(self, i: int, t: int) -> None:
        """Entries up to `i` (of term `t`) are persisted: forget them. Ignored if the entry at
        `i` was replaced meanwhile."""
        if self.maybe_term(i) == t and i >= self.offset:
            del self.entries[: i + 1 - self.offset]
            self.offset = i + 1

    def stable_snap_to(self, i: int) -> None:
        if self.snapshot is not None and self.snapshot.metadata.index == i:
            self.snapshot = None

    def restore(self, s: Snapshot) -> None:
        self.offset = s.metadata.index + 1
        self.entries = []
        self.snapshot = s

    def truncate_and_append(self, ents: Sequence[Entry]) -> None:
        after = ents[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif after <= self.offset:
            # Replace the whole unstable tail (the stable log will be truncated on save).
            self.offset = after
            self.entries = list(ents)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(ents)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    """The whole log as the protocol sees it."""

    def __init__(self, storage: Storage, max_next_ents_size: int | None = None) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        self.committed = first - 1
        self.applied = first - 1
        self.max_next_ents_size = max_next_ents_size

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, len(unstable)={len(self.unstable.entries)})"
        )

    # -- indices and terms ---------------------------------------------------------------------

    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return self.storage.first_index() if i is None else i

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return self.storage.last_index() if i is None else i

    def term(self, i: int) -> int:
        """The term of entry `i`; raises CompactedError / UnavailableError out of range."""
        dummy = self.first_index() - 1
        if i < dummy:
            raise CompactedError(f"index {i} is compacted (first index {dummy + 1})")
        if i > self.last_index():
            raise UnavailableError(f"index {i} is past the last index {self.last_index()}")
        t = self.unstable.maybe_term(i)
        if t is not None:
            return t
        return self.storage.term(i)

    def zero_term_on_out_of_bounds(self, i: int) -> int:
        try:
            return self.term(i)
        except (CompactedError, UnavailableError):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, i: int, t: int) -> bool:
        try:
            return self.term(i) == t
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, lasti: int, term: int) -> bool:
        """Whether a log ending at (lasti, term) is at least as up to date as ours (§5.4.1)."""
        last_term = self.last_term()
        return term > last_term or (term == last_term and lasti >= self.last_index())

    # -- appending -----------------------------------------------------------------------------

    def maybe_append(
        self, index: int, log_term: int, committed: int, ents: Sequence[Entry]
    ) -> int | None:
        """Append `ents` after (index, log_term) if our log matches there; returns the index of
        the last new entry, or None on mismatch."""
        if not self.match_term(index, log_term):
            return None
        lastnewi = index + len(ents)
        ci = self.find_conflict(ents)
        if ci != 0:
            if ci <= self.committed:
                raise InvalidMessageError(
                    f"entry {ci} conflicts with the committed log (committed {self.committed})"
                )
            self.append(ents[ci - (index + 1) :])
        self.commit_to(min(committed, lastnewi))
        return lastnewi

    def append(self, ents: Sequence[Entry]) -> int:
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise InvalidMessageError(f"append after {after} is below committed {self.committed}")
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    def find_conflict(self, ents: Sequence[Entry]) -> int:
        """The index of the first entry whose term differs from ours (or that we lack), else 0."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, and that term (etcd's
        findConflictByTerm): the leader skips every entry of a term the follower lacks."""
        if index > self.last_index():
            return index, 0
        while True:
            try:
                our = self.term(index)
            except (CompactedError, UnavailableError):
                return index, 0
            if our <= term:
                return index, our
            index -= 1

    # -- reading -------------------------------------------------------------------------------

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def has_next_committed_ents(self) -> bool:
        return self.committed + 1 > max(self.applied + 1, self.first_index())

    def next_committed_ents(self) -> list[Entry]:
        off = max(self.applied + 1, self.first_index())
        if self.committed + 1 > off:
            return self.slice(off, self.committed + 1, self.max_next_ents_size)
        return []

    def has_pending_snapshot(self) -> bool:
        s = self.unstable.snapshot
        return s is not None and not s.is_empty()

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    def entries(self, i: int, max_size: int | None = None) -> list[Entry]:
        if i > self.last_index():
            return []
        return self.slice(i, self.last_index() + 1, max_size)

    def all_entries(self) -> list[Entry]:
        return self.entries(self.first_index())

    def slice(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi) within `max_size` bytes (at least one); raises CompactedError
        if `lo` is compacted."""
        fi = self.first_index()
        if lo < fi:
            raise CompactedError(f"index {lo} is compacted (first index {fi})")
        if lo > hi or hi > self.last_index() + 1:
            raise UnavailableError(f"slice [{lo}, {hi}) out of bounds [{fi}, {self.last_index()}]")
        if lo == hi:
            return []
        ents: list[Entry] = []
        off = self.unstable.offset
        if lo < off:
            stored = self.storage.entries(lo, min(hi, off), max_size)
            if len(stored) < min(hi, off) - lo:
                return stored  # hit the size limit
            ents = stored
        if hi > off:
            ents = ents + self.unstable.slice(max(lo, off), hi)
        return limit_size(ents, max_size)

    # -- cursors -------------------------------------------------------------------------------

    def commit_to(self, tocommit: int) -> None:
        if self.committed < tocommit:
            if self.last_index() < tocommit:
                raise InvalidMessageError(
                    f"commit {tocommit} is past the last index {self.last_index()}"
                )
            self.committed = tocommit

    def applied_to(self, i: int) -> None:
        if i == 0:
            return
        if self.committed < i or i < self.applied:
            raise ValueError(f"applied {i} outside [{self.applied}, {self.committed}]")
        self.applied = i

    def stable_to(self, i: int, t: int) -> None:
        self.unstable.stable_to(i, t)

    def last_stable_index(self) -> int:
        """The last index of the entries on disk that the log still holds."""
        if self.unstable.entries:
            return self.unstable.offset - 1
        return self.last_index()

    def stable_snap_to(self, i: int) -> None:
        self.unstable.stable_snap_to(i)

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """Commit up to `max_index` if that entry is of `term` (§5.4.2)."""
        if max_index > self.committed and self.zero_term_on_out_of_bounds(max_index) == term:
            self.commit_to(max_index)
            return True
        return False

    def restore(self, s: Snapshot) -> None:
        self.committed = s.metadata.index
        self.unstable.restore(s)
