"""Shared fixtures: real ww hosts as child processes on loopback, on free ports.

    async def test_something(host_factory):
        a = await host_factory.start()
        b = await host_factory.start(peers=[a], ttl=1.0)
        async with b.connect() as host:      # a Ref to b's Host capability
            ...
        b.kill()                             # SIGKILL

Each host is `python -m ww start --listen 127.0.0.1:0 --data-dir DIR ...`; the fixture reads
the "host <peer id> listening on ADDR" line from its stderr, keeps draining its output (kept in
`HostProcess.lines` for failure messages) and kills every host it started when the test ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

LISTENING = re.compile(r"host (\S+) listening on (\S+?):(\d+)\b")
START_TIMEOUT = 20.0


@dataclass
class HostProcess:
    """A running host: its peer id, address, data dir, process and output lines so far."""

    name: str
    peer: str
    host: str
    port: int
    data_dir: Path
    process: trio.Process
    key: Path | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        """SIGKILL: the host gets no chance to say goodbye."""
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.process.terminate()

    def output(self) -> str:
        return "\n".join(self.lines)

    def connect(self, key: Path | None = None) -> Any:
        """`async with h.connect() as host:` — a client connection to this host's capability."""
        return connect(self.addr, key=key if key is not None else self.key)


@asynccontextmanager
async def connect(addr: tuple[str, int], key: Path | None = None) -> AsyncIterator[Any]:
    """Dial a host as a client (with the cluster key, if any) and yield its Host capability."""
    from ww.auth import load_cluster_key, open_client_stream
    from ww.rpc import Connection

    cluster_key = load_cluster_key(key) if key is not None else None
    stream = await open_client_stream(*addr, cluster_key=cluster_key)
    async with stream, Connection.open(stream) as conn:
        yield conn.bootstrap()


class HostFactory:
    """Starts hosts for one test and stops them all at its end."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self._nursery = nursery
        self._tmp = tmp_path
        self.hosts: list[HostProcess] = []
        self._started = 0

    async def start(
        self,
        *,
        name: str | None = None,
        peers: Sequence[HostProcess | str] = (),
        key: Path | None = None,
        ttl: float = 2.0,
        heartbeat: float = 0.2,
        meta: dict[str, str] | None = None,
        ns: str | None = None,
        data_dir: Path | None = None,
        listen: str = "127.0.0.1:0",
        args: Sequence[str] = (),
    ) -> HostProcess:
        """Start a host and wait until it listens. `peers` are hosts or "HOST:PORT" strings;
        `args` are more `ww start` arguments."""
        name = name or f"h{self._started}"
        self._started += 1
        data_dir = data_dir or self._tmp / name
        argv = [sys.executable, "-m", "ww", "start", "--listen", listen]
        argv += ["--data-dir", str(data_dir), "--ttl", str(ttl), "--heartbeat", str(heartbeat)]
        for peer in peers:
            argv += ["--peer", peer if isinstance(peer, str) else peer.address]
        for k, v in (meta or {}).items():
            argv += ["--meta", f"{k}={v}"]
        if key is not None:
            argv += ["--key", str(key)]
        if ns is not None:
            argv += ["--ns", ns]
        argv += list(args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        lines: list[str] = []
        listening = trio.Event()
        found: list[re.Match[str]] = []
        assert process.stderr is not None
        self._nursery.start_soon(_read_lines, process.stderr, lines, listening, found)
        with trio.move_on_after(START_TIMEOUT):
            await listening.wait()
        if not found:
            process.kill()
            await process.wait()
            raise RuntimeError(f"host {name} did not start:\n" + "\n".join(lines))
        match = found[0]
        host = HostProcess(
            name, match.group(1), match.group(2), int(match.group(3)), data_dir, process, key, lines
        )
        self.hosts.append(host)
        return host

    async def cluster(self, n: int, **options: Any) -> list[HostProcess]:
        """Start `n` hosts: the first, then the rest at once, each joining through the first;
        return when every host's view lists every host. `options` go to `start`."""
        first = await self.start(**options)
        rest: list[HostProcess] = []

        async def join() -> None:
            rest.append(await self.start(peers=[first], **options))

        async with trio.open_nursery() as nursery:
            for _ in range(n - 1):
                nursery.start_soon(join)
        hosts = [first, *sorted(rest, key=lambda h: h.name)]
        everyone = {h.peer for h in hosts}
        for host in hosts:
            await wait_for(lambda host=host: _view_is(host, everyone), timeout=20)
        return hosts

    async def stop_all(self) -> None:
        for host in self.hosts:
            if host.alive:
                host.kill()
        for host in self.hosts:
            await host.process.wait()


async def _read_lines(
    stream: trio.abc.ReceiveStream,
    lines: list[str],
    listening: trio.Event,
    found: list[re.Match[str]],
) -> None:
    buf = b""
    try:
        async for chunk in stream:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                match = LISTENING.search(line)
                if match and not found:
                    found.append(match)
                    listening.set()
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        listening.set()


@pytest.fixture
async def host_factory(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[HostFactory]:
    """Start real host processes with `await host_factory.start(...)`; all killed at the end."""
    factory = HostFactory(nursery, tmp_path)
    try:
        yield factory
    finally:
        with trio.CancelScope(shield=True):
            await factory.stop_all()
        for host in factory.hosts:  # shown by pytest when the test failed
            print(f"--- host {host.name} {host.peer} at {host.address} ---\n{host.output()}")


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Await `predicate()` (sync or async) until it is true; fail after `timeout` seconds.

    For eventually consistent state (membership converging by gossip), not to hide races."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(interval)


async def view_of(host: HostProcess) -> set[str]:
    """The peer ids in `host`'s view."""
    async with host.connect() as ref:
        view = await ref.view()
        return {entry["peer"] for entry in await view.hosts()}


async def _view_is(host: HostProcess, peers: set[str]) -> bool:
    return await view_of(host) == peers
