"""The host side of ROMs: each spawned ROM runs in its own child process.

The child is `python -m ww.rom.guest`, given the ROM as an open file from the host's ROM cache
and one end of a socket pair; the host serves the other end with `ww.rpc`, offering the
capability that `capability_factory(handle)` makes for that process. The kernel confines the
child before it runs (ww.rom.sandbox: Landlock, seccomp, a uid and PID namespace of its own
on a root host, the permissions its manifest asks for) and limits it: address space
(`memory_limit`, bytes, RLIMIT_AS), CPU time (`cpu_seconds`, RLIMIT_CPU; the child gets
SIGXCPU, then SIGKILL a second later), processes (`procs`) and open files (`files`), each by
default and at most the executor's `limits`; `wall_seconds` stops it after that long.

Disk use is bounded. The child's stdout and stderr share one pipe that the host copies into a
log file per process, keeping the newest `log_limit` bytes at most; the logs of the newest
`keep_logs` exited processes are kept and older ones deleted (`ww.rom.process_log`). The ROM cache
keeps at most `rom_cache_limit` bytes, evicting the least recently used ROM first but never the
ROM of a process that is starting or running (`ww.rom.cache`).

Exit codes, as `wait()` returns them: the child's exit status (0 ok, 1 main raised, 2 could not
start, or what the ROM passed to sys.exit), or ``-N`` when signal N ended it (-15 SIGTERM, -9
SIGKILL, -24 SIGXCPU), as `subprocess` reports it.

When a child exits, its connection is shut down from the host side too, so everything it held
is released (the capabilities' `_on_release` hooks run) before `wait()` returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

import ww
from ww.rom.archive import Rom
from ww.rom.cache import ROM_CACHE_LIMIT, RomCache, check_count
from ww.rom.permissions import NET_CONNECT, VOLUME
from ww.rom.process_log import (
    KEEP_LOGS,
    LOG_LIMIT,
    LOG_TAIL,
    MIN_LOG_LIMIT,
    CappedLog,
    copy_output,
    drain,
    prune_logs,
    read_log,
)
from ww.rom.sandbox import ChildLimits, Sandbox, SandboxError

__all__ = [
    "DEFAULT_LIMITS",
    "KEEP_LOGS",
    "KILL_GRACE",
    "LOG_LIMIT",
    "MIN_LOG_LIMIT",
    "ROM_CACHE_LIMIT",
    "Executor",
    "ProcessHandle",
    "RomCache",
    "SandboxError",
]

log = logging.getLogger("ww.rom.executor")

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL

DEFAULT_LIMITS = ChildLimits(memory=4 << 30, cpu_seconds=None, procs=256, files=1024)
"""A host's limits for each ROM process: the default of a spawn, and the most it may ask."""

