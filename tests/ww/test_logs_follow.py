"""Following a process's output: `CappedLog.follow`, `ProcessHandle.follow_logs`, `ww logs -f`."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import trio

from tests.ww.conftest import HostFactory, HostProcess
from tests.ww.test_executor import make_rom
from tests.ww.test_hello import ENV, Lines, ww
from ww.rom import build_rom
from ww.rom.executor import Executor
from ww.rom.process_log import FOLLOW_CHUNK, CappedLog
from ww.rpc import Capability


class Gate(Capability):
    """The bootstrap of the executor test's ROM: `wait` returns once the test opens it."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.opened = trio.Event()

    async def wait(self) -> None:
        self.entered.set()
        await self.opened.wait()


async def next_piece(pieces: AsyncGenerator[bytes, None]) -> bytes | None:
    """The next piece, or None when the stream ended."""
    with trio.fail_after(20):
        try:
            return await pieces.__anext__()
        except StopAsyncIteration:
            return None


async def read_until(pieces: AsyncGenerator[bytes, None], expected: bytes) -> None:
    """Take pieces until exactly `expected` came (a piece may hold part of a line)."""
    got = b""
    while len(got) < len(expected):
        piece = await next_piece(pieces)
        assert piece is not None, got
        got += piece
    assert got == expected


async def test_a_follower_sees_each_line_as_it_is_written_then_the_end(tmp_path: Path) -> None:
    rom = make_rom(
        tmp_path,
        """
        async def main(host, args):
            print("one")
            await host.wait()
            print("two")
        """,
    )
    gate = Gate()
    async with Executor(tmp_path / "data", kill_grace=0.5) as executor:
        handle = await executor.spawn(rom, [], lambda _handle: gate)
        async with contextlib.aclosing(handle.follow_logs()) as pieces:
            await read_until(pieces, b"one\n")
            with trio.fail_after(20):
                await gate.entered.wait()
            # The child waits at the gate: "two" cannot have been written yet.
            assert handle.read_logs() == b"one\n"
            gate.opened.set()
            await read_until(pieces, b"two\n")
            assert await next_piece(pieces) is None
        assert handle.exit_code == 0


async def test_follow_ends_at_once_after_exit_with_the_whole_output(tmp_path: Path) -> None:
    rom = make_rom(tmp_path, 'async def main(host, args):\n    print("done")\n')
    async with Executor(tmp_path / "data", kill_grace=0.5) as executor:
        handle = await executor.spawn(rom, [], lambda _handle: Gate())
        assert await handle.wait() == 0
        with trio.fail_after(5):
            assert [piece async for piece in handle.follow_logs()] == [b"done\n"]


async def test_a_follower_behind_by_more_than_the_log_keeps_skips_to_the_newest(
    tmp_path: Path,
) -> None:
    log = CappedLog(tmp_path / "p.log", 4 * FOLLOW_CHUNK)
    log.write(b"old\n")
    async with contextlib.aclosing(log.follow(10 * FOLLOW_CHUNK)) as pieces:
        assert await next_piece(pieces) == b"old\n"
        # Written while the follower does not read: never held up; the log keeps the newest.
        data = bytes(range(256)) * (5 * FOLLOW_CHUNK // 256)
        log.write(data)
        log.close()
        rest = [piece async for piece in pieces]
    assert all(0 < len(piece) <= FOLLOW_CHUNK for piece in rest)
    kept = b"".join(rest)
    assert FOLLOW_CHUNK * 2 <= len(kept) < len(data)
    assert data.endswith(kept)


GO_ROM = """\
async def main(host, args):
    print("one", flush=True)
    me = await host.id()
    go = await (await (await host.root()).walk(f"/{me}/test/go")).load()
    await go.recv()
    print("two", flush=True)
"""


async def spawn_go_rom(host: Any, peer: str, tmp_path: Path) -> tuple[Any, Any, int]:
    """Spawn GO_ROM on the host; its channel (send to let it print "two" and exit) and pid."""
    src = tmp_path / "go"
    src.mkdir()
    (src / "rom.toml").write_text('name = "go"\nversion = "1"\nentry = "go:main"\n')
    (src / "go.py").write_text(GO_ROM)
    channel = await host.channel()
    await (await (await host.root()).walk(f"/{peer}/test/go")).store(channel)
    process = await host.spawn(build_rom(src), [])
    return process, channel, (await process.info())["pid"]


async def open_follower(host: HostProcess, pid: int) -> tuple[trio.Process, Lines]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ww", "logs", "-f", "--dial", host.address, str(pid)],
        stdout=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None
    return proc, Lines(proc.stdout)


async def test_ww_logs_follow_prints_both_lines_and_exits_0_when_the_process_exits(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    a = await host_factory.start()
    async with a.connect() as host:
        process, go, pid = await spawn_go_rom(host, a.peer, tmp_path)
        proc, out = await open_follower(a, pid)
        with trio.fail_after(20):
            assert await out.next() == "one"
            await go.send(b"go")
            assert await out.next() == "two"
            await out.drain()
            assert await proc.wait() == 0
            assert await process.wait() == 0
        assert out.seen == ["one", "two"]

        # Following an exited process prints its output and ends at once.
        again = await ww("logs", "--follow", "--dial", a.address, str(pid))
        assert (again.returncode, again.stdout) == (0, b"one\ntwo\n"), again.stderr
        # The process's own capability follows the same way.
        with trio.fail_after(10):
            async with process.stream("follow_logs") as pieces:
                assert b"".join([piece async for piece in pieces]) == b"one\ntwo\n"


async def test_ww_logs_follow_ends_with_130_on_ctrl_c(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    a = await host_factory.start()
    async with a.connect() as host:
        process, _go, pid = await spawn_go_rom(host, a.peer, tmp_path)
        proc, out = await open_follower(a, pid)
        with trio.fail_after(20):
            assert await out.next() == "one"
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 130
        assert (await process.info())["state"] == "running"
        await process.kill()


async def test_ww_logs_follow_of_an_unknown_pid_is_a_one_line_error(
    host_factory: HostFactory,
) -> None:
    a = await host_factory.start()
    missing = await ww("logs", "-f", "--dial", a.address, "999999")
    assert missing.returncode == 1
    assert missing.stderr.decode().strip().splitlines() == [
        "ww logs: error: no process 999999 on this host; `ww ps` lists them"
    ]
