"""The host side of ROMs: each spawned ROM runs in its own child process.

The child is `python -m ww.guest`, given the ROM as a file in the host's ROM cache and one end
of a socket pair; the host serves the other end with `ww.rpc`, offering the capability that
`capability_factory(handle)` makes for that process. The child's stdout and stderr go to one
log file per process. Optional limits: address space (`memory_limit`, bytes, RLIMIT_AS) and CPU
time (`cpu_seconds`, RLIMIT_CPU; the child gets SIGXCPU, then SIGKILL a second later).

Exit codes, as `wait()` returns them: the child's exit status (0 ok, 1 main raised, 2 could not
start, or what the ROM passed to sys.exit), or ``-N`` when signal N ended it (-15 SIGTERM, -9
SIGKILL, -24 SIGXCPU), as `subprocess` reports it.

When a child exits, its connection is shut down from the host side too, so everything it held
is released (the capabilities' `_on_release` hooks run) before `wait()` returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

import ww
from ww.rom import Rom, RomError

__all__ = ["Executor", "ProcessHandle"]

log = logging.getLogger("ww.executor")

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL = 1024 * 1024  # read_logs() returns at most this much by default
_CID = re.compile(r"[0-9a-f]{64}")


@dataclass(slots=True, eq=False)
class ProcessHandle:
    """One spawned ROM process."""

    pid: int
    name: str
    cid: str
    args: tuple[str, ...]
    log_path: Path
    started_at: float
    exit_code: int | None = None
    killed: bool = False
    _process: trio.Process | None = field(default=None, repr=False)
    _exited: trio.Event = field(default_factory=trio.Event, repr=False)
    _done: trio.Event = field(default_factory=trio.Event, repr=False)
    _escalate: Callable[[ProcessHandle], None] | None = field(default=None, repr=False)

    @property
    def state(self) -> str:
        """One of "running", "exited", "killed" (ended by a signal after kill())."""
        if self.exit_code is None:
            return "running"
        return "killed" if self.killed and self.exit_code < 0 else "exited"

    async def wait(self) -> int:
        """Wait until the process has exited and its connection is closed; its exit code."""
        await self._done.wait()
        assert self.exit_code is not None
        return self.exit_code

    def kill(self) -> None:
        """SIGTERM the ROM's process group now; SIGKILL it if it is still there after a grace."""
        if self._exited.is_set() or self.killed:
            return
        self.killed = True
        self._signal(signal.SIGTERM)
        if self._escalate is not None:
            self._escalate(self)

    def read_logs(self, max_bytes: int = LOG_TAIL) -> bytes:
        """The last `max_bytes` of what the process wrote to stdout and stderr."""
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - max_bytes))
                return f.read()
        except FileNotFoundError:
            return b""

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "state": self.state,
            "exit_code": self.exit_code,
            "started_at": self.started_at,
            "cid": self.cid,
            "args": list(self.args),
        }

    def _signal(self, signum: int) -> None:
        process = self._process
        # poll() reaps nothing we have not seen exit: only this thread reaps, so a live pid
        # here cannot be recycled before killpg runs.
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)


