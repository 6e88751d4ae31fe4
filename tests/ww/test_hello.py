"""The seed's first demonstration, end to end: real `ww start` hosts, the real `ww` command.

1. `ww run hello.rom` dials a host, joins the topic "test" and publishes "Hello, World".
2. The same ROM spawns its inner ROM at `/<peer id>/hello` on another host, which publishes to
   the same topic; `ww sub test` on a third host sees both messages.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.ww.conftest import HostFactory, HostProcess

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@dataclass
class Lines:
    """Lines read from a child's pipe, as they arrive; the rest is kept for error messages."""

    stream: trio.abc.ReceiveStream
    seen: list[str] = field(default_factory=list)
    _buf: bytes = b""

    async def next(self) -> str:
        while b"\n" not in self._buf:
            chunk = await self.stream.receive_some()
            if not chunk:
                raise EOFError("the child closed its output:\n" + "\n".join(self.seen))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode(errors="replace")
        self.seen.append(text)
        return text

    async def until(self, pattern: re.Pattern[str]) -> re.Match[str]:
        while (match := pattern.search(await self.next())) is None:
            pass
        return match

    async def drain(self) -> None:
        try:
            while True:
                await self.next()
        except (EOFError, trio.ClosedResourceError):
            pass


@asynccontextmanager
async def child(argv: list[str]) -> AsyncIterator[tuple[Lines, Lines]]:
    """A child process with its stdout and stderr read line by line; terminated at the end."""
    proc = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        yield Lines(proc.stdout), Lines(proc.stderr)
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def ww_sub(host: HostProcess, topic: str) -> AsyncIterator[Lines]:
    """`ww sub TOPIC` against `host`; yields its stdout once it has subscribed."""
    argv = [sys.executable, "-m", "ww", "sub", "--dial", host.address, topic]
    async with child(argv) as (out, err):
        with trio.fail_after(20):
            await err.until(re.compile(f"subscribed to {re.escape(topic)}"))
        yield out


async def ww(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "ww", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=ENV,
        )


@pytest.fixture(scope="module")
def hello_rom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rom") / "hello.rom"
    subprocess.run(
        [sys.executable, "-m", "ww", "build", str(REPO / "roms/hello"), "-o", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


async def test_hello_publishes_hello_world_to_test(
    host_factory: HostFactory, hello_rom: Path
) -> None:
    a = await host_factory.start()
    async with ww_sub(a, "test") as messages:
        result = await ww("run", "--dial", a.address, str(hello_rom))
        assert result.returncode == 0, result.stderr.decode()
        with trio.fail_after(10):
            assert await messages.next() == "Hello, World"
        assert b"no other host in the view" in result.stdout


async def test_hello_spawns_its_inner_rom_on_another_host(
    host_factory: HostFactory, hello_rom: Path
) -> None:
    a, b, c = await host_factory.cluster(3)
    async with ww_sub(c, "test") as messages:
        result = await ww("run", "--dial", a.address, str(hello_rom), b.peer)
        assert result.returncode == 0, result.stderr.decode()
        with trio.fail_after(10):
            heard = {await messages.next(), await messages.next()}
    assert heard == {"Hello, World", f"Hello from {b.peer}"}
    assert f"inner ROM on /{b.peer}/hello exited with 0".encode() in result.stdout

    # The inner ROM ran on B, as a process of B's, and not on A or C.
    for host, expected in ((a, []), (b, [0]), (c, [])):
        async with host.connect() as ref:
            exit_codes = [p["exit_code"] for p in await ref.ps() if p["name"] == "hello-inner"]
        assert exit_codes == expected, host.name
