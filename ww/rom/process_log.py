"""The output of ROM processes on disk: one capped log per process, old logs pruned.

A child's stdout and stderr share one pipe that the host copies into the child's log file,
keeping the newest `limit` bytes at most (`CappedLog`, `copy_output`, `drain`); `read_log`
returns its tail, `CappedLog.follow` its tail and then what is written until it is closed, and
`prune_logs` deletes the logs of exited processes but the newest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncGenerator, Collection
from pathlib import Path

import trio

__all__ = [
    "DRAIN_LIMIT",
    "FOLLOW_CHUNK",
    "KEEP_LOGS",
    "LOG_LIMIT",
    "LOG_TAIL",
    "MIN_LOG_LIMIT",
    "PIPE_READ",
    "CappedLog",
    "copy_output",
    "drain",
    "prune_logs",
    "read_log",
]

log = logging.getLogger("ww.rom.executor")

LOG_TAIL = 1024 * 1024  # read_logs() returns at most this much by default
LOG_LIMIT = 8 * 1024 * 1024  # bytes of output kept on disk per process, the newest
MIN_LOG_LIMIT = 4096
KEEP_LOGS = 100  # logs of exited processes kept, the newest
PIPE_READ = 64 * 1024
DRAIN_LIMIT = 1024 * 1024  # what is copied from the pipe after the child exits, at most
FOLLOW_CHUNK = 64 * 1024  # CappedLog.follow yields pieces of at most this size
PREVIOUS = ".1"  # the suffix of a log's previous generation


class CappedLog:
    """One process's output on disk, at most `limit` bytes: the newest in `path`, what came
    before it in `path.1`, each at most half the limit (so at least half is always kept).

    Writes are unbuffered: what was copied is readable at once. When writing fails (a full
    disk) the rest is dropped, so that the child is never held up by its log.

    `written` counts the bytes written so far; followers (`follow`) are woken by each write
    and by `close`, and read what is new from the files, so that they never hold up a write.
    """

    __slots__ = ("_failed", "_file", "_followers", "_half", "_size", "closed", "path", "written")

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self._half = limit // 2
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self._size = self._file.tell()
        self._failed = False
        self._followers = trio.lowlevel.ParkingLot()
        self.written = self._size
        self.closed = False

    def write(self, data: bytes) -> None:
        if self._failed:
            return
        view = memoryview(data)
        try:
            while view:
                if self._size >= self._half:
                    self._rotate()
                written = self._file.write(view[: self._half - self._size])
                self._size += written
                self.written += written
                view = view[written:]
        except OSError as e:
            self._failed = True
            log.warning("dropping further output for %s: %s", self.path, e.strerror or e)
        finally:
            self._followers.unpark_all()

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, _previous(self.path))
        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed by close()
        self._size = 0

    def close(self) -> None:
        """Close the file and date it to now (the process's exit; see `prune_logs`)."""
        now = time.time_ns()  # finer than the clock the kernel dates files with
        self.closed = True
        self._followers.unpark_all()
        with contextlib.suppress(OSError):
            self._file.close()
            os.utime(self.path, ns=(now, now))

    async def follow(self, max_bytes: int) -> AsyncGenerator[bytes, None]:
        """The log's last `max_bytes`, then each piece as it is written, until it is closed.

        Pieces are at most `FOLLOW_CHUNK` bytes. A follower more than `max_bytes` behind
        (or behind by more than the files keep) skips to the newest bytes: the log is written
        at the child's pace, never the follower's.
        """
        seen = max(0, self.written - max_bytes)
        while True:
            if self.written > seen:
                data = read_log(self.path, min(self.written - seen, max_bytes))
                seen = self.written
                for start in range(0, len(data), FOLLOW_CHUNK):
                    yield data[start : start + FOLLOW_CHUNK]
            elif self.closed:
                return
            else:
                await self._followers.park()


async def copy_output(
    output: trio.lowlevel.FdStream, log_file: CappedLog, scope: trio.CancelScope
) -> None:
    """Copy the child's output into its log until the pipe ends or `scope` is cancelled."""
    with scope:
        try:
            while chunk := await output.receive_some(PIPE_READ):
                log_file.write(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.warning("lost the output of %s: %s", log_file.path.name, e)


def drain(output: trio.lowlevel.FdStream, log_file: CappedLog) -> None:
    """Copy what an exited child left in its pipe (bounded: a grandchild may write on)."""
    left = DRAIN_LIMIT
    while left > 0:
        try:
            chunk = os.read(output.fileno(), min(PIPE_READ, left))
        except OSError as e:  # EAGAIN: nothing more for now
            if e.errno != errno.EAGAIN:
                log.warning("lost the output of %s: %s", log_file.path.name, e)
            return
        if not chunk:
            return
        log_file.write(chunk)
        left -= len(chunk)


def read_log(path: Path, max_bytes: int) -> bytes:
    """The last `max_bytes` of the log at `path` and its previous generation, newest last."""
    newest = _read_tail(path, max_bytes)
    if len(newest) >= max_bytes:
        return newest
    return _read_tail(_previous(path), max_bytes - len(newest)) + newest


def prune_logs(logs_dir: Path, keep: int, running: Collection[str]) -> None:
    """Delete the logs in `logs_dir` but those named in `running` and the newest `keep` others.

    A log's age is its file's modification time, which closing it sets to the exit."""
    try:
        logs: dict[str, list[Path]] = {}
        for path in logs_dir.iterdir():
            current = path.name.removesuffix(PREVIOUS)
            if current.endswith(".log") and current not in running:
                logs.setdefault(current, []).append(path)
        by_age = sorted(logs.items(), key=lambda item: (_newest_mtime(item[1]), item[0]))
        for _, paths in by_age[: max(0, len(by_age) - keep)]:
            for path in paths:
                path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot prune old logs in %s: %s", logs_dir, e)


def _previous(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS)


def _read_tail(path: Path, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            return f.read(max_bytes)
    except FileNotFoundError:
        return b""


def _newest_mtime(paths: list[Path]) -> int:
    return max(path.stat().st_mtime_ns for path in paths)
