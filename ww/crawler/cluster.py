"""Where a crawl runs: an embedded local cluster, or an existing ww cluster.

`local_cluster(data_dir)` starts three `ww start` hosts as child processes on 127.0.0.1 (free
ports), their data under `data_dir/hosts/h0..h2`, and yields a `Cluster` once each host's view
lists all three. The hosts run in their own sessions, so the terminal's Ctrl-C reaches only
`ww-crawl`, which stops them in order; they get SIGTERM if `ww-crawl` itself dies (Linux's
parent-death signal), so none is left behind. `remote_cluster(address, key)` dials a host of an
existing cluster instead.

On either, `start_queue` makes sure the Raft group runs (one replica per host at
`/<peer>/raft/v1`, with a volume and restarted on failure, so a host restart brings it back)
and `spawn_workers` starts one worker ROM per host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

__all__ = [
    "Cluster",
    "ClusterError",
    "HostProcess",
    "connect",
    "connect_queue",
    "local_cluster",
    "remote_cluster",
    "rom_source",
    "spawn_workers",
    "start_queue",
    "stop_stale_hosts",
]

GROUP = "raft/v1"
WORKERS = "ww-crawl"  # workers hang at /<peer>/ww-crawl/w<N>
LISTENING = re.compile(r"host (\S+) listening on (\S+?):(\d+)\b")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
HOSTS = 3


class ClusterError(Exception):
    """The cluster cannot be started or reached; the message is one line."""


@dataclass(slots=True)
class HostProcess:
    name: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    peer: str = ""
    address: str = ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass(slots=True)
class Cluster:
    """A connection to one host of a cluster (`host`: its Host capability) and the peers.

    `lost` is set when that connection ends (its host died); `reconnect()` then connects to
    another host of the cluster, so that `ww-crawl` goes on through it."""

    host: Any
    peers: list[str]
    address: str
    addresses: list[str]  # every host's address, to reconnect through
    lost: trio.Event
    stack: AsyncExitStack
    processes: list[HostProcess] = field(default_factory=list)  # the embedded hosts, if any
    key: Path | None = None

    async def reconnect(self) -> None:
        for address in self.addresses:
            if address == self.address:
                continue
            try:
                host, lost = await self.stack.enter_async_context(_link(address, self.key))
            except ClusterError as exc:
                log.debug("reconnecting through %s: %s", address, exc)
                continue
            self.host, self.lost, self.address = host, lost, address
            log.warning("lost the connection to a host; going on through %s", address)
            return
        raise ClusterError("no host of the cluster answers any more")


def _set_parent_death_signal() -> None:  # runs in the child, before exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _start_host(
    name: str, data_dir: Path, peers: Sequence[str], extra: Sequence[str]
) -> HostProcess:
    host_dir = data_dir / "hosts" / name
    host_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "hosts" / f"{name}.log"
    argv = [sys.executable, "-m", "ww", "start", "--listen", "127.0.0.1:0"]
    argv += ["--data-dir", str(host_dir), *extra]
    for peer in peers:
        argv += ["--peer", peer]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
            preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,
        )
    return HostProcess(name, host_dir, process, log_path)


async def _wait_listening(host: HostProcess, since: int) -> None:
    with trio.move_on_after(START_TIMEOUT):
        while True:
            text = host.log_path.read_bytes()[since:].decode(errors="replace")
            match = LISTENING.search(text)
            if match:
                host.peer = match.group(1)
                host.address = f"{match.group(2)}:{match.group(3)}"
                return
            if not host.alive:
                break
            await trio.sleep(0.05)
    tail = host.log_path.read_bytes()[since:].decode(errors="replace").strip().splitlines()
    last = tail[-1] if tail else "no output"
    raise ClusterError(f"host {host.name} did not start ({last}); see {host.log_path}")


@asynccontextmanager
async def connect(address: str, key: Path | None = None) -> AsyncIterator[Any]:
    """A client connection to the host at `address`; yields its Host capability."""
    async with _link(address, key) as (host, _):
        yield host


@asynccontextmanager
async def _link(address: str, key: Path | None) -> AsyncIterator[tuple[Any, trio.Event]]:
    """A connection to the host at `address`: its Host capability, and an event set when the
    connection ends."""
    from ww.auth import load_cluster_key, open_client_stream
    from ww.host.config import parse_address
    from ww.rpc import Connection, ConnectionLost

    cluster_key = load_cluster_key(key) if key is not None else None
    try:
        with trio.fail_after(10):
            stream = await open_client_stream(*parse_address(address), cluster_key=cluster_key)
    except (OSError, trio.TooSlowError, ValueError) as exc:
        raise ClusterError(f"no ww host answers at {address}; is the cluster running?") from exc
    async with stream, Connection.open(stream, name=f"ww-crawl {address}") as conn:
        host = conn.bootstrap()
        try:
            await host.id()  # a host with a key closes a connection that did not use it
        except ConnectionLost as exc:
            hint = "is it still running?" if key else "if it has a cluster key, pass --key FILE"
            raise ClusterError(f"the host at {address} closed the connection; {hint}") from exc
        yield host, conn.closed


async def _wait_view(host: Any, n: int, timeout: float = START_TIMEOUT) -> list[str]:
    with trio.move_on_after(timeout):
        while True:
            peers = sorted(entry["peer"] for entry in await (await host.view()).hosts())
            if len(peers) >= n:
                return peers
            await trio.sleep(0.1)
    raise ClusterError(f"the hosts did not see one another within {timeout:g} s")


def stop_stale_hosts(data_dir: Path) -> None:
    """Stop hosts of an earlier run in `data_dir` that are still running after the `ww-crawl`
    that started them was killed, so that their data can be used again. Raises ClusterError
    when that `ww-crawl` is still running: its crawl is not ours to stop."""
    state = data_dir / "hosts" / "pids.json"
    try:
        pids = json.loads(state.read_text())
    except (OSError, ValueError):
        return
    marker = str((data_dir / "hosts").resolve())
    for pid in pids if isinstance(pids, list) else []:
        cmdline = _cmdline(pid)
        if cmdline is None or marker not in cmdline or " start " not in cmdline:
            continue  # gone, or the pid is another process's now
        owner = _parent(pid)
        owner_cmd = _cmdline(owner) if owner not in (None, 1) else None
        if owner_cmd is not None and ("ww.crawler" in owner_cmd or "ww-crawl" in owner_cmd):
            raise ClusterError(
                f"a ww-crawl (pid {owner}) is running on {data_dir}; stop it first "
                "(Ctrl-C), or use `ww-crawl status` to watch it"
            )
        log.info("stopping host %s left running by an earlier run", pid)
        try:
            os.kill(int(pid), signal.SIGTERM)
        except OSError:
            continue
        for _ in range(100):
            if _cmdline(pid) is None:
                break
            time.sleep(0.1)


def _cmdline(pid: object) -> str | None:
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes()  # type: ignore[call-overload]
    except (OSError, ValueError, TypeError):
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace") or None


def _parent(pid: object) -> int | None:
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()  # type: ignore[call-overload]
        return int(stat.rpartition(")")[2].split()[1])
    except (OSError, ValueError, TypeError, IndexError):
        return None


@asynccontextmanager
async def local_cluster(
    data_dir: Path, *, hosts: int = HOSTS, host_args: Sequence[str] = ()
) -> AsyncIterator[Cluster]:
    """Start `hosts` hosts under `data_dir/hosts`, yield a Cluster, stop them at the end."""
    data_dir = data_dir.resolve()
    (data_dir / "hosts").mkdir(parents=True, exist_ok=True)
    stop_stale_hosts(data_dir)
    started: list[HostProcess] = []
    try:
        first_log = data_dir / "hosts" / "h0.log"
        since = first_log.stat().st_size if first_log.exists() else 0
        first = _start_host("h0", data_dir, [], host_args)
        started.append(first)
        await _wait_listening(first, since)
        rest = []
        for i in range(1, hosts):
            path = data_dir / "hosts" / f"h{i}.log"
            offset = path.stat().st_size if path.exists() else 0
            rest.append((_start_host(f"h{i}", data_dir, [first.address], host_args), offset))
        started += [h for h, _ in rest]
        (data_dir / "hosts" / "pids.json").write_text(json.dumps([h.process.pid for h in started]))
        for h, offset in rest:
            await _wait_listening(h, offset)
        async with AsyncExitStack() as stack:
            host, lost = await stack.enter_async_context(_link(first.address, None))
            peers = await _wait_view(host, hosts)
            addresses = [h.address for h in started]
            yield Cluster(host, peers, first.address, addresses, lost, stack, started)
    finally:
        with trio.CancelScope(shield=True):
            await stop_hosts(started)


async def stop_hosts(hosts: Sequence[HostProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every host, then SIGKILL those still running after `timeout` seconds."""
    for h in hosts:
        if h.alive:
            h.process.terminate()
    with trio.move_on_after(timeout):
        while any(h.alive for h in hosts):
            await trio.sleep(0.05)
    for h in hosts:
        if h.alive:
            log.warning("host %s did not stop within %g s; killing it", h.name, timeout)
            h.process.kill()
            h.process.wait()


