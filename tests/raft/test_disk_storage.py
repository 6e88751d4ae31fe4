"""DiskStorage: the same answers as MemoryStorage, and the same state after a reopen; torn tails
truncated, earlier damage and foreign directories refused with one clear line."""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from storage_probe import ReadWhileCopied, observe

from ww.raft import disk as ww_disk
from ww.raft import wal
from ww.raft.disk import (
    DiskStorage,
    ForeignDirectoryError,
    MissingMetaError,
    StorageCorruptError,
    StorageLockedError,
)
from ww.raft.errors import RaftError
from ww.raft.storage import (
    CompactedError,
    LogStorage,
    SnapshotOutOfDateError,
    StorageError,
    UnavailableError,
)
from ww.raft.types import (
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
)

CONF = ConfState(voters=(1, 2, 3))
KINDS = ["disk"]
if importlib.util.find_spec("ww.raft.memory") is not None:
    KINDS.append("memory")

Factory = Callable[..., LogStorage]


def open_disk(path: Path, **options: Any) -> DiskStorage:
    options.setdefault("sync", False)
    return DiskStorage.open(path, node_id=1, cluster_id="c1", **options)


@pytest.fixture(params=KINDS)
def new_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Makes empty storages of one kind: `new_storage(conf_state=None)`."""
    opened: list[LogStorage] = []

    def make(conf_state: ConfState | None = None) -> LogStorage:
        storage: LogStorage
        if request.param == "memory":
            from ww.raft.memory import MemoryStorage

            storage = MemoryStorage(conf_state)
        else:
            storage = open_disk(tmp_path / f"s{len(opened)}", conf_state=conf_state)
        opened.append(storage)
        return storage

    yield make
    for s in opened:
        s.close()


def with_log(make: Factory, *terms_from_3: int) -> LogStorage:
    """A storage whose log is compacted at index 3 (term 3), then holds indexes 4, 5, ... with
    the given terms: etcd's storage tests start from this."""
    s = make()
    s.save(None, [], Snapshot(metadata=SnapshotMetadata(3, 3)))
    s.save(None, [Entry(t, i) for i, t in enumerate(terms_from_3, start=4)], None)
    return s


# --- the semantics of MemoryStorage (etcd's), for every kind ---


def test_term(new_storage: Factory) -> None:
    s = with_log(new_storage, 4, 5)
    with pytest.raises(CompactedError):
        s.term(2)
    assert [s.term(i) for i in (3, 4, 5)] == [3, 4, 5]
    with pytest.raises(UnavailableError):
        s.term(6)


def test_entries_and_size_limit(new_storage: Factory) -> None:
    s = with_log(new_storage, 4, 5, 6)
    for lo in (2, 3):
        with pytest.raises(CompactedError):
            s.entries(lo, 6)
    assert s.entries(4, 5) == [Entry(4, 4)]
    assert s.entries(4, 7) == [Entry(4, 4), Entry(5, 5), Entry(6, 6)]
    assert s.entries(5, 5) == []
    with pytest.raises(UnavailableError):
        s.entries(4, 8)
    one = len(s.entries(4, 5, max_size=None)[0].data) + 16  # ww.raft.log counts 16 per entry
    assert s.entries(4, 7, max_size=0) == [Entry(4, 4)]
    assert s.entries(4, 7, max_size=2 * one) == [Entry(4, 4), Entry(5, 5)]
    assert s.entries(4, 7, max_size=3 * one - 1) == [Entry(4, 4), Entry(5, 5)]
    assert s.entries(4, 7, max_size=3 * one) == s.entries(4, 7)


def test_first_and_last_index(new_storage: Factory) -> None:
    s = with_log(new_storage, 4, 5)
    assert (s.first_index(), s.last_index()) == (4, 5)
    s.save(None, [Entry(5, 6)], None)
    assert s.last_index() == 6
    s.compact(4)
    assert (s.first_index(), s.last_index()) == (5, 6)


def test_compact(new_storage: Factory) -> None:
    s = with_log(new_storage, 4, 5)
    for index in (2, 3):
        with pytest.raises(CompactedError):
            s.compact(index)
    s.compact(4)
    assert (s.first_index(), s.term(4), s.entries(5, 6)) == (5, 4, [Entry(5, 5)])
    with pytest.raises(UnavailableError):
        s.compact(6)
    s.compact(5)
    assert (s.first_index(), s.last_index(), s.term(5)) == (6, 5, 5)