class Executor:
    """Spawns ROMs as child processes and keeps the process table and the ROM cache.

    Use it as `async with Executor(data_dir) as executor:` or run it in a nursery with
    `await nursery.start(executor.run)`; either way it owns the tasks watching its children,
    and when it stops it kills the children still running.
    """

    def __init__(
        self, data_dir: str | Path, *, kill_grace: float = KILL_GRACE, python: str | None = None
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.roms_dir = self.data_dir / "roms"
        self.logs_dir = self.data_dir / "logs"
        self.kill_grace = kill_grace
        self.python = python or sys.executable
        self._table: dict[int, ProcessHandle] = {}
        self._nursery: trio.Nursery | None = None
        self._cm: Any = None
        self.roms_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    # -- lifetime ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Executor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the children until cancelled; then kill the ones still running."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def __aenter__(self) -> Executor:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return bool(await self._cm.__aexit__(exc_type, exc, tb))
        finally:
            self._nursery = None

    # -- the process table -------------------------------------------------------------------

    def processes(self) -> list[ProcessHandle]:
        """Every process spawned and not forgotten, oldest first."""
        return sorted(self._table.values(), key=lambda h: h.started_at)

    def get(self, pid: int) -> ProcessHandle | None:
        return self._table.get(pid)

    def forget(self, pid: int) -> None:
        """Drop an exited process from the table (its log file stays)."""
        handle = self._table.get(pid)
        if handle is not None and handle.exit_code is not None:
            del self._table[pid]

    # -- spawning ----------------------------------------------------------------------------

    async def spawn(
        self,
        rom: Rom,
        args: Sequence[str],
        capability_factory: Callable[[ProcessHandle], Any],
        *,
        memory_limit: int | None = None,
        cpu_seconds: float | None = None,
    ) -> ProcessHandle:
        """Start `rom` in a child process serving it `capability_factory(handle)`.

        Raises RomError when a package the ROM requires is missing here, ValueError for a bad
        limit; never for anything the child does later.
        """
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("the executor is not running; use `async with Executor(...)`")
        if not all(isinstance(a, str) for a in args):
            raise ValueError("ROM arguments must be strings")
        preexec = _child_setup(memory_limit, cpu_seconds)
        rom.check_requires()
        rom_path = self._store(rom)

        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        started_at = time.time()
        pending_log = self.logs_dir / f".starting-{secrets.token_hex(6)}.log"
        command = [
            self.python,
            "-P",
            "-m",
            "ww.guest",
            "--fd",
            str(child_sock.fileno()),
            "--cid",
            rom.cid,
            str(rom_path),
            "--",
            *args,
        ]
        try:
            with open(pending_log, "ab") as log_file:
                process = await trio.lowlevel.open_process(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(child_sock.fileno(),),
                    start_new_session=True,
                    preexec_fn=preexec,
                    env=_child_env(),
                )
        except BaseException:
            parent_sock.close()
            pending_log.unlink(missing_ok=True)
            raise
        finally:
            child_sock.close()

        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_at))
        log_path = self.logs_dir / f"{stamp}-{process.pid}-{rom.name}.log"
        pending_log.rename(log_path)
        handle = ProcessHandle(
            pid=process.pid,
            name=rom.name,
            cid=rom.cid,
            args=tuple(args),
            log_path=log_path,
            started_at=started_at,
            _process=process,
            _escalate=self._start_escalation,
        )
        try:
            bootstrap = capability_factory(handle)
        except BaseException:
            parent_sock.close()
            await self._stop(handle, process)
            raise
        self._table[handle.pid] = handle
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock))
        nursery.start_soon(self._supervise, handle, process, stream, bootstrap)
        log.debug("spawned %s (%s) as pid %d", rom.name, rom.cid[:12], handle.pid)
        return handle

    async def _supervise(
        self, handle: ProcessHandle, process: trio.Process, stream: trio.SocketStream, boot: Any
    ) -> None:
        """Serve the child's connection; record its exit; make sure the connection ends.

        The connection is served shielded and outlives the child: when the executor stops,
        the child is signalled while its connection is still up, and the connection ends
        (releasing what the child held) only once the child is gone.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve, handle, stream, boot)
                try:
                    await self._reap(handle, process)
                finally:
                    if handle.exit_code is None:  # cancelled: the executor is stopping
                        await self._stop(handle, process)
                    # The child is gone, but a grandchild may still hold its socket end:
                    # shut ours down so the connection ends and its capabilities are released.
                    with contextlib.suppress(OSError):  # unless the connection closed it
                        stream.socket.shutdown(socket.SHUT_RDWR)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            handle._done.set()
            log.debug("pid %d (%s) exited with %s", handle.pid, handle.name, handle.exit_code)

    async def _serve(self, handle: ProcessHandle, stream: trio.SocketStream, boot: Any) -> None:
        from ww.rpc import serve_connection

        name = f"pid {handle.pid} ({handle.name})"
        with trio.CancelScope(shield=True):  # ends with the child's socket; see _supervise
            try:
                await serve_connection(stream, boot, name=name)
            except Exception:  # a misbehaving child must not take the host down
                log.warning("connection of %s failed", name, exc_info=True)

    async def _reap(self, handle: ProcessHandle, process: trio.Process) -> None:
        """Wait for the child to exit and record its exit code."""
        await process.wait()
        handle.exit_code = process.returncode
        handle._exited.set()

    async def _stop(self, handle: ProcessHandle, process: trio.Process) -> None:
        """SIGTERM, then SIGKILL after the grace; shielded, for use while cancelled."""
        with trio.CancelScope(shield=True):
            handle.killed = True
            handle._signal(signal.SIGTERM)
            with trio.move_on_after(self.kill_grace):
                await self._reap(handle, process)
            if handle.exit_code is None:
                handle._signal(signal.SIGKILL)
                await self._reap(handle, process)

    def _start_escalation(self, handle: ProcessHandle) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._escalate, handle)

    async def _escalate(self, handle: ProcessHandle) -> None:
        with trio.move_on_after(self.kill_grace):
            await handle._exited.wait()
            return
        log.info("pid %d (%s) ignored SIGTERM; sending SIGKILL", handle.pid, handle.name)
        handle._signal(signal.SIGKILL)

    # -- the ROM cache -----------------------------------------------------------------------

    def cache_path(self, cid: str) -> Path:
        if not isinstance(cid, str) or not _CID.fullmatch(cid):
            raise RomError(f"{cid!r} is not a ROM content id (64 lowercase hex digits)")
        return self.roms_dir / f"{cid}.rom"

    def cache_put(self, rom: bytes | Rom) -> str:
        """Keep a ROM (validated first when given as bytes); its content id.

        A ROM already cached is not written again.
        """
        loaded = rom if isinstance(rom, Rom) else Rom.load(rom)
        self._store(loaded)
        return loaded.cid

    def cache_get(self, cid: str) -> Rom | None:
        """The cached ROM with content id `cid`, or None when it is not here."""
        path = self.cache_path(cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            rom = Rom.load(data)
        except RomError:
            rom = None
        if rom is None or rom.cid != cid:
            log.warning("dropping corrupt cached ROM %s", path)
            path.unlink(missing_ok=True)
            return None
        return rom

    def _store(self, rom: Rom) -> Path:
        """The cache file of `rom`, written (durably) unless an intact copy is there."""
        path = self.cache_path(rom.cid)
        if _sha256_of(path) == rom.cid:
            return path
        tmp = path.with_name(f".{rom.cid}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(rom.data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.roms_dir)
        return path


def _child_setup(memory_limit: int | None, cpu_seconds: float | None) -> Callable[[], None]:
    """A preexec_fn setting the child's resource limits (checked here, in the parent)."""
    if memory_limit is not None and (not isinstance(memory_limit, int) or memory_limit <= 0):
        raise ValueError(f"memory_limit must be a positive number of bytes, not {memory_limit!r}")
    if cpu_seconds is not None and (
        not isinstance(cpu_seconds, int | float) or not cpu_seconds > 0
    ):
        raise ValueError(f"cpu_seconds must be a positive number, not {cpu_seconds!r}")
    cpu = math.ceil(cpu_seconds) if cpu_seconds is not None else None

    def apply() -> None:  # runs in the child between fork and exec
        # A crashing ROM must not drop core files into the host's working directory.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        if cpu is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

    return apply


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # output reaches the log even if the child is killed
    root = str(Path(ww.__file__).resolve().parent.parent)  # so `-m ww.guest` works anywhere
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _sha256_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
