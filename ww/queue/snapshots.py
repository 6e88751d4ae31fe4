"""Raft snapshots of the queue as files in the replica's volume, named by a small marker.

A replica's Raft snapshot data is not the database but a marker (msgpack
`{"file": NAME, "index": I}`) naming a copy of the database in `<volume>/snapshots/`, so
neither taking, storing, sending nor installing a snapshot holds the database in memory:

- taking (`SnapshotFiles.take`): the state is committed, and a worker thread copies the
  database through a connection of its own (SQLite's backup API, which reads one consistent
  committed state) into `NAME.tmp`, fsyncs it and renames it to `NAME`; the Raft loop goes on
  meanwhile. The copy holds the state at index I or later: the queue's state machine refuses
  entries at or below its own applied index, so entries the copy already holds are not
  applied twice after it is installed.
- sending: the transport waits for `NAME` to be complete and streams it in chunks, then a
  trailer with its size and SHA-256;
- receiving (`Receiver`): the chunks go to `NAME.partial`, which is checked against the
  trailer, fsynced and renamed to `NAME`; only then is the snapshot message handed to Raft;
- installing: the state machine copies the named file into place (`restore_from`, which checks
  the database before it replaces the current one).

Crashes: a file appears under its final name only when complete; older files are removed
(`prune`) only once a newer complete one is named by Raft's storage. A replica that restarts
with the named file missing (it died while copying) writes it again from its database, which
is at or past the snapshot (`ensure`).
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
    """The snapshot files of one replica, in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._copying: threading.Thread | None = None

    def path(self, marker: Marker) -> Path:
        return self.dir / marker.file

    def complete(self, marker: Marker) -> bool:
        return self.path(marker).exists()

    def take(self, copy: Callable[[Path], None], index: int) -> Marker:
        """Start `copy(path)` (which writes the state at `index` or later to a file) in a
        worker thread; the marker of the file it makes. A copy still running from the last
        snapshot is waited for first."""
        self.join()
        marker = Marker.for_index(index)
        thread = threading.Thread(
            target=self._copy, args=(copy, marker), name=f"snapshot {index}", daemon=True
        )
        self._copying = thread
        thread.start()
        return marker

    def ensure(self, copy: Callable[[Path], None], marker: Marker) -> None:
        """Write the file `marker` names now if it is missing."""
        if not self.complete(marker):
            logger.info("writing the missing snapshot file %s again", marker.file)
            self._copy(copy, marker)

    def join(self) -> None:
        if self._copying is not None:
            self._copying.join()
            self._copying = None

    def _copy(self, copy: Callable[[Path], None], marker: Marker) -> None:
        final = self.path(marker)
        tmp = final.with_name(final.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            copy(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except Exception:  # a failed copy leaves no file: the next snapshot is taken anew
            logger.exception("cannot write snapshot file %s", final)
            tmp.unlink(missing_ok=True)

    def receiver(self, marker: Marker) -> Receiver:
        """Where an incoming copy of the file `marker` names is written."""
        return Receiver(self, marker)

    def prune(self, keep: Marker) -> None:
        """Remove the snapshot files older than `keep` (the one Raft's storage names, which
        must be complete), and temporary or partial files left below it."""
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