def test_create_snapshot(new_storage: Factory) -> None:
    s = with_log(new_storage, 4, 5)
    snap = s.create_snapshot(4, CONF, b"state at 4")
    assert snap == Snapshot(b"state at 4", SnapshotMetadata(4, 4, CONF))
    assert s.snapshot() == snap
    assert s.initial_state()[1] == CONF
    assert s.first_index() == 4  # a snapshot does not compact by itself
    for index in (3, 4):
        with pytest.raises(SnapshotOutOfDateError):
            s.create_snapshot(index, CONF, b"")
    with pytest.raises(UnavailableError):
        s.create_snapshot(6, CONF, b"")
    assert s.create_snapshot(5, CONF, b"5").metadata.term == 5
    s.save(None, [Entry(5, 6), Entry(5, 7)], None)
    s.compact(7)  # past the snapshot: the entry a snapshot at 6 would need is gone
    with pytest.raises(CompactedError):
        s.create_snapshot(6, CONF, b"")
    assert s.snapshot().metadata.index == 5


@pytest.mark.parametrize(
    ("appended", "expected"),
    [
        ([(3, 3), (4, 4), (5, 5)], [(4, 4), (5, 5)]),
        ([(3, 3), (4, 6), (5, 6)], [(4, 6), (5, 6)]),
        ([(3, 3), (4, 4), (5, 5), (6, 5)], [(4, 4), (5, 5), (6, 5)]),
        ([(2, 3), (3, 3), (4, 5)], [(4, 5)]),  # the compacted part is skipped
        ([(4, 5)], [(4, 5)]),  # a conflict replaces the stored suffix
        ([(6, 5)], [(4, 4), (5, 5), (6, 5)]),
        ([(1, 3), (2, 3)], [(4, 4), (5, 5)]),  # nothing new
    ],
)
def test_append(
    new_storage: Factory, appended: list[tuple[int, int]], expected: list[tuple[int, int]]
) -> None:
    s = with_log(new_storage, 4, 5)
    s.save(None, [Entry(t, i) for i, t in appended], None)
    assert s.entries(4, s.last_index() + 1) == [Entry(t, i) for i, t in expected]


def test_append_past_the_end_is_refused(new_storage: Factory) -> None:
    s = with_log(new_storage, 4, 5)
    with pytest.raises(UnavailableError):
        s.save(None, [Entry(5, 7)], None)
    assert s.last_index() == 5


def test_a_conflicting_suffix_is_replaced_in_one_step(new_storage: Factory) -> None:
    """A reader in another thread (the driver persists in a worker thread) sees the log before
    or after a save that replaces a suffix, never with the old suffix gone and the new one not
    yet in."""
    s = with_log(new_storage, 4, 5, 6)

    def read() -> object:
        return s.last_index(), s.entries(s.first_index(), s.last_index() + 1)

    before = read()
    new = ReadWhileCopied([Entry(7, 5), Entry(7, 6), Entry(7, 7)], read)
    s.save(HardState(7, 1, 4), new, None)
    assert new.seen and new.seen == [before] * len(new.seen)
    assert read() == (7, [Entry(4, 4), Entry(7, 5), Entry(7, 6), Entry(7, 7)])


def test_install_snapshot_replaces_the_log(new_storage: Factory) -> None:
    s = with_log(new_storage, 4, 5)
    snap = Snapshot(b"leader state", SnapshotMetadata(8, 6, CONF))
    s.save(HardState(6, 2, 8), [Entry(6, 9, data=b"after")], snap)
    assert observe(s) == (
        (HardState(6, 2, 8), CONF),
        9,
        9,
        6,
        [Entry(6, 9, data=b"after")],
        snap,
    )
    with pytest.raises(SnapshotOutOfDateError):
        s.save(None, [], Snapshot(b"old", SnapshotMetadata(8, 6, CONF)))
    s.save(None, [], Snapshot())  # an empty snapshot is no snapshot
    assert s.snapshot() == snap


