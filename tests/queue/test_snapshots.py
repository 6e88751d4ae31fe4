"""Raft snapshots of the queue as files: markers, copies made in a thread, transfers checked
end to end, pruning only behind a complete stored snapshot, and restarts after a crash at
each point."""

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


def test_a_snapshot_file_is_a_complete_copy_under_its_name_only_when_written(
    tmp_path: Path,
) -> None:
    q = filled(tmp_path)
    files = SnapshotFiles(tmp_path / "snapshots")
    seen_while_copying: list[bool] = []

    def copy(dest: Path) -> None:
        seen_while_copying.append(files.complete(marker_of(q.index)))
        q.state.copy_to(dest)

    marker = files.take(copy, q.index)
    files.join()
    assert seen_while_copying == [False]
    assert files.complete(marker) and sorted(p.name for p in files.dir.iterdir()) == [marker.file]
    copy_state = QueueState(files.path(marker))
    assert copy_state.digest() == q.state.digest()
    copy_state.close()


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
    leader_files = SnapshotFiles(tmp_path / "a" / "snapshots")
    marker = leader_files.take(q.state.copy_to, q.index)
    leader_files.join()

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


def test_a_restart_rewrites_a_snapshot_file_lost_while_it_was_copied(tmp_path: Path) -> None:
    q = filled(tmp_path)
    q.state.commit()
    files = SnapshotFiles(tmp_path / "snapshots")
    applied = AppliedState(q.state, files)
    marker = Marker.for_index(q.index)  # stored in Raft, but the copy never finished
    applied.ensure_snapshot_file(marker.encode())
    assert files.complete(marker)
    copy_state = QueueState(files.path(marker))
    assert copy_state.applied_index == q.index
    copy_state.close()


def test_a_restart_behind_a_lost_snapshot_file_says_what_to_do(tmp_path: Path) -> None:
    q = filled(tmp_path)
    applied = AppliedState(q.state, SnapshotFiles(tmp_path / "snapshots"))
    with pytest.raises(SnapshotFileError, match="missing and the database is behind it"):
        applied.ensure_snapshot_file(Marker.for_index(q.index + 5).encode())


def test_a_snapshot_commits_syncs_and_prunes_once_the_next_commit_sees_it_complete(
    tmp_path: Path,
) -> None:
    q = Driver(tmp_path / "queue.db")
    q.state = QueueState(q.path, autocommit=False)
    files = SnapshotFiles(tmp_path / "snapshots")
    applied = AppliedState(q.state, files)
    first = Marker.decode((q.ok(Command.put("t", [Item(b"a")])), applied.snapshot())[1])
    files.join()
    applied.commit()
    q.ok(Command.put("t", [Item(b"b")]))
    second = Marker.decode(applied.snapshot())
    files.join()
    assert files.complete(first) and files.complete(second)
    applied.commit()  # Raft stored `second` before this Ready: `first` can go
    assert not files.complete(first) and files.complete(second)
    reopened = QueueState(files.path(second))
    assert reopened.query({"op": "stats", "topic": "t"})["ready"] == 2
    reopened.close()
