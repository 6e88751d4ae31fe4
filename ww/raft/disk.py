"""Durable raft storage: the log, hard state and snapshot in a directory, the log also in memory.

The directory holds:

- ``raft.meta``: whose data this is (format, version, node id, cluster id).
- ``LOCK``: held with ``flock`` while a process has the storage open.
- ``wal-<seq>.log``: write-ahead log segments, framed msgpack records (`ww.raft.wal`).
- ``snap-<index>-<term>.snap``: the current snapshot.

Each `save()` is one write and one fsync. Every segment starts with a header that checkpoints the
state at its start, so the segments wholly before the compaction point can be deleted. Reads are
served from a `MemoryStorage` that holds what is on disk: a write changes it once its record is
written. The format and its guarantees are described in docs/raft-storage.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack

from ww.raft import wal
from ww.raft.errors import RaftError
from ww.raft.memory import MemoryStorage
from ww.raft.storage import (
    CompactedError,
    SnapshotOutOfDateError,
    StorageError,
    UnavailableError,
)
from ww.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
    snapshot_from_wire,
    snapshot_to_wire,
)

log = logging.getLogger(__name__)

_ENTRY_TYPES = tuple(EntryType)  # by value: decoding an enum by lookup is much faster

FORMAT = "ww.raft.disk"
VERSION = 1
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

META = "raft.meta"
LOCK = "LOCK"
_SEGMENT = re.compile(r"wal-([0-9a-f]{16})\.log")
_SNAPSHOT = re.compile(r"snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap")
_TEMP = re.compile(r"(raft\.meta|wal-[0-9a-f]{16}\.log|snap-[0-9a-f]{16}-[0-9a-f]{16}\.snap)\.tmp")
_LEFTOVER = re.compile(rf"LOCK|{_SEGMENT.pattern}|{_SNAPSHOT.pattern}|{_TEMP.pattern}")

# Log record kinds: the first element of each record's msgpack list.
R_HEADER = 0  # [0, seq, [term, vote, commit], last index, last term, [snap index, term] | None]
# [1, [index, term] | None, [entry, ...], [term, vote, commit] | None]: one save(), applied whole:
# an installed snapshot replaces the log, then the entries replace it from their first index on.
R_SAVE = 1
R_SNAPSHOT = 2  # [2, index, term]: the application took a snapshot at index
R_COMPACT = 3  # [3, index, term]: the log up to and including index is discarded


class StorageCorruptError(StorageError):
    """The stored data is damaged or is not raft data; the storage refuses to open."""


class ForeignDirectoryError(StorageError):
    """The directory belongs to another node or cluster, or holds something else entirely."""


class StorageLockedError(StorageError):
    """Another process has the directory open."""


class MissingMetaError(StorageCorruptError, RaftError):
    """Log data without ``raft.meta``: the directory lost its metadata file, so the node
    refuses to start rather than forget its vote and the entries it acknowledged."""


def _segment_name(seq: int) -> str:
    return f"wal-{seq:016x}.log"


def _snapshot_name(index: int, term: int) -> str:
    return f"snap-{index:016x}-{term:016x}.snap"


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _to_write(entries: Sequence[Entry], offset: int, last: int) -> Sequence[Entry]:
    """`entries` less those at or below `offset`, checked to be contiguous and to follow a log
    ending at `last`: what a save record holds."""
    if not entries:
        return entries
    first = entries[0].index
    for i, e in enumerate(entries):
        if e.index != first + i:
            raise ValueError(f"entries to append skip from {first + i - 1} to {e.index}")
    if first > last + 1:
        raise UnavailableError(f"missing log entries: last index {last}, appending at {first}")
    return entries[offset + 1 - first :] if first <= offset else entries


@dataclass(frozen=True, slots=True)
class _Segment:
    seq: int
    floor: int  # the log's last index when the segment was started


class DiskStorage:
    """A `LogStorage` that survives `kill -9` at any instant. Open it with `DiskStorage.open`.

    Make one call at a time; a driver may run `save()` in a worker thread while it waits.
    """

    def __init__(self, directory: Path, sync: bool, segment_size: int) -> None:
        self._dir = directory
        self._sync = sync
        self._segment_size = segment_size
        self._cache = MemoryStorage()  # what is on disk, for reads
        self._snapshot_id: tuple[int, int] | None = None  # (index, term) of the snapshot file
        self._segments: list[_Segment] = []
        self._install_seq = 0  # the segment holding the latest installed snapshot's record
        self._fd = -1  # the last segment, open for appending
        self._size = 0  # bytes in the last segment
        self._unsynced = False  # the last segment has records written with sync=False
        self._header_end = 0  # where the last segment's header ends
        self._dir_fd = -1
        self._lock: Path | None = None
        self._failed = ""

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        node_id: int,
        cluster_id: str | int,
        sync: bool = True,
        conf_state: ConfState | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> DiskStorage:
        """Open the raft data of `node_id` in `cluster_id` at `path`, creating it if needed.

        A new storage starts from `conf_state` (the voters of a new cluster; None for a node
        that joins an existing one), as `MemoryStorage(conf_state)` does; an existing one
        ignores it. `sync=False` skips every fsync, for simulations; all else is identical.
        """
        if node_id <= 0:
            raise ValueError(f"node id must be positive, not {node_id}")
        directory = Path(path)
        names = _prepare_directory(directory)
        self = cls(directory, sync, segment_size)
        try:
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            self._lock = _lock(directory)
            if META in names:
                _check_meta(directory, node_id, cluster_id)
                self._recover()
            else:
                _refuse_data_without_meta(directory, names)
                self._initialize(node_id, cluster_id, conf_state)
        except OSError as e:
            self._release()
            raise StorageError(f"cannot open raft data in {directory}: {e}") from e
        except BaseException:
            self._release()
            raise
        return self

    @property
    def path(self) -> Path:
        return self._dir

    # --- Storage (reads, all from the MemoryStorage copy) ---

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._cache.initial_state()

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        return self._cache.entries(lo, hi, max_size)

    def term(self, index: int) -> int:
        return self._cache.term(index)

    def first_index(self) -> int:
        return self._cache.first_index()

    def last_index(self) -> int:
        return self._cache.last_index()

    def snapshot(self) -> Snapshot:
        return self._cache.snapshot()

    # --- LogStorage (writes) ---

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        *,
        sync: bool = True,
    ) -> None:
        """Persist a snapshot to install, entries and hard state with one write and, if `sync`,
        one fsync. Unsynced, the record is still one checksummed record (a crash keeps it
        whole or loses it whole) and the next synced write makes it durable too."""
        self._check_usable()
        cache = self._cache
        offset, last = cache.first_index() - 1, cache.last_index()
        install = snapshot if snapshot is not None and not snapshot.is_empty() else None
        if install is not None:
            current = cache.snapshot().metadata.index
            if install.metadata.index <= current:
                raise SnapshotOutOfDateError(
                    f"snapshot at index {install.metadata.index} is not newer than the stored "
                    f"one at {current}"
                )
            offset = last = install.metadata.index
        new = _to_write(entries, offset, last)
        hs = hard_state if hard_state != cache.hard_state else None
        if install is not None:
            self._write_snapshot_file(install)
        if install is not None or new or hs is not None:
            snap = None if install is None else [offset, install.metadata.term]
            wire = [[e.term, e.index, int(e.type), e.data] for e in new]
            state = None if hs is None else [hs.term, hs.vote, hs.commit]
            self._append(wal.frame(_pack([R_SAVE, snap, wire, state])), sync=sync)
        # The copy changes only once the record is written, each step as MemoryStorage makes
        # it: the conflicting suffix is replaced in one step, so a reader in another thread
        # sees the log before or after it.
        if install is not None:
            cache.apply_snapshot(install)
            self._snapshot_id = (offset, install.metadata.term)
            self._install_seq = self._segments[-1].seq
        cache.append(new)
        if hard_state is not None:
            cache.set_hard_state(hard_state)
        if install is not None:
            self._remove_stale_snapshots()
            self._prune()

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        self._check_usable()
        current = self._cache.snapshot().metadata.index
        if index <= current:
            raise SnapshotOutOfDateError(
                f"snapshot at index {index} is not newer than the stored one at {current}"
            )
        term = self._cache.term(index)
        snapshot = Snapshot(data, SnapshotMetadata(index, term, conf_state))
        self._write_snapshot_file(snapshot)
        self._append(wal.frame(_pack([R_SNAPSHOT, index, term])))
        self._cache.set_snapshot(snapshot)
        self._snapshot_id = (index, term)
        self._remove_stale_snapshots()
        return snapshot

    def compact(self, index: int) -> None:
        self._check_usable()
        if index < self._cache.first_index():
            raise CompactedError(f"index {index} is already compacted")
        term = self._cache.term(index)
        self._append(wal.frame(_pack([R_COMPACT, index, term])))
        self._cache.compact(index)
        self._prune()

    def close(self) -> None:
        if self._unsynced and self._fd >= 0:
            with contextlib.suppress(OSError):  # a failed sync only loses commit indexes
                os.fdatasync(self._fd)
            self._unsynced = False
        self._release()

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- writing ---

    def _check_usable(self) -> None:
        if self._failed:
            raise StorageError(f"raft storage in {self._dir} failed earlier: {self._failed}")
        if self._fd < 0:
            raise StorageError(f"raft storage in {self._dir} is closed")

    def _append(self, data: bytes, *, sync: bool = True) -> None:
        """Append `data` to the log, rolling to a new segment first if it would overflow;
        fdatasync it (and any unsynced record before it) if `sync`."""
        if self._size > self._header_end and self._size + len(data) > self._segment_size:
            self._roll()
        try:
            _write_all(self._fd, data)
            if self._sync and sync:
                os.fdatasync(self._fd)
            self._unsynced = self._sync and not sync
        except OSError as e:
            self._failed = f"cannot write {self._segment_path(self._segments[-1].seq)}: {e}"
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise StorageError(self._failed) from e
        self._size += len(data)

    def _roll(self) -> None:
        """Start the next segment with a header checkpointing the current state."""
        if self._unsynced:  # a later segment's records must not outlive this one's
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self._failed = f"cannot sync {self._segment_path(self._segments[-1].seq)}: {e}"
                raise StorageError(self._failed) from e
            self._unsynced = False
        fd = self._create_segment(self._segments[-1].seq + 1)
        os.close(self._fd)
        self._fd = fd

    def _create_segment(self, seq: int, *, publish: bool = True) -> int:
        """Create segment `seq` holding a header that checkpoints the current state, atomically,
        and make it the last segment. Unless `publish`, it keeps its temporary name (the first
        start renames it once raft.meta exists)."""
        last = self._cache.last_index()
        hs = self._cache.hard_state
        snap = None if self._snapshot_id is None else list(self._snapshot_id)
        header = [R_HEADER, seq, [hs.term, hs.vote, hs.commit], last, self._cache.term(last), snap]
        data = wal.frame(_pack(header))
        name = _segment_name(seq)
        temp = self._dir / f"{name}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            try:
                _write_all(fd, data)
                if self._sync:
                    os.fsync(fd)
                if publish:
                    os.replace(temp, self._dir / name)
                    self._sync_dir()
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            self._failed = f"cannot create {self._dir / name}: {e}"
            raise StorageError(self._failed) from e
        self._size = self._header_end = len(data)
        self._segments.append(_Segment(seq, last))
        return fd

    def _write_snapshot_file(self, snapshot: Snapshot) -> None:
        m = snapshot.metadata
        payload = _pack([FORMAT, VERSION, snapshot_to_wire(snapshot)])
        try:
            self._write_atomically(_snapshot_name(m.index, m.term), wal.frame(payload))
        except OSError as e:
            raise StorageError(f"cannot write a snapshot in {self._dir}: {e}") from e

    def _write_atomically(self, name: str, data: bytes) -> None:
        """Write a whole file under a temporary name, fsync it, rename it, fsync the directory."""
        temp = self._dir / f"{name}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            if self._sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self._dir / name)
        self._sync_dir()

    def _sync_dir(self) -> None:
        if self._sync:
            os.fsync(self._dir_fd)

    def _remove_stale_snapshots(self) -> None:
        keep = None if self._snapshot_id is None else _snapshot_name(*self._snapshot_id)
        for name in os.listdir(self._dir):
            if _SNAPSHOT.fullmatch(name) and name != keep:
                self._remove(name)

    def _prune(self) -> None:
        """Delete the segments that a replay no longer needs, oldest first.

        Replay may start at segment k if its header's last index is within the compacted part
        of the log, or if a later snapshot install replaces the log anyway. Only segments before
        a run of such starts are deleted, so a crash between two deletions leaves a valid start.
        """
        segments = self._segments
        compacted = self._cache.first_index() - 1
        start = 0
        for k in range(1, len(segments)):
            s = segments[k]
            if s.seq <= self._install_seq or s.floor <= compacted:
                start = k
            else:
                break
        while start and self._remove(_segment_name(segments[0].seq)):
            del segments[0]
            start -= 1

    def _remove(self, name: str) -> bool:
        """Delete a file no longer needed. A failure only costs disk space: it is logged."""
        try:
            os.unlink(self._dir / name)
            self._sync_dir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot delete %s: %s", self._dir / name, e)
            return False
        return True

    def _segment_path(self, seq: int) -> Path:
        return self._dir / _segment_name(seq)

    # --- opening ---

    def _release(self) -> None:
        for name in ("_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

    def _initialize(
        self, node_id: int, cluster_id: str | int, conf_state: ConfState | None
    ) -> None:
        """Create a new storage. The first segment is written and synced under its temporary
        name, then raft.meta is written (atomically), then the segment is renamed. A crash
        before raft.meta exists leaves only leftovers (temporary files, the initial snapshot),
        which the next open removes; a crash after it leaves the synced temporary segment,
        which the next open renames. So log segments without raft.meta never come from an
        interrupted start: `open` refuses them."""
        for name in os.listdir(self._dir):
            if name != LOCK:
                self._remove(name)
        if conf_state is not None:
            self._cache = MemoryStorage(conf_state)
            self._snapshot_id = (0, 0)
            self._write_snapshot_file(self._cache.snapshot())
        self._fd = self._create_segment(1, publish=False)
        meta: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        meta.update(node_id=node_id, cluster_id=cluster_id)
        self._write_atomically(META, wal.frame(_pack(meta)))
        self._publish_first_segment()

    def _publish_first_segment(self) -> None:
        first = self._segment_path(1)
        os.replace(first.with_name(f"{first.name}.tmp"), first)
        self._sync_dir()

    def _recover(self) -> None:
        """Rebuild the state from the segments and the snapshot they name."""
        names = os.listdir(self._dir)
        first_tmp = f"{_segment_name(1)}.tmp"
        if first_tmp in names and not any(_SEGMENT.fullmatch(n) for n in names):
            # A first start that wrote raft.meta and stopped before renaming its segment.
            log.info("raft data in %s: finishing an interrupted first start", self._dir)
            self._publish_first_segment()
            names = os.listdir(self._dir)
        for name in names:
            if _TEMP.fullmatch(name):
                self._remove(name)
        seqs = sorted(int(m[1], 16) for n in names if (m := _SEGMENT.fullmatch(n)))
        if not seqs:
            raise StorageCorruptError(f"raft data in {self._dir} has no log segments (wal-*.log)")
        for a, b in itertools.pairwise(seqs):
            if b != a + 1:
                raise StorageCorruptError(
                    f"raft log {self._segment_path(a + 1)} is missing (the log continues in "
                    f"{self._segment_path(b).name}); refusing to start"
                )
        replay = _Replay()
        torn_at = -1
        for seq in seqs:
            path = self._segment_path(seq)
            buf = path.read_bytes()
            scan = wal.scan(buf)
            if scan.problem:
                if seq != seqs[-1] or wal.next_intact_frame(buf, scan.end + 1) is not None:
                    raise StorageCorruptError(
                        f"raft log {path} is damaged at offset {scan.end} ({scan.problem}) "
                        "before the end of the log; refusing to start"
                    )
                if scan.records:
                    torn_at = scan.end
                    log.warning(
                        "raft log %s: discarding a torn record at offset %d (%s, %d bytes) "
                        "left by an interrupted write",
                        path,
                        scan.end,
                        scan.problem,
                        len(buf) - scan.end,
                    )
            replay.segment(path, seq, scan.records)
            self._header_end = scan.records[0][1].nbytes + wal.HEAD_SIZE
            self._size = scan.end
        self._cache = replay.cache
        self._segments = replay.segments
        self._install_seq = replay.install_seq
        self._snapshot_id = replay.snapshot_id
        if replay.snapshot_id is not None:
            self._cache.set_snapshot(self._read_snapshot(*replay.snapshot_id))
        path = self._segment_path(seqs[-1])
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if torn_at >= 0:
            os.ftruncate(self._fd, torn_at)
            if self._sync:
                os.fsync(self._fd)
        self._remove_stale_snapshots()
        self._prune()

    def _read_snapshot(self, index: int, term: int) -> Snapshot:
        path = self._dir / _snapshot_name(index, term)
        try:
            buf = path.read_bytes()
        except FileNotFoundError:
            raise StorageCorruptError(
                f"raft snapshot {path} is missing, yet the log refers to it; refusing to start"
            ) from None
        scan = wal.scan(buf)
        try:
            if scan.problem or len(scan.records) != 1:
                raise ValueError(scan.problem or "not exactly one record")
            fmt, version, wire = msgpack.unpackb(scan.records[0][1], raw=False)
            if fmt != FORMAT or version != VERSION:
                raise ValueError(f"format {fmt!r} version {version!r}")
            snapshot = snapshot_from_wire(wire)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise StorageCorruptError(
                f"raft snapshot {path} is damaged ({e}); refusing to start"
            ) from None
        if (snapshot.metadata.index, snapshot.metadata.term) != (index, term):
            raise StorageCorruptError(f"raft snapshot {path} holds another snapshot")
        return snapshot


class _Replay:
    """Rebuilds the state by applying the log's records in order. The log and the hard state
    are rebuilt in a MemoryStorage; the snapshot is loaded once the last one is known."""

    def __init__(self) -> None:
        self.cache = MemoryStorage()
        self.snapshot_id: tuple[int, int] | None = None
        self.segments: list[_Segment] = []
        self.install_seq = 0

    def segment(self, path: Path, seq: int, records: list[tuple[int, memoryview]]) -> None:
        if not records:
            raise StorageCorruptError(f"raft log {path} has no intact header; refusing to start")
        offset = records[0][0]
        try:
            for offset, payload in records:
                record = msgpack.unpackb(payload, raw=False)
                if not isinstance(record, list) or not record:
                    raise ValueError("not a log record")
                if (record[0] == R_HEADER) != (offset == 0):
                    raise ValueError("a segment header must come first, and only there")
                self._apply(seq, record)
        except StorageCorruptError as e:
            raise StorageCorruptError(f"raft log {path} at offset {offset}: {e}") from None
        except (
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            CompactedError,
            UnavailableError,
            msgpack.UnpackException,
        ) as e:
            raise StorageCorruptError(
                f"raft log {path} holds an invalid record at offset {offset} ({e}); "
                "refusing to start"
            ) from None

    def _apply(self, seq: int, record: list[Any]) -> None:
        kind = record[0]
        if kind == R_HEADER:
            _, header_seq, (term, vote, commit), last, last_term, snap = record
            if header_seq != seq:
                raise ValueError(f"its header names segment {header_seq}")
            hard_state = HardState(term, vote, commit)
            snapshot_id = None if snap is None else (snap[0], snap[1])
            if not self.segments:
                self.cache.reset_log(last, last_term)
                self.cache.set_hard_state(hard_state)
                self.snapshot_id = snapshot_id
            elif (hard_state, snapshot_id) != (self.cache.hard_state, self.snapshot_id):
                raise StorageCorruptError("its header disagrees with the segments before it")
            self.segments.append(_Segment(seq, last))
        elif kind == R_SAVE:
            _, install, wire_entries, hs = record
            entries = [Entry(t, i, _ENTRY_TYPES[k], d) for t, i, k, d in wire_entries]
            cache = self.cache
            if install is not None:
                index, term = install
                cache.reset_log(index, term)
                self.snapshot_id = (index, term)
                self.install_seq = seq
            cache.append(_to_write(entries, cache.first_index() - 1, cache.last_index()))
            if hs is not None:
                cache.set_hard_state(HardState(*hs))
        elif kind == R_SNAPSHOT:
            _, index, term = record
            self.snapshot_id = (index, term)
        elif kind == R_COMPACT:
            _, index, _term = record  # the term is the log's own at index
            if index > self.cache.last_index():
                raise ValueError(f"compaction to {index} past the last index")
            if index >= self.cache.first_index():
                self.cache.compact(index)
        else:
            raise ValueError(f"unknown record kind {kind!r}")


def _prepare_directory(directory: Path) -> list[str]:
    """Create `directory` if needed; refuse one that holds something other than raft data."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        names = os.listdir(directory)
    except NotADirectoryError:
        raise ForeignDirectoryError(
            f"{directory} is not a directory; use another --data-dir"
        ) from None
    except FileExistsError:
        raise ForeignDirectoryError(
            f"{directory} is not a directory; use another --data-dir"
        ) from None
    except OSError as e:
        raise StorageError(f"cannot use {directory} for raft data: {e.strerror}") from None
    if META not in names:
        strangers = sorted(n for n in names if not _LEFTOVER.fullmatch(n))
        if strangers:
            raise ForeignDirectoryError(
                f"{directory} is not empty and holds no raft data (it has {strangers[0]!r}); "
                "use an empty or new --data-dir"
            )
    return names