_LIMIT_FLAGS = {
    "memory": "--limit-memory",
    "cpu_seconds": "--limit-cpu",
    "procs": "--limit-procs",
    "files": "--limit-files",
}


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
    _log: CappedLog | None = field(default=None, repr=False)
    _tmp: Path | None = field(default=None, repr=False)

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
        """The last `max_bytes` of what the process wrote to stdout and stderr (as much of it
        as the log keeps; nothing once an exited process's log has been deleted)."""
        return read_log(self.log_path, max_bytes)

    def follow_logs(self, max_bytes: int = LOG_TAIL) -> AsyncGenerator[bytes, None]:
        """What `read_logs` returns, then the output as the process writes it, in pieces;
        ends once the process has exited and all its output is in the log. A follower that
        falls more than `max_bytes` behind skips to the newest output."""
        assert self._log is not None, "the executor gives every handle its log"
        return self._log.follow(max_bytes)

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
    """Spawns ROMs as child processes and keeps the process table, their logs and the ROM cache.

    Use it as `async with Executor(data_dir) as executor:` or run it in a nursery with
    `await nursery.start(executor.run)`; either way it owns the tasks watching its children,
    and when it stops it kills the children still running.

    `log_limit`: bytes of output kept per process (the newest); `keep_logs`: how many exited
    processes' logs are kept (the newest; older ones, also from earlier runs, are deleted);
    `rom_cache_limit`: bytes of cached ROMs (see `RomCache`); `pinned()` names ROMs the cache
    keeps whatever the limit (those that restart records name).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        kill_grace: float = KILL_GRACE,
        python: str | None = None,
        log_limit: int = LOG_LIMIT,
        keep_logs: int = KEEP_LOGS,
        rom_cache_limit: int = ROM_CACHE_LIMIT,
        pinned: Callable[[], Collection[str]] = frozenset,
        limits: ChildLimits = DEFAULT_LIMITS,
        sandbox: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.roms_dir = self.data_dir / "roms"
        self.logs_dir = self.data_dir / "logs"
        self.tmp_dir = self.data_dir / "tmp"
        self.limits = limits
        self.kill_grace = kill_grace
        self.python = python or sys.executable
        self.log_limit = check_count("log_limit", log_limit, MIN_LOG_LIMIT)
        self.keep_logs = check_count("keep_logs", keep_logs, 0)
        self._table: dict[int, ProcessHandle] = {}
        self._starting: Counter[str] = Counter()  # content ids of ROMs being spawned
        self._nursery: trio.Nursery | None = None
        self._cm: Any = None
        self._pinned = pinned
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # Nothing in the data dir is for ROMs: only their own volume and temporary directory
        # (reached through directories they may search, not list).
        self.data_dir.chmod(0o711)
        for private in (self.logs_dir, self.roms_dir):
            private.mkdir(exist_ok=True)
            private.chmod(0o700)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # left by a host that was killed
        self.tmp_dir.mkdir(mode=0o711)
        self.rom_cache = RomCache(self.roms_dir, rom_cache_limit, self._roms_in_use)
        self.pythonpath = _child_pythonpath(self.data_dir / "python")
        self.sandbox: Sandbox | None = None
        self.sandbox_error: str | None = None
        try:
            self.sandbox = Sandbox.for_host(
                sandbox, self.python, [*self.pythonpath, str(_WW_PACKAGE)], self.data_dir
            )
        except SandboxError as e:
            self.sandbox_error = str(e)
        self._prune_logs()

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
        """Drop an exited process from the table (its log file stays, until pruned)."""
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
        procs: int | None = None,
        files: int | None = None,
        wall_seconds: float | None = None,
        volume: Path | None = None,
        home: str | None = None,
    ) -> ProcessHandle:
        """Start `rom` in a child process serving it `capability_factory(handle)`.

        `volume` (a directory) and `home` (the anchor path it runs at) are passed to the guest,
        where `ww.rom.guest.volume()` and `home()` return them; a volume needs the ROM to ask
        for the `volume` permission. Limits not given are the executor's `limits`; larger ones
        are refused; `wall_seconds` stops it (as `kill()` does) once it has run that long.
        The ROM gets the permissions it asks for (a host checks them first).

        Raises RomError when a package the ROM requires is missing here, SandboxError when
        ROMs cannot be confined here, ValueError for a bad limit or a volume not asked for;
        never for anything the child does later.
        """
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("the executor is not running; use `async with Executor(...)`")
        if self.sandbox is None:
            raise SandboxError(self.sandbox_error or "no sandbox")
        if not all(isinstance(a, str) for a in args):
            raise ValueError("ROM arguments must be strings")
        if volume is not None and VOLUME not in rom.permissions:
            raise ValueError(
                f"ROM {rom.name!r} does not ask for the volume permission; add "
                'permissions = ["volume"] to its rom.toml to spawn it with a volume'
            )
        limits = self._limits(
            memory=memory_limit, cpu_seconds=cpu_seconds, procs=procs, files=files
        )
        rom.check_requires()
        # Until the child is in the table, its ROM counts as in use here, so that a spawn
        # running meanwhile cannot evict the file before the child has read it.
        self._starting[rom.cid] += 1
        tmp = Path(tempfile.mkdtemp(prefix=f"{rom.name}-", dir=self.tmp_dir))
        try:
            options = []
            if volume is not None:
                options += ["--volume", str(volume)]
            if home is not None:
                options += ["--home", home]
            if self.sandbox.as_root:
                options += ["--pidns"]
            writable = [tmp] if volume is None else [tmp, volume]
            net = NET_CONNECT in rom.permissions
            landlock = self.sandbox.landlock(net=net, writable=writable)
            if landlock is not None:
                options += ["--landlock", landlock]
            preexec = self.sandbox.child_setup(limits, net=net, chown=writable)
            handle = await self._start(
                nursery, rom, args, capability_factory, preexec, options, tmp
            )
            if wall_seconds is not None:
                nursery.start_soon(self._wall_clock, handle, wall_seconds)
            return handle
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self._starting[rom.cid] -= 1
            if not self._starting[rom.cid]:
                del self._starting[rom.cid]

    def _limits(self, **asked: float | None) -> ChildLimits:
        """The limits of one child: those asked for, within this executor's, else its own."""
        chosen: dict[str, Any] = {}
        for name, value in asked.items():
            most = getattr(self.limits, name)
            if value is None:
                chosen[name] = most
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                label = {"memory": "memory_limit"}.get(name, name)
                raise ValueError(f"{label} must be a positive number, not {value!r}")
            if most is not None and value > most:
                raise ValueError(
                    f"a {name} limit of {value} is over this host's maximum of {most}; "
                    f"ask for less, or start the host with a larger {_LIMIT_FLAGS[name]}"
                )
            chosen[name] = value if name == "cpu_seconds" else int(value)
        return ChildLimits(**chosen)

    async def _start(
        self,
        nursery: trio.Nursery,
        rom: Rom,
        args: Sequence[str],
        capability_factory: Callable[[ProcessHandle], Any],
        preexec: Callable[[], None],
        options: list[str],
        tmp: Path,
    ) -> ProcessHandle:
        rom_path = self.rom_cache.put(rom)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The child writes to a pipe, not to its log file: only the host writes the file, so
        # the cap holds whatever the ROM does (a file the child held open could grow past
        # any limit the host checks after the fact), and the log is rotated without races.
        output_r, output_w = os.pipe()
        # The ROM travels as an open file: the child may not read the host's ROM cache.
        rom_fd = os.open(rom_path, os.O_RDONLY | os.O_CLOEXEC)
        started_at = time.time()
        command = [
            self.python,
            "-P",
            "-m",
            # Its waiters fork before ww.rom is imported (ww.rom_pidns), or it is the guest.
            "ww.rom_pidns" if "--pidns" in options else "ww.rom.guest",
            "--fd",
            str(child_sock.fileno()),
            "--cid",
            rom.cid,
            "--rom-fd",
            str(rom_fd),
            *options,
            "--",
            *args,
        ]
        try:
            # Forked from this (the host's main) thread, not a worker thread as trio's
            # open_process does: the child's parent-death signal fires when the thread that
            # forked it ends, and it must fire only when the host does.
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output_w,
                stderr=output_w,
                pass_fds=(child_sock.fileno(), rom_fd),
                start_new_session=True,
                preexec_fn=preexec,
                env=_child_env(tmp, self.pythonpath),
                cwd=tmp,
            )
            process = trio.Process._create(popen, None, None, None)
        except BaseException:
            parent_sock.close()
            os.close(output_r)
            raise
        finally:
            child_sock.close()
            os.close(output_w)
            os.close(rom_fd)
        output = trio.lowlevel.FdStream(output_r)

        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_at))
        handle = ProcessHandle(
            pid=process.pid,
            name=rom.name,
            cid=rom.cid,
            args=tuple(args),
            log_path=self.logs_dir / f"{stamp}-{process.pid}-{rom.name}.log",
            started_at=started_at,
            _process=process,
            _escalate=self._start_escalation,
            _tmp=tmp,
        )
        log_file: CappedLog | None = None
        try:
            log_file = handle._log = CappedLog(handle.log_path, self.log_limit)
            bootstrap = capability_factory(handle)
        except BaseException:
            parent_sock.close()
            await self._stop(handle, process)
            with trio.CancelScope(shield=True):
                await output.aclose()
            if log_file is not None:
                log_file.close()
            raise
        self._table[handle.pid] = handle
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock))
        nursery.start_soon(self._supervise, handle, process, stream, bootstrap, output, log_file)
        log.debug("spawned %s (%s) as pid %d", rom.name, rom.cid[:12], handle.pid)
        return handle

    async def _supervise(
        self,
        handle: ProcessHandle,
        process: trio.Process,
        stream: trio.SocketStream,
        boot: Any,
        output: trio.lowlevel.FdStream,
        log_file: CappedLog,
    ) -> None:
        """Serve the child's connection and copy its output; record its exit; make sure the
        connection ends and the log holds everything the child wrote.

        The connection is served and the output copied shielded, outliving the child: when the
        executor stops, the child is signalled while its connection is still up, and the
        connection ends (releasing what the child held) only once the child is gone.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve, handle, stream, boot)
                copying = trio.CancelScope(shield=True)
                nursery.start_soon(copy_output, output, log_file, copying)
                try:
                    await self._reap(handle, process)
                finally:
                    if handle.exit_code is None:  # cancelled: the executor is stopping
                        await self._stop(handle, process)
                    # The pipe may stay open after the child exits (a grandchild may hold it):
                    # stop waiting on it and take what the child left in it below.
                    copying.cancel()
                    # The child is gone, but a grandchild may still hold its socket end:
                    # shut ours down so the connection ends and its capabilities are released.
                    with contextlib.suppress(OSError):  # unless the connection closed it
                        stream.socket.shutdown(socket.SHUT_RDWR)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
                drain(output, log_file)
                await output.aclose()
            log_file.close()
            if handle._tmp is not None:
                shutil.rmtree(handle._tmp, ignore_errors=True)
            handle._done.set()
            self._prune_logs()
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

    async def _wall_clock(self, handle: ProcessHandle, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await handle._exited.wait()
            return
        log.info(
            "pid %d (%s) ran for its %gs of wall time; stopping it",
            handle.pid,
            handle.name,
            seconds,
        )
        handle.kill()

    def _start_escalation(self, handle: ProcessHandle) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._escalate, handle)

    async def _escalate(self, handle: ProcessHandle) -> None:
        with trio.move_on_after(self.kill_grace):
            await handle._exited.wait()
            return
        log.info("pid %d (%s) ignored SIGTERM; sending SIGKILL", handle.pid, handle.name)
        handle._signal(signal.SIGKILL)

    # -- logs ----------------------------------------------------------------------------------

    def _prune_logs(self) -> None:
        """Delete the logs of processes that are not running, but the newest `keep_logs`."""
        running = {h.log_path.name for h in self._table.values() if h.exit_code is None}
        prune_logs(self.logs_dir, self.keep_logs, running)

    # -- the ROM cache -----------------------------------------------------------------------

    def cache_path(self, cid: str) -> Path:
        return self.rom_cache.path(cid)

    def cache_put(self, rom: bytes | Rom) -> str:
        """Keep a ROM (validated first when given as bytes); its content id.

        A ROM already cached is not written again.
        """
        loaded = rom if isinstance(rom, Rom) else Rom.load(rom)
        self.rom_cache.put(loaded)
        return loaded.cid

    def cache_get(self, cid: str) -> Rom | None:
        """The cached ROM with content id `cid`, or None when it is not here (never sent,
        evicted, or corrupt): the caller then sends the ROM itself."""
        return self.rom_cache.get(cid)

    def _roms_in_use(self) -> set[str]:
        running = {h.cid for h in self._table.values() if h.exit_code is None}
        return running | set(self._starting) | set(self._pinned())


_WW_PACKAGE = Path(ww.__file__).resolve().parent


def _child_pythonpath(shim: Path) -> list[str]:
    """What the child's PYTHONPATH holds: `shim`, a directory with nothing in it but a link to
    the ww package (so `-m ww.rom.guest` works anywhere, while ROMs may read the package and
    not what lies beside it, such as a data dir in a source checkout), then the host's
    PYTHONPATH."""
    shim.mkdir(mode=0o755, exist_ok=True)
    link = shim / "ww"
    if not (link.is_symlink() and link.resolve() == _WW_PACKAGE):
        fresh = shim / f".ww.{os.getpid()}"
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(_WW_PACKAGE, target_is_directory=True)
        fresh.replace(link)
    return [str(shim), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]


_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


def _child_env(tmp: Path, pythonpath: list[str]) -> dict[str, str]:
    """A small environment: the host's may hold secrets a ROM has no business reading."""
    env = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
    env["PYTHONUNBUFFERED"] = "1"  # output reaches the log even if the child is killed
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the Python installation is read-only to ROMs
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env["HOME"] = env["TMPDIR"] = str(tmp)
    return env