def test_initial_state(new_storage: Factory) -> None:
    s = new_storage(CONF)
    assert s.initial_state() == (HardState(), CONF)
    assert (s.first_index(), s.last_index(), s.term(0)) == (1, 0, 0)
    s.save(HardState(1, 1, 0), [Entry(1, 1)], None)
    assert s.initial_state() == (HardState(1, 1, 0), CONF)
    assert new_storage().initial_state() == (HardState(), ConfState())


# --- durability: reopening gives back exactly what was saved ---


def workload(rng: random.Random, s: LogStorage, steps: int, reopen: Callable[[], None]) -> None:
    """Random saves (with conflicts), snapshots, compactions and installs, as a node sees them."""
    for _ in range(steps):
        first, last = s.first_index(), s.last_index()
        hs = s.initial_state()[0]
        term = max(hs.term, s.term(last), 1)
        snap_index = s.snapshot().metadata.index
        r = rng.random()
        if r < 0.08 and hs.commit > max(snap_index, first - 1):
            index = rng.randint(max(snap_index, first - 1) + 1, hs.commit)
            s.create_snapshot(index, CONF, rng.randbytes(rng.randint(0, 300)))
        elif r < 0.16 and s.snapshot().metadata.index >= first:
            s.compact(rng.randint(first, s.snapshot().metadata.index))
        elif r < 0.2:
            index = max(last, snap_index + 1) + rng.randint(0, 3)
            snap = Snapshot(rng.randbytes(50), SnapshotMetadata(index, term + 1, CONF))
            s.save(HardState(term + 1, 2, index), [], snap)
        elif r < 0.25:
            reopen()
        else:
            start = last + 1
            if rng.random() < 0.2 and last > hs.commit:
                term += 1
                start = rng.randint(max(first, hs.commit + 1), last)
            n = rng.randint(0, 6)
            entries = [
                Entry(term, start + i, data=rng.randbytes(rng.randint(0, 120))) for i in range(n)
            ]
            commit = min(start + n - 1, hs.commit + rng.randint(0, 4))
            s.save(HardState(term, rng.choice([1, 2]), max(hs.commit, commit)), entries, None)


@pytest.mark.parametrize("seed", range(12))
def test_reopen_recovers_state_under_a_random_workload(tmp_path: Path, seed: int) -> None:
    """After every operation, a reopen gives back the state; with MemoryStorage around, the
    same operations give the same state on both."""
    path = tmp_path / "data"
    disk = [open_disk(path, conf_state=CONF, segment_size=1024)]
    memory: LogStorage | None = None
    if "memory" in KINDS:
        from ww.raft.memory import MemoryStorage

        memory = MemoryStorage(CONF)

    def reopen() -> None:
        before = observe(disk[0])
        disk[0].close()
        disk[0] = open_disk(path, segment_size=1024)
        assert observe(disk[0]) == before

    class Both:
        """Applies each call to the disk storage and (if present) the memory storage."""

        def __getattr__(self, name: str) -> Any:
            def call(*args: Any) -> Any:
                result = getattr(disk[0], name)(*args)
                if memory is not None:
                    assert getattr(memory, name)(*args) == result, name
                return result

            return call

    both: Any = Both()
    workload(random.Random(seed), both, 300, reopen)
    if memory is not None:
        assert observe(disk[0]) == observe(memory)
    reopen()
    # Compacting the whole log leaves one segment: the rest of the disk is freed.
    s = disk[0]
    term, last = s.initial_state()[0].term, s.last_index()
    s.save(HardState(term, 1, last + 20), [Entry(term, last + i) for i in range(1, 21)], None)
    s.create_snapshot(last + 20, CONF, b"all")
    s.compact(last + 20)
    assert len(list(path.glob("wal-*.log"))) == 1
    reopen()
    disk[0].close()


def test_conflicting_suffix_truncation_survives_reopen(tmp_path: Path) -> None:
    with open_disk(tmp_path) as s:
        s.save(HardState(1, 1, 2), [Entry(1, i, data=b"old") for i in range(1, 6)], None)
        s.save(HardState(2, 2, 2), [Entry(2, 3, data=b"new")], None)
    with open_disk(tmp_path) as s:
        assert s.entries(1, s.last_index() + 1) == [
            Entry(1, 1, data=b"old"),
            Entry(1, 2, data=b"old"),
            Entry(2, 3, data=b"new"),
        ]
        assert s.initial_state()[0] == HardState(2, 2, 2)


