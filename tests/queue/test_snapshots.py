"""Raft snapshots of the queue as files: markers, copies written only when one is sent,
transfers checked end to end, pruning only behind a stored snapshot, and restarts after a
crash at each point."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import pytest

from ww.queue.commands import Command, Item
from ww.queue.replica import AppliedState
from ww.queue.snapshots import Marker, SnapshotFileError, SnapshotFiles, read_chunks
from ww.queue.state import QueueState

from .conftest import Driver


def test_a_marker_round_trips_and_a_malformed_one_is_refused() -> None:
    marker = Marker.for_index(42)
    assert Marker.decode(marker.encode()) == marker
    for bad in (
        b"\xc1",
        msgpack.packb({"file": "../../etc/passwd", "index": 42}),
        msgpack.packb({"file": "snap-0000000000000000043.db", "index": 42}),
        msgpack.packb({"file": Marker.for_index(1).file, "index": True}),
        msgpack.packb([1, 2]),
    ):
        with pytest.raises(SnapshotFileError):
            Marker.decode(bad)


def filled(tmp_path: Path, n: int = 30) -> Driver:
    q = Driver(tmp_path / "queue.db")
    q.ok(Command.put("t", [Item(f"{i}".encode() * 50, key=str(i)) for i in range(n)]))
    return q


def test_a_snapshot_file_is_written_once_and_under_its_name_only_when_complete(
    tmp_path: Path,
) -> None:
    q = filled(tmp_path)
    seen_while_copying: list[bool] = []

    def copy(dest: Path) -> None:
        seen_while_copying.append(files.complete(marker_of(q.index)))
        q.state.copy_to(dest)

    files = SnapshotFiles(tmp_path / "snapshots", copy)
    marker = marker_of(q.index)
    assert files.ensure(marker) == files.path(marker)
    assert files.ensure(marker) == files.path(marker)  # there already: not written again
    assert seen_while_copying == [False]
    assert sorted(p.name for p in files.dir.iterdir()) == [marker.file]
    copy_state = QueueState(files.path(marker))
    assert copy_state.digest() == q.state.digest()
    copy_state.close()


def test_a_copy_that_fails_leaves_no_file_and_says_why(tmp_path: Path) -> None:
    def copy(dest: Path) -> None:
        dest.write_bytes(b"half a database")
        raise OSError("No space left on device")

    files = SnapshotFiles(tmp_path, copy)
    with pytest.raises(SnapshotFileError, match="No space left on device"):
        files.ensure(marker_of(7))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SnapshotFileError, match="is missing"):
        SnapshotFiles(tmp_path).ensure(marker_of(7))  # one that only receives files


def marker_of(index: int) -> Marker:
    return Marker.for_index(index)


def test_prune_keeps_the_stored_snapshot_and_anything_newer(tmp_path: Path) -> None:
    files = SnapshotFiles(tmp_path)
    for name in ("snap-0000000000000000005.db", "snap-0000000000000000007.db.tmp",
                 "snap-0000000000000000008.db.partial", "snap-0000000000000000010.db",
                 "snap-0000000000000000012.db.partial", "other"):  # fmt: skip
        (tmp_path / name).write_bytes(b"x")
    files.prune(Marker.for_index(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other",
        "snap-0000000000000000010.db",
        "snap-0000000000000000012.db.partial",
    ]


def test_a_damaged_or_truncated_transfer_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"abc" * 100_000)
    files = SnapshotFiles(tmp_path / "snaps")
    marker = Marker.for_index(3)

    def transfer(damage: bool, truncate: bool) -> None:
        chunks = read_chunks(source, 4096)
        receiver = files.receiver(marker)
        sent: list[bytes] = []
        try:
            while True:
                sent.append(next(chunks))
        except StopIteration as end:
            size, digest = end.value
        if damage:
            sent[3] = b"Z" + sent[3][1:]
        if truncate:
            sent.pop()
        for chunk in sent:
            receiver.write(chunk)
        try:
            receiver.finish(size, digest)
        finally:
            receiver.abort()

    for damage, truncate in ((True, False), (False, True)):
        with pytest.raises(SnapshotFileError, match="damaged or incomplete"):
            transfer(damage, truncate)
        assert list(files.dir.iterdir()) == []
    transfer(False, False)
    assert files.path(marker).read_bytes() == source.read_bytes()
    assert (
        hashlib.sha256(files.path(marker).read_bytes()).digest()
        == hashlib.sha256(source.read_bytes()).digest()
    )


def test_restore_installs_the_named_file_and_prunes_older_ones(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    q = filled(tmp_path / "a")
    q.ok(Command.put("t", [Item(b"more")]))
    leader_files = SnapshotFiles(tmp_path / "a" / "snapshots", q.state.copy_to)
    marker = marker_of(q.index)
    leader_files.ensure(marker)

    (tmp_path / "b").mkdir()
    follower = QueueState(tmp_path / "b" / "queue.db")
    files = SnapshotFiles(tmp_path / "b" / "snapshots")
    old = files.path(Marker.for_index(q.index - 1))
    old.write_bytes(b"an older snapshot")
    files.path(marker).write_bytes(leader_files.path(marker).read_bytes())  # as received
    applied = AppliedState(follower, files)
    applied.restore(marker.encode())
    assert follower.applied_index == q.index and follower.digest() == q.state.digest()
    assert not old.exists() and files.complete(marker)


def test_a_database_at_or_past_the_snapshot_is_not_replaced_and_needs_no_file(
    tmp_path: Path,
) -> None:
    q = filled(tmp_path)
    q.ok(Command.put("t", [Item(b"more")]))
    files = SnapshotFiles(tmp_path / "snapshots")
    applied = AppliedState(q.state, files)
    digest = q.state.digest()
    for index in (q.index, q.index - 1):  # no file for either
        applied.check_snapshot(marker_of(index).encode())
        applied.restore(marker_of(index).encode())
    assert q.state.digest() == digest and list(files.dir.iterdir()) == []


def test_a_restart_behind_a_received_snapshot_installs_its_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    q = filled(tmp_path / "a")
    marker = SnapshotFiles(tmp_path / "a" / "snapshots", q.state.copy_to)
    received = SnapshotFiles(tmp_path / "b")
    received.path(marker_of(q.index)).write_bytes(marker.ensure(marker_of(q.index)).read_bytes())
    behind = QueueState(tmp_path / "queue-b.db")  # stored the snapshot, died before installing
    applied = AppliedState(behind, received)
    applied.check_snapshot(marker_of(q.index).encode())
    applied.restore(marker_of(q.index).encode())
    assert behind.applied_index == q.index and behind.digest() == q.state.digest()


def test_a_restart_behind_a_lost_snapshot_file_says_what_to_do(tmp_path: Path) -> None:
    q = filled(tmp_path)
    applied = AppliedState(q.state, SnapshotFiles(tmp_path / "snapshots"))
    with pytest.raises(SnapshotFileError, match="missing and the database is behind it"):
        applied.check_snapshot(Marker.for_index(q.index + 5).encode())


def test_a_snapshot_syncs_copies_nothing_and_prunes_older_files_at_the_next_commit(
    tmp_path: Path,
) -> None:
    q = Driver(tmp_path / "queue.db")
    q.state = QueueState(q.path, autocommit=False)
    files = SnapshotFiles(tmp_path / "snapshots", q.state.copy_to)
    applied = AppliedState(q.state, files)
    first = Marker.decode((q.ok(Command.put("t", [Item(b"a")])), applied.snapshot())[1])
    assert not files.complete(first)  # taking a snapshot copies nothing
    reopened = QueueState(q.path)  # ... but made the state durable
    assert reopened.applied_index == first.index
    reopened.close()
    files.ensure(first)  # a follower needed it
    applied.commit()
    q.ok(Command.put("t", [Item(b"b")]))
    second = Marker.decode(applied.snapshot())
    assert files.complete(first) and not files.complete(second)
    applied.commit()  # Raft stored `second` during this Ready: `first` can go
    assert not files.complete(first)
    reopened = QueueState(files.ensure(second))
    assert reopened.query({"op": "stats", "topic": "t"})["ready"] == 2
    reopened.close()
