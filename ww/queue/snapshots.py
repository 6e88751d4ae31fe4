"""Raft snapshots of the queue as files in the replica's volume, named by a small marker.

A replica's Raft snapshot data is not the database but a marker (msgpack
`{"file": NAME, "index": I}`) that stands for the database at index I or later, so neither
taking, storing, sending nor installing a snapshot holds the database in memory:

- taking: the state is committed and made durable (its applied index is in the same
  transaction), and that is all: the database itself is the snapshot, so taking one costs
  no copy, however large the state;
- sending (`SnapshotFiles.ensure`, in a worker thread): only when a follower needs the
  snapshot is the database copied, through a connection of its own (SQLite's backup API,
  which reads one consistent committed state), into `NAME.tmp`, fsynced and renamed to
  `NAME`; the Raft loop goes on meanwhile. The transport streams it in chunks, then a
  trailer with its size and SHA-256. The copy holds the state at index I or later: the
  queue's state machine refuses entries at or below its own applied index, so entries the
  copy already holds are not applied twice after it is installed;
- receiving (`Receiver`): the chunks go to `NAME.partial`, which is checked against the
  trailer, fsynced and renamed to `NAME`; only then is the snapshot message handed to Raft;
- installing: the state machine copies the named file into place (`restore_from`, which checks
  the database before it replaces the current one), unless its database is at or past I.

Crashes: a file appears under its final name only when complete; older files are removed
(`prune`) only once Raft's storage names a newer snapshot, which the database is at or past.
A replica that restarts with its database behind the stored snapshot installs the received
file, which is kept until then.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

from ww.durable import fsync_dir

__all__ = ["Marker", "Receiver", "SnapshotFileError", "SnapshotFiles", "read_chunks"]

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
_NAME = re.compile(r"snap-(\d{19})\.db")


class SnapshotFileError(Exception):
    """A snapshot marker or file that cannot be used; one line."""


@dataclass(slots=True, frozen=True)
class Marker:
    """What the Raft snapshot holds: the file, and the index it holds the state at (or past)."""

    file: str
    index: int

    def encode(self) -> bytes:
        return bytes(msgpack.packb({"file": self.file, "index": self.index}))

    @staticmethod
    def for_index(index: int) -> Marker:
        return Marker(f"snap-{index:019d}.db", index)

    @staticmethod
    def decode(data: bytes) -> Marker:
        try:
            m = msgpack.unpackb(data, raw=False)
            marker = Marker(m["file"], m["index"])
        except Exception as e:
            raise SnapshotFileError(f"not a queue snapshot marker ({e})") from None
        if (
            not isinstance(marker.index, int)
            or isinstance(marker.index, bool)
            or not 0 < marker.index < 10**19
            or marker != Marker.for_index(marker.index)
        ):
            raise SnapshotFileError(f"malformed queue snapshot marker {m!r:.200}")
        return marker


class SnapshotFiles:
    """The snapshot files of one replica, in `directory`. `copy(path)` writes the current
    state (at the last snapshot's index or later) to a file; without it, files only arrive."""

    def __init__(self, directory: Path, copy: Callable[[Path], None] | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write = copy
        self.lock = threading.Lock()
        """Held while a file is written from the database; hold it to replace the database."""

    def path(self, marker: Marker) -> Path:
        return self.dir / marker.file

    def complete(self, marker: Marker) -> bool:
        return self.path(marker).exists()

    def ensure(self, marker: Marker) -> Path:
        """The file `marker` names, written from the database first if it is missing (blocks:
        call it in a worker thread). Raises SnapshotFileError when it cannot be written."""
        with self.lock:
            final = self.path(marker)
            if final.exists():
                return final
            if self._write is None:
                raise SnapshotFileError(f"snapshot file {marker.file} is missing")
            logger.info("writing snapshot file %s", marker.file)
            tmp = final.with_name(final.name + ".tmp")
            try:
                tmp.unlink(missing_ok=True)
                self._write(tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                fsync_dir(self.dir)
            except Exception as e:  # nothing under the final name; the next send tries again
                tmp.unlink(missing_ok=True)
                raise SnapshotFileError(f"cannot write snapshot file {final}: {e}") from None
            return final

    def receiver(self, marker: Marker) -> Receiver:
        """Where an incoming copy of the file `marker` names is written."""
        return Receiver(self, marker)

    def prune(self, keep: Marker) -> None:
        """Remove the snapshot files older than `keep` (the one Raft's storage names, which
        the database is at or past), and temporary or partial files left below it."""
        for path in self.dir.iterdir():
            m = _NAME.match(path.name)
            if m is not None and int(m[1]) < keep.index:
                logger.debug("removing old snapshot file %s", path)
                path.unlink(missing_ok=True)


class Receiver:
    """Writes an incoming snapshot file in chunks; `finish(size, sha256)` checks it, fsyncs it
    and puts it under its name. `abort()` removes what was written."""

    def __init__(self, files: SnapshotFiles, marker: Marker) -> None:
        self.marker = marker
        self._files = files
        self.partial = files.path(marker).with_name(marker.file + ".partial")
        self._f: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115 (closed in finish/abort)
        self._hash = _sha256()
        self.size = 0
        self.done = False

    def write(self, chunk: bytes) -> None:
        assert self._f is not None
        self.size += len(chunk)
        self._hash.update(chunk)
        self._f.write(chunk)

    def finish(self, size: int, sha256: bytes) -> None:
        assert self._f is not None
        if self.size != size or self._hash.digest() != sha256:
            raise SnapshotFileError(
                f"snapshot file {self.marker.file} arrived damaged or incomplete ({self.size} "
                f"of {size} bytes, or another digest)"
            )
        f, self._f = self._f, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self.partial, self._files.path(self.marker))
        fsync_dir(self._files.dir)
        self.done = True

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self.partial.unlink(missing_ok=True)


def read_chunks(path: Path, size: int = CHUNK) -> Generator[bytes, None, tuple[int, bytes]]:
    """The file's bytes in chunks; returns (size, SHA-256) when exhausted. The file is opened
    now, so a later unlink does not cut the stream short."""
    f = open(path, "rb")  # noqa: SIM115 (closed when the generator ends)

    def chunks() -> Generator[bytes, None, tuple[int, bytes]]:
        h, total = _sha256(), 0
        with f:
            while chunk := f.read(size):
                h.update(chunk)
                total += len(chunk)
                yield chunk
        return total, h.digest()

    return chunks()


def _sha256() -> hashlib._Hash:
    return hashlib.sha256()