def test_snapshot_survives_reopen_and_old_ones_are_deleted(tmp_path: Path) -> None:
    with open_disk(tmp_path, sync=True, conf_state=CONF) as s:
        s.save(HardState(1, 1, 10), [Entry(1, i, data=b"x") for i in range(1, 11)], None)
        s.create_snapshot(5, CONF, b"five")
        snap = s.create_snapshot(8, CONF, b"eight")
        s.compact(7)
    assert [p.name for p in tmp_path.glob("snap-*")] == [
        "snap-0000000000000008-0000000000000001.snap"
    ]
    with open_disk(tmp_path) as s:
        assert s.snapshot() == snap
        assert (s.first_index(), s.last_index(), s.term(7)) == (8, 10, 1)


def test_installed_snapshot_survives_reopen_and_frees_the_log(tmp_path: Path) -> None:
    with open_disk(tmp_path, segment_size=512) as s:
        for i in range(1, 40):
            s.save(HardState(1, 1, i - 1), [Entry(1, i, data=b"y" * 100)], None)
        assert len(list(tmp_path.glob("wal-*.log"))) > 3
        snap = Snapshot(b"from the leader", SnapshotMetadata(100, 3, CONF))
        s.save(HardState(3, 0, 100), [], snap)
        assert len(list(tmp_path.glob("wal-*.log"))) == 1
    with open_disk(tmp_path) as s:
        assert observe(s) == ((HardState(3, 0, 100), CONF), 101, 100, 3, [], snap)


def test_compaction_deletes_whole_segments(tmp_path: Path) -> None:
    with open_disk(tmp_path, segment_size=4096) as s:
        for i in range(1, 201):
            s.save(HardState(1, 1, i - 1), [Entry(1, i, data=bytes(200))], None)
        before = sorted(tmp_path.glob("wal-*.log"))
        size = sum(p.stat().st_size for p in before)
        s.create_snapshot(150, CONF, b"s")
        s.compact(150)
        after = sorted(tmp_path.glob("wal-*.log"))
        # 200 entries filled 12 segments; the 50 left fit in 3, plus one that starts before.
        assert len(before) == 12 and after == before[-4:]
        assert sum(p.stat().st_size for p in after) < size / 2.5
        state = observe(s)
    with open_disk(tmp_path) as s:
        assert observe(s) == state


# --- damage ---


def saved_log(path: Path, n: int = 5, **options: Any) -> Path:
    """A storage with n single-entry saves; returns its last segment."""
    with open_disk(path, **options) as s:
        for i in range(1, n + 1):
            s.save(HardState(1, 1, i - 1), [Entry(1, i, data=b"entry %d" % i)], None)
    return sorted(path.glob("wal-*.log"))[-1]


def record_offsets(segment: Path) -> list[int]:
    return [offset for offset, _ in wal.scan(segment.read_bytes()).records]


def test_torn_partial_record_at_the_tail_is_truncated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = saved_log(tmp_path)
    intact = segment.stat().st_size
    record = wal.frame(b"\x93" + bytes(300))
    with segment.open("ab") as f:
        f.write(record[:100])  # the start of a record whose write was cut short
    with caplog.at_level(logging.WARNING, logger="ww.raft.disk"), open_disk(tmp_path) as s:
        assert s.last_index() == 5
        s.save(HardState(1, 1, 5), [Entry(1, 6)], None)
    assert f"{segment}: discarding a torn record at offset {intact}" in caplog.text
    with open_disk(tmp_path) as s:  # the log stays valid after the truncation
        assert (s.last_index(), s.initial_state()[0].commit) == (6, 5)


