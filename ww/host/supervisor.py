"""A process as the host lends it: the current run of a ROM and, under a restart policy, the
runs after it.

`Process` is what `ps` lists (one row, with the current pid), what a Process capability
refers to and what `kill(pid)` stops. `supervise` runs it: it waits for each run to end and
starts the next one after a backoff while the policy says so (ww.host.restarts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ww.host.lease import Lease
from ww.host.restarts import Backoff, should_restart

if TYPE_CHECKING:
    from ww.rom.executor import ProcessHandle

log = logging.getLogger("ww.host")


@dataclass(slots=True, eq=False)
class Run:
    """One run of a ROM: its child process and the lease its anchors hang on."""

    handle: ProcessHandle
    lease: Lease


@dataclass(slots=True, eq=False)
class Process:
    """A spawned ROM across its restarts. `restart` is "no", "on-failure" or "always";
    `anchor` the path it was spawned at, `volume` its directory, `record_id` its restart
    record (None when it has none)."""

    run: Run
    restart: str = "no"
    anchor: str | None = None
    volume: Path | None = None
    record_id: str | None = None
    restarts: int = 0
    stopped: bool = False
    waiting: bool = False  # between two runs
    on_kill: Callable[[], None] | None = None  # forgets the restart record
    _stop: trio.Event = field(default_factory=trio.Event)
    _ended: trio.Event = field(default_factory=trio.Event)

    @property
    def handle(self) -> ProcessHandle:
        return self.run.handle

    @property
    def lease(self) -> Lease:
        return self.run.lease

    @property
    def pid(self) -> int:
        return self.run.handle.pid

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def wait(self) -> int:
        """The exit code of the last run, once no run follows it."""
        await self._ended.wait()
        code = self.run.handle.exit_code
        assert code is not None
        return code

    def kill(self) -> None:
        """Stop: forget the restart record, kill the current run and start no other."""
        if self.on_kill is not None:
            self.on_kill()
        self.stopped = True
        self._stop.set()
        self.run.handle.kill()

    def info(self) -> dict[str, Any]:
        info = self.run.handle.info()
        if self.waiting and not self.ended:
            info["state"] = "restarting"
        info.update(
            restarts=self.restarts,
            restart=self.restart,
            anchor=self.anchor,
            volume=None if self.volume is None else str(self.volume),
        )
        return info

    def logs(self) -> bytes:
        return self.run.handle.read_logs()

    def follow_logs(self) -> AsyncGenerator[bytes, None]:
        return self.run.handle.follow_logs()


async def supervise(
    process: Process,
    start: Callable[[], Awaitable[Run]],
    on_run_end: Callable[[Process, int], None],
    on_new_run: Callable[[Process, Run], None],
    on_end: Callable[[Process], None],
) -> None:
    """Run `process` until it ends for good: after each run `on_run_end(process, code)`, then,
    while its policy says so, a backoff and `start()` for the next run, handed to
    `on_new_run(process, run)`. `on_end(process)` runs once no run follows (not when cancelled:
    the host is stopping, and a restart record, if any, stays)."""
    backoff = Backoff()
    while True:
        code = await process.run.handle.wait()
        on_run_end(process, code)
        if not should_restart(process.restart, code, process.stopped):
            break
        delay = backoff.delay(time.time() - process.run.handle.started_at)
        name = process.run.handle.name
        log.info("pid %d (%s) exited with %d; restarting in %.1fs", process.pid, name, code, delay)
        run = await _next_run(process, start, backoff, delay)
        if run is None:
            break
        process.restarts += 1
        on_new_run(process, run)
        if process.stopped:  # killed while the new run was starting
            run.handle.kill()
    process._ended.set()
    on_end(process)


async def _next_run(
    process: Process, start: Callable[[], Awaitable[Run]], backoff: Backoff, delay: float
) -> Run | None:
    """Wait `delay`, then start the next run (again, backing off, while starting fails);
    None once the process is stopped."""
    process.waiting = True
    try:
        while True:
            with trio.move_on_after(delay):
                await process._stop.wait()
            if process.stopped:
                return None
            try:
                return await start()
            except Exception as e:  # e.g. a required package went missing; try again later
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("cannot restart %s: %s", process.run.handle.name, text)
                delay = backoff.delay(0.0)
    finally:
        process.waiting = False