def _refuse_data_without_meta(directory: Path, names: list[str]) -> None:
    """Log segments, or a snapshot past the initial one, without raft.meta: the metadata file
    was lost (a first start never leaves them behind). Starting afresh would forget the vote
    and every acknowledged entry, so refuse, naming the files."""
    data = sorted(
        n
        for n in names
        if _SEGMENT.fullmatch(n) or ((m := _SNAPSHOT.fullmatch(n)) and int(m[1], 16) > 0)
    )
    if data:
        shown = ", ".join(data[:3]) + (f" and {len(data) - 3} more" if len(data) > 3 else "")
        raise MissingMetaError(
            f"{directory} holds raft log data ({shown}) but no {META}; refusing to start, as "
            f"starting empty would forget this node's vote and log: restore {META} from a "
            "backup, or move the directory away and rejoin the node as a new member"
        )


def _check_meta(directory: Path, node_id: int, cluster_id: str | int) -> None:
    path = directory / META
    scan = wal.scan(path.read_bytes())
    meta: Any = None
    if not scan.problem and len(scan.records) == 1:
        with contextlib.suppress(ValueError, TypeError, msgpack.UnpackException):
            meta = msgpack.unpackb(scan.records[0][1], raw=False)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ForeignDirectoryError(
            f"{path} is not a raft metadata file; {directory} holds something else or is "
            "damaged; use another --data-dir"
        )
    if meta.get("version") != VERSION:
        raise ForeignDirectoryError(
            f"raft data in {directory} has format version {meta.get('version')!r}, "
            f"this version reads {VERSION}"
        )
    theirs = (meta.get("node_id"), meta.get("cluster_id"))
    if theirs != (node_id, cluster_id) or type(theirs[1]) is not type(cluster_id):
        raise ForeignDirectoryError(
            f"raft data in {directory} belongs to node {theirs[0]} of cluster {theirs[1]!r}, "
            f"not node {node_id} of cluster {cluster_id!r}; use another --data-dir"
        )


_locks: dict[Path, list[int]] = {}  # directory -> [lock file descriptor, users in this process]


def _lock(directory: Path) -> Path:
    """Lock `directory` against other processes. The lock is per process, so the same process
    may open a directory twice (a simulator restarting a node before dropping the old one)."""
    key = directory.resolve()
    held = _locks.get(key)
    if held is not None:
        held[1] += 1
        return key
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageLockedError(
            f"raft data in {directory} is in use by another process; stop it first"
        ) from None
    _locks[key] = [fd, 1]
    return key


def _unlock(key: Path) -> None:
    held = _locks[key]
    held[1] -= 1
    if held[1] == 0:
        del _locks[key]
        os.close(held[0])