@pytest.mark.parametrize("where", ["header", "payload", "last byte"])
def test_damaged_last_record_is_truncated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    segment = saved_log(tmp_path)
    last = record_offsets(segment)[-1]
    data = bytearray(segment.read_bytes())
    at = {"header": last + 3, "payload": last + wal.HEAD_SIZE + 2, "last byte": len(data) - 1}
    data[at[where]] ^= 0x40
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ww.raft.disk"), open_disk(tmp_path) as s:
        # The last save, entry 5 with commit 4, is gone as a whole.
        assert (s.last_index(), s.initial_state()[0].commit) == (4, 3)
    assert f"discarding a torn record at offset {last}" in caplog.text
    assert segment.stat().st_size == last


def test_damage_before_the_tail_is_refused_naming_file_and_offset(tmp_path: Path) -> None:
    segment = saved_log(tmp_path)
    second = record_offsets(segment)[1]
    data = bytearray(segment.read_bytes())
    data[second + wal.HEAD_SIZE + 1] ^= 0x01
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageCorruptError) as e:
        open_disk(tmp_path)
    message = str(e.value)
    assert f"raft log {segment} is damaged at offset {second} (checksum mismatch)" in message
    assert "\n" not in message


def test_damage_at_the_end_of_an_earlier_segment_is_refused(tmp_path: Path) -> None:
    segment = saved_log(tmp_path, n=40, segment_size=300)
    first = sorted(tmp_path.glob("wal-*.log"))[0]
    assert first != segment
    with first.open("r+b") as f:
        f.truncate(first.stat().st_size - 1)
    with pytest.raises(StorageCorruptError, match=f"raft log {first} is damaged at offset"):
        open_disk(tmp_path)


def test_missing_segment_is_refused(tmp_path: Path) -> None:
    saved_log(tmp_path, n=40, segment_size=300)
    segments = sorted(tmp_path.glob("wal-*.log"))
    segments[1].unlink()
    with pytest.raises(StorageCorruptError, match=f"raft log {segments[1]} is missing"):
        open_disk(tmp_path)


def test_missing_snapshot_is_refused(tmp_path: Path) -> None:
    with open_disk(tmp_path) as s:
        s.save(HardState(1, 1, 2), [Entry(1, 1), Entry(1, 2)], None)
        s.create_snapshot(2, CONF, b"two")
    [snap] = tmp_path.glob("snap-*.snap")
    snap.unlink()
    with pytest.raises(StorageCorruptError, match=f"raft snapshot {snap} is missing"):
        open_disk(tmp_path)


def test_damaged_snapshot_is_refused(tmp_path: Path) -> None:
    with open_disk(tmp_path) as s:
        s.save(HardState(1, 1, 2), [Entry(1, 1), Entry(1, 2)], None)
        s.create_snapshot(2, CONF, b"two")
    [snap] = tmp_path.glob("snap-*.snap")
    snap.write_bytes(snap.read_bytes()[:-1] + b"!")
    with pytest.raises(StorageCorruptError, match=f"raft snapshot {snap} is damaged"):
        open_disk(tmp_path)


def test_leftovers_of_interrupted_writes_are_ignored_and_removed(tmp_path: Path) -> None:
    with open_disk(tmp_path) as s:
        s.save(HardState(1, 1, 1), [Entry(1, 1)], None)
        state = observe(s)
    orphan = tmp_path / "snap-0000000000000009-0000000000000001.snap"  # written, never logged
    orphan.write_bytes(b"half a snapshot")
    (tmp_path / "wal-0000000000000002.log.tmp").write_bytes(b"a segment being created")
    with open_disk(tmp_path) as s:
        assert observe(s) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "LOCK",
        "raft.meta",
        "wal-0000000000000001.log",
    ]


FRESH = (
    (HardState(), CONF),
    1,
    0,
    0,
    [],
    Snapshot(metadata=SnapshotMetadata(conf_state=CONF)),
)


def test_a_missing_meta_file_with_log_segments_is_refused_naming_them(tmp_path: Path) -> None:
    with open_disk(tmp_path, conf_state=CONF) as s:
        for i in range(1, 21):
            s.save(HardState(2, 3, i - 1), [Entry(2, i, data=b"entry %d" % i)], None)
    (tmp_path / "raft.meta").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(MissingMetaError) as e:
        open_disk(tmp_path, conf_state=CONF)
    message = str(e.value)
    assert isinstance(e.value, RaftError)
    assert "\n" not in message
    assert "wal-0000000000000001.log" in message and "no raft.meta" in message
    assert "restore raft.meta" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing wiped