@asynccontextmanager
async def remote_cluster(address: str, key: Path | None = None) -> AsyncIterator[Cluster]:
    """Dial a host of an existing cluster."""
    async with AsyncExitStack() as stack:
        host, lost = await stack.enter_async_context(_link(address, key))
        members = await (await host.view()).hosts()
        peers = sorted(m["peer"] for m in members)
        addresses = [address] + [m["addrs"][0] for m in members if m.get("addrs")]
        yield Cluster(host, peers, address, addresses, lost, stack, key=key)


def rom_source(name: str) -> Path:
    """The source directory of one of the project's ROMs (roms/NAME beside the ww package)."""
    import ww

    path = Path(ww.__file__).resolve().parent.parent / "roms" / name
    if not (path / "rom.toml").is_file():
        raise ClusterError(
            f"cannot find the {name} ROM at {path}; install ww-crawl from its source tree "
            "(pip install -e .)"
        )
    return path


def build(name: str) -> bytes:
    from ww.rom import build_rom

    return build_rom(rom_source(name))


async def _running_at(host: Any, path: str) -> bool:
    """True when a process hangs at anchor `path`."""
    root = await host.root()
    parent, _, leaf = path.rstrip("/").rpartition("/")
    try:
        names = await (await root.walk(parent)).ls()
    except Exception:
        return False
    return any(n.strip("/") == leaf for n in names)


