"""MemoryStorage: the etcd-shaped in-memory log with a dummy entry at the snapshot index."""

from __future__ import annotations

import pytest
from storage_probe import ReadWhileCopied

from ww.raft.memory import MemoryStorage
from ww.raft.storage import CompactedError, SnapshotOutOfDateError, UnavailableError
from ww.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata

CS = ConfState(voters=(1, 2, 3))


def storage(*terms_from_3: int) -> MemoryStorage:
    """Entries 3, 4, 5 (terms 3, 4, 5) after a snapshot at index 3."""
    s = MemoryStorage(CS)
    s.apply_snapshot(Snapshot(b"", SnapshotMetadata(3, 3, CS)))
    s.append([Entry(t, 3 + i) for i, t in enumerate(terms_from_3)][1:])
    return s


def test_a_new_storage_holds_only_the_membership():
    s = MemoryStorage(CS)
    assert s.initial_state() == (HardState(), CS)
    assert (s.first_index(), s.last_index(), s.term(0)) == (1, 0, 0)
    assert s.snapshot().is_empty()


def test_terms_are_known_from_the_snapshot_index_to_the_last_index():
    s = storage(3, 4, 5)
    assert [s.term(i) for i in (3, 4, 5)] == [3, 4, 5]
    with pytest.raises(CompactedError):
        s.term(2)
    with pytest.raises(UnavailableError):
        s.term(6)
    assert (s.first_index(), s.last_index()) == (4, 5)


def test_entries_are_served_within_bounds_and_size():
    s = storage(3, 4, 5)
    s.append([Entry(6, 6, data=b"x" * 100)])
    assert [e.index for e in s.entries(4, 7)] == [4, 5, 6]
    assert [e.index for e in s.entries(4, 7, max_size=0)] == [4]  # at least one
    assert [e.index for e in s.entries(4, 7, max_size=40)] == [4, 5]
    with pytest.raises(CompactedError):
        s.entries(3, 5)
    with pytest.raises(UnavailableError):
        s.entries(4, 8)


def test_appending_replaces_a_conflicting_suffix_and_skips_compacted_entries():
    s = storage(3, 4, 5)
    s.append([Entry(3, 2), Entry(3, 3), Entry(6, 5), Entry(6, 6)])
    assert [(i, s.term(i)) for i in range(3, 7)] == [(3, 3), (4, 4), (5, 6), (6, 6)]
    s.append([Entry(7, 4)])
    assert s.last_index() == 4
    with pytest.raises(UnavailableError, match="missing"):
        s.append([Entry(7, 9)])


def test_compaction_keeps_the_term_of_the_last_compacted_entry():
    s = storage(3, 4, 5)
    s.compact(4)
    assert (s.first_index(), s.term(4)) == (5, 4)
    with pytest.raises(CompactedError):
        s.compact(4)
    with pytest.raises(UnavailableError):
        s.compact(9)


def test_a_snapshot_is_created_at_an_applied_index_and_must_move_forward():
    s = storage(3, 4, 5)
    snap = s.create_snapshot(5, CS, b"state")
    assert (snap.metadata.index, snap.metadata.term, snap.data) == (5, 5, b"state")
    assert s.snapshot() == snap
    with pytest.raises(SnapshotOutOfDateError):
        s.create_snapshot(4, CS, b"older")
    with pytest.raises(SnapshotOutOfDateError):
        s.apply_snapshot(Snapshot(b"", SnapshotMetadata(5, 5, CS)))


def test_save_applies_snapshot_then_entries_then_hard_state():
    s = MemoryStorage(CS)
    snap = Snapshot(b"s", SnapshotMetadata(10, 2, CS))
    s.save(HardState(3, 1, 11), [Entry(3, 11)], snap)
    assert s.snapshot() == snap
    assert (s.first_index(), s.last_index(), s.term(10)) == (11, 11, 2)
    assert s.initial_state()[0] == HardState(3, 1, 11)
    s.save(None, [], None)
    assert s.initial_state()[0] == HardState(3, 1, 11)


def test_a_conflicting_suffix_is_replaced_in_one_step():
    s = storage(3, 4, 5)

    def read() -> object:
        return s.last_index(), s.entries(s.first_index(), s.last_index() + 1)

    before = read()
    new = ReadWhileCopied([Entry(6, 5), Entry(6, 6)], read)
    s.append(new)
    assert new.seen == [before]  # not [(4, [entry 4])]: the old 5 gone, the new one not yet in
    assert [(i, s.term(i)) for i in range(3, 7)] == [(3, 3), (4, 4), (5, 6), (6, 6)]


def test_no_snapshot_at_a_compacted_index():
    s = storage(3, 4, 5, 6)
    s.compact(5)
    with pytest.raises(CompactedError):
        s.create_snapshot(4, CS, b"")
    assert s.snapshot().metadata.index == 3


def test_a_storage_is_rebuilt_with_reset_log_and_set_snapshot():
    """What DiskStorage does when it replays its records: the log and the snapshot are set
    apart, each leaving the other (and the hard state) as it is."""
    s = storage(3, 4, 5)
    s.set_hard_state(HardState(5, 1, 4))
    s.reset_log(9, 4)
    assert (s.first_index(), s.last_index(), s.term(9)) == (10, 9, 4)
    assert s.snapshot().metadata.index == 3
    s.append([Entry(5, 10)])
    snap = Snapshot(b"at 7", SnapshotMetadata(7, 4, CS))
    s.set_snapshot(snap)
    assert s.snapshot() == snap
    assert (s.first_index(), s.last_index(), s.term(10)) == (10, 10, 5)
    assert s.initial_state() == (HardState(5, 1, 4), CS)