def test_a_missing_meta_file_with_a_snapshot_is_refused(tmp_path: Path) -> None:
    with open_disk(tmp_path, conf_state=CONF) as s:
        s.save(HardState(1, 1, 2), [Entry(1, 1), Entry(1, 2)], None)
        s.create_snapshot(2, CONF, b"two")
    (tmp_path / "raft.meta").unlink()
    for segment in tmp_path.glob("wal-*.log"):
        segment.unlink()
    with pytest.raises(MissingMetaError, match=r"snap-0000000000000002-0000000000000001\.snap"):
        open_disk(tmp_path)


class Crash(BaseException):
    """The process stops here: nothing after this file-system call happens."""


_FS_CALLS = ("open", "write", "fsync", "fdatasync", "replace", "unlink", "close")


def first_start_stopping_at(
    path: Path, k: int, conf: ConfState | None, monkeypatch: pytest.MonkeyPatch
) -> bool:
    """Run a first start that stops (as if killed) at its k-th file-system call; returns
    whether it finished before that."""
    real = {name: getattr(os, name) for name in _FS_CALLS}
    count = 0
    left_open: set[int] = set()  # a dead process's descriptors close with it

    def crashing(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == k:
                raise Crash
            result = real[name](*args, **kwargs)
            if name == "open":
                left_open.add(result)
            elif name == "close":
                left_open.discard(args[0])
            return result

        return call

    for name in _FS_CALLS:
        monkeypatch.setattr(os, name, crashing(name))
    try:
        open_disk(path, conf_state=conf).close()
        return True
    except Crash:
        return False
    finally:
        for name in _FS_CALLS:
            monkeypatch.setattr(os, name, real[name])
        for fd in left_open:
            os.close(fd)
        ww_disk._locks.clear()


@pytest.mark.parametrize("conf", [CONF, None])
def test_a_first_start_interrupted_anywhere_starts_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf: ConfState | None
) -> None:
    """Stop the first start before its k-th file-system call, for every k: the next start
    must never mistake what is left for a storage that lost its raft.meta."""
    want = FRESH if conf is not None else ((HardState(), ConfState()), 1, 0, 0, [], Snapshot())
    k = 0
    finished = False
    while not finished:
        k += 1
        path = tmp_path / str(k)
        finished = first_start_stopping_at(path, k, conf, monkeypatch)
        with open_disk(path, conf_state=conf) as s:
            assert observe(s) == want, f"stopped before call {k}"
    assert k > 10


def test_an_interrupted_first_start_is_started_again(tmp_path: Path) -> None:
    (tmp_path / "wal-0000000000000001.log.tmp").write_bytes(b"partial")
    (tmp_path / "snap-0000000000000000-0000000000000000.snap").write_bytes(b"")
    (tmp_path / "raft.meta.tmp").write_bytes(b"")
    with open_disk(tmp_path, conf_state=CONF) as s:
        assert observe(s) == (
            (HardState(), CONF),
            1,
            0,
            0,
            [],
            Snapshot(metadata=SnapshotMetadata(conf_state=CONF)),
        )


# --- directories that are not ours ---


def test_directory_of_another_node_is_refused(tmp_path: Path) -> None:
    DiskStorage.open(tmp_path, node_id=2, cluster_id="c1", sync=False).close()
    with pytest.raises(ForeignDirectoryError) as e:
        DiskStorage.open(tmp_path, node_id=3, cluster_id="c1", sync=False)
    assert str(e.value) == (
        f"raft data in {tmp_path} belongs to node 2 of cluster 'c1', "
        "not node 3 of cluster 'c1'; use another --data-dir"
    )


@pytest.mark.parametrize("other", ["c2", 1])
def test_directory_of_another_cluster_is_refused(tmp_path: Path, other: str | int) -> None:
    DiskStorage.open(tmp_path, node_id=2, cluster_id="1", sync=False).close()
    with pytest.raises(ForeignDirectoryError, match="belongs to node 2 of cluster '1', not node"):
        DiskStorage.open(tmp_path, node_id=2, cluster_id=other, sync=False)