async def start_queue(cluster: Cluster, *, resume: bool = False, timeout: float = 60.0) -> Any:
    """Make sure the Raft group runs (one replica on each of the first three hosts, at
    `/<peer>/raft/v1`); return a connected `ww.queue.QueueClient` once it has a leader.

    The replicas are spawned with a volume and restart="on-failure", so after a host restart
    the host starts its replica again by itself: on `resume` they are given a few seconds to
    come back before any missing one is spawned (on its old volume, so with its old state)."""

    voters = cluster.peers[:HOSTS]
    deadline = trio.current_time() + (10.0 if resume else 0.0)
    while True:
        missing = [p for p in voters if not await _running_at(cluster.host, f"/{p}/{GROUP}")]
        if not missing or trio.current_time() >= deadline:
            break
        await trio.sleep(0.2)
    if missing:
        rom = build("raft/replica")
        root = await cluster.host.root()
        for peer in missing:
            anchor = await root.walk(f"/{peer}/{GROUP}")
            await anchor.spawn(
                rom, ["--voters", ",".join(voters)], volume=True, restart="on-failure"
            )
            log.debug("started a replica at /%s/%s", peer, GROUP)
    return await connect_queue(cluster, timeout=timeout)


async def connect_queue(cluster: Cluster, *, timeout: float = 60.0) -> Any:
    """A `ww.queue.QueueClient` of the cluster's Raft group, once the group has a leader."""
    from ww.queue.client import QueueClient, QueueError

    with trio.move_on_after(timeout):
        while True:
            try:
                client = await QueueClient.connect(cluster.host, GROUP, timeout=10)
            except QueueError as exc:
                log.debug("waiting for the Raft group: %s", exc)
                await trio.sleep(0.2)
                continue
            try:
                status = await client.status()
            except Exception as exc:
                log.debug("waiting for a leader: %s", exc)
                status = {}
            if status.get("leader"):
                return client
            await client.aclose()
            await trio.sleep(0.2)
    raise ClusterError(f"the Raft group elected no leader within {timeout:g} s")


async def spawn_workers(
    cluster: Cluster, settings_arg: str, *, per_host: int = 1, handler_path: str | None = None
) -> list[Any]:
    """Spawn `per_host` worker ROMs on every host, all at once; returns their Process
    capabilities. A worker waits for the crawl to be set up in the queue before it claims."""
    rom = build("crawler")
    root = await cluster.host.root()
    slots = [(peer, n) for peer in cluster.peers for n in range(per_host)]
    processes: list[Any] = [None] * len(slots)

    async def spawn(i: int, peer: str, n: int) -> None:
        args = ["--settings", settings_arg, "--name", f"{peer[:8]}-w{n}", "--group", GROUP]
        if handler_path is not None:
            args += ["--handler", handler_path]
        anchor = await root.walk(f"/{peer}/{WORKERS}/w{n}")
        processes[i] = await anchor.spawn(rom, args)

    async with trio.open_nursery() as nursery:
        for i, (peer, n) in enumerate(slots):
            nursery.start_soon(spawn, i, peer, n)
    return processes