def test_directory_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ForeignDirectoryError) as e:
        open_disk(tmp_path)
    assert str(e.value) == (
        f"{tmp_path} is not empty and holds no raft data (it has 'notes.txt'); "
        "use an empty or new --data-dir"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ForeignDirectoryError, match=f"{tmp_path / 'f'} is not a directory"):
        open_disk(tmp_path / "f")


@pytest.mark.parametrize("name", ["raft.meta", "segment", "snapshot"])
@pytest.mark.parametrize("seed", range(3))
def test_garbage_files_are_refused_with_one_line(tmp_path: Path, name: str, seed: int) -> None:
    with open_disk(tmp_path) as s:
        s.save(HardState(1, 1, 1), [Entry(1, 1)], None)
        s.create_snapshot(1, CONF, b"one")
    path = {
        "raft.meta": tmp_path / "raft.meta",
        "segment": next(tmp_path.glob("wal-*.log")),
        "snapshot": next(tmp_path.glob("snap-*.snap")),
    }[name]
    path.write_bytes(random.Random(seed).randbytes(300))
    with pytest.raises((StorageCorruptError, ForeignDirectoryError)) as e:
        open_disk(tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xa5hello",  # not msgpack of a record
        msgpack.packb([9, 1, 2]),  # an unknown kind
        msgpack.packb([1, None, [[1, 100, 0, b""]], None]),  # entries that leave a gap in the log
        msgpack.packb([3, 50, 1]),  # compaction past the end of the log
    ],
)
def test_intact_frames_that_are_not_valid_records_are_refused(
    tmp_path: Path, payload: bytes
) -> None:
    segment = saved_log(tmp_path)
    size = segment.stat().st_size
    with segment.open("ab") as f:
        f.write(wal.frame(payload))
    with pytest.raises(StorageCorruptError) as e:
        open_disk(tmp_path)
    assert str(e.value).startswith(f"raft log {segment} holds an invalid record at offset {size}")


def test_unreadable_files_are_refused_with_one_line(tmp_path: Path) -> None:
    saved_log(tmp_path)
    (tmp_path / "raft.meta").unlink()
    (tmp_path / "raft.meta").mkdir()
    with pytest.raises(StorageError) as e:
        open_disk(tmp_path)
    assert str(e.value).startswith(f"cannot open raft data in {tmp_path}: [Errno 21]")


def test_a_directory_open_in_another_process_is_refused(tmp_path: Path) -> None:
    saved_log(tmp_path)
    holder = (
        "import sys; from ww.raft.disk import DiskStorage\n"
        "s = DiskStorage.open(sys.argv[1], node_id=1, cluster_id='c1')\n"
        "print('open', flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "open\n"
        with pytest.raises(StorageLockedError, match="in use by another process"):
            open_disk(tmp_path)
    finally:
        child.communicate("")
    with open_disk(tmp_path) as s:
        assert s.last_index() == 5


def test_closed_storage_refuses_writes(tmp_path: Path) -> None:
    s = open_disk(tmp_path)
    s.close()
    with pytest.raises(StorageError, match=f"raft storage in {tmp_path} is closed"):
        s.save(HardState(1, 1, 0), [Entry(1, 1)], None)
    s.close()  # closing twice is harmless


def test_a_failed_write_is_undone_and_the_storage_refuses_more(tmp_path: Path) -> None:
    """A real failed write: the file size limit lets only part of a save reach the file."""
    segment = saved_log(tmp_path)
    size = segment.stat().st_size
    script = (
        "import resource, signal, sys\n"
        "from ww.raft.disk import DiskStorage\n"
        "from ww.raft.storage import StorageError\n"
        "from ww.raft.types import Entry, HardState\n"
        "s = DiskStorage.open(sys.argv[1], node_id=1, cluster_id='c1', sync=False)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]) + 100,) * 2)\n"
        "for i in range(2):\n"
        "    try:\n"
        "        s.save(HardState(1, 1, 5), [Entry(1, 6, data=bytes(1000))], None)\n"
        "    except StorageError as e:\n"
        "        print(e)\n"
        "print(s.last_index())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(size)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(f"cannot write {segment}: [Errno 27] File too large")
    assert out[1].startswith(f"raft storage in {tmp_path} failed earlier: cannot write")
    assert out[2] == "5"
    assert segment.stat().st_size == size  # the partial record was cut off again
    with open_disk(tmp_path) as s:
        assert (s.last_index(), s.initial_state()[0].commit) == (5, 4)


def test_entries_with_a_hole_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with open_disk(tmp_path) as s:
        s.save(HardState(1, 1, 0), [Entry(1, 1)], None)
        with pytest.raises(ValueError, match="entries to append skip from 2 to 4"):
            s.save(HardState(1, 1, 1), [Entry(1, 2), Entry(1, 4)], None)
        assert (s.last_index(), s.initial_state()[0].commit) == (1, 0)
    with open_disk(tmp_path) as s:
        assert (s.last_index(), s.initial_state()[0].commit) == (1, 0)


def test_a_compaction_interrupted_between_two_deletions_reopens_intact(tmp_path: Path) -> None:
    """Compaction deletes old segments oldest first; whichever prefix of them was deleted when
    the process died, the rest replays to the same state."""
    before, after = tmp_path / "before", tmp_path / "after"
    with open_disk(before, segment_size=600) as s:
        term = 1
        for step in range(1, 81):
            i = s.last_index() + 1
            if step % 20 == 0:  # a conflicting suffix: the log shrinks after a new segment began
                term, i = term + 1, i - 4
            s.save(HardState(term, 1, i - 2), [Entry(term, i, data=bytes(60))], None)
    shutil.copytree(before, after)
    with open_disk(after, segment_size=600) as s:
        s.create_snapshot(45, CONF, b"snap")
        s.compact(45)
        state = observe(s)
    old = sorted(p.name for p in before.glob("wal-*.log"))
    kept = sorted(p.name for p in after.glob("wal-*.log"))
    deleted = old[: old.index(kept[0])]
    assert len(deleted) > 3
    for n in range(1, len(deleted)):
        partial = tmp_path / f"partial{n}"
        shutil.copytree(after, partial)
        for name in deleted[n:]:
            shutil.copy(before / name, partial / name)
        with open_disk(partial) as s:
            assert observe(s) == state


# --- sync ---


def count_fdatasyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the fd of every fdatasync DiskStorage makes (each still runs)."""
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def test_a_save_without_sync_writes_but_does_not_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_disk(tmp_path, sync=True) as s:
        s.save(HardState(1, 1, 0), [Entry(1, 1), Entry(1, 2)], None)
        calls = count_fdatasyncs(monkeypatch)
        s.save(HardState(1, 1, 2), [], None, sync=False)
        assert calls == []
        s.save(HardState(1, 1, 2), [Entry(1, 3)], None)  # covers the unsynced record too
        assert len(calls) == 1


def test_an_unsynced_save_is_recovered_after_reopen(tmp_path: Path) -> None:
    """The record is written whole and checksummed; a process crash (the storage is never
    closed, so nothing syncs it later) keeps it in the page cache."""
    program = (
        "import sys, os\n"
        "from ww.raft.disk import DiskStorage\n"
        "from ww.raft.types import Entry, HardState\n"
        "s = DiskStorage.open(sys.argv[1], node_id=1, cluster_id='c1', sync=True)\n"
        "s.save(HardState(2, 1, 0), [Entry(2, 1, data=b'a')], None)\n"
        "s.save(HardState(2, 1, 1), [], None, sync=False)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", program, str(tmp_path)], check=True)
    with open_disk(tmp_path) as s:
        assert s.initial_state()[0] == HardState(2, 1, 1)
        assert s.entries(1, 2) == [Entry(2, 1, data=b"a")]


def test_a_segment_with_unsynced_records_is_synced_before_the_next_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_disk(tmp_path, sync=True, segment_size=4096) as s:
        s.save(HardState(1, 1, 0), [Entry(1, 1, data=bytes(3000))], None)
        calls = count_fdatasyncs(monkeypatch)
        s.save(HardState(1, 1, 1), [], None, sync=False)
        first = s._fd
        s.save(HardState(1, 1, 1), [Entry(1, 2, data=bytes(3000))], None)
        assert len(list(tmp_path.glob("wal-*.log"))) == 2
        assert calls[0] == first and s._fd != first
