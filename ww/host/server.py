"""`run_host`: listen, authenticate, serve each connection its Host capability, run the host."""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from ww.auth import peer_id_of
from ww.host.config import Address, HostConfig, HostError, HostInfo, format_address
from ww.host.node import Host, one_line
from ww.host.restarts import RestartStore
from ww.rpc import Connection

log = logging.getLogger("ww.host")

FD_RESERVE = 256
"""File descriptors kept back from connections: ROM processes, logs, the ROM cache, links."""

_CAPACITY_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def run_host(
    config: HostConfig,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[HostInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a host until cancelled, or until `stop` is set: then it tells its linked hosts it
    is leaving (so they drop it from their views at once) and returns. Raises HostError
    (one line) when it cannot start."""
    from ww.auth import Identity, load_cluster_key, open_client_stream, server_stream_wrapper
    from ww.rom.executor import Executor

    config.check()
    _raise_fd_limit()
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HostError(f"cannot use data directory {config.data_dir}: {e.strerror}") from None
    identity = Identity.load_or_create(config.data_dir)
    key = None if config.cluster_key_path is None else load_cluster_key(config.cluster_key_path)
    wrap = server_stream_wrapper(key, identity)

    async def dialer(addr: Address) -> trio.abc.Stream:
        stream: trio.abc.Stream = await open_client_stream(
            *addr, cluster_key=key, identity=identity
        )
        return stream

    listen_host, listen_port = config.listen
    try:
        listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
    except OSError as e:
        raise HostError(
            f"cannot listen on {format_address(config.listen)}: {e.strerror or e}"
        ) from None
    sockname = listeners[0].socket.getsockname()
    addr: Address = (sockname[0], sockname[1])

    restarts = RestartStore(config.data_dir / "restarts")
    records = restarts.load()  # the ROMs records name are pinned in the cache before it is trimmed
    executor = Executor(
        config.data_dir,
        log_limit=config.log_limit,
        keep_logs=config.keep_logs,
        rom_cache_limit=config.rom_cache_limit,
        pinned=restarts.cids,
        limits=config.limits,
        sandbox=config.sandbox,
    )
    async with executor, trio.open_nursery() as nursery:
        host = Host(config, identity.peer_id, addr, nursery, dialer, executor, key, restarts)
        gate = Gate(config.max_connections, config.max_connections_per_address)

        async def handle(tcp: trio.SocketStream) -> None:
            await _serve_client(host, tcp, wrap, gate)

        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handle, nursery, gate)
        nursery.start_soon(host.tick_loop)
        for peer in config.peers:
            nursery.start_soon(host.keep_peer, peer)
        if executor.sandbox is None:
            log.warning("%s", executor.sandbox_error)
        else:
            log.info("%s", executor.sandbox.describe())
        log.info("host %s listening on %s", host.peer_id, format_address(addr))
        task_status.started(HostInfo(host.peer_id, addr))
        await host.start_recorded(records)
        try:
            await (trio.sleep_forever() if stop is None else stop.wait())
            # A clean stop: tell the linked hosts, while the links are still up.
            log.info("host %s stopping", host.peer_id)
            await host.announce_leaving()
            nursery.cancel_scope.cancel()
        except trio.Cancelled:
            log.info("host %s stopping", host.peer_id)
            raise


@dataclass(slots=True, eq=False)
class Slot:
    """One admitted connection: cancelling `scope` closes it."""

    address: str
    scope: trio.CancelScope
    conn: Connection | None = None  # once it has sent something and is authenticated

    def idle(self) -> bool:
        """Whether it holds nothing (no capability, call or stream; or is not served yet)."""
        return self.conn is None or self.conn.holds_nothing()


class Gate:
    """Counts open connections, in all and by peer address, against their caps.

    At the total cap a new connection takes the place of the oldest one that holds nothing,
    so idle sockets cannot keep clients out; at the cap of one address, or when every
    connection holds something, it is refused."""

    def __init__(self, total: int, per_address: int) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        fd_room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else total
        self.total = max(1, min(total, fd_room))
        self.per_address = per_address
        self.open: Counter[str] = Counter()
        self.slots: dict[Slot, None] = {}  # oldest first
        self._last_warning: dict[str, float] = {}

    def admit(self, address: str, scope: trio.CancelScope) -> Slot | str:
        """A slot for one more connection from `address`, or why it is refused."""
        if self.open[address] >= self.per_address:
            return f"{self.per_address} connections from {address} are open, the most per address"
        if len(self.slots) >= self.total:
            oldest = next((slot for slot in self.slots if slot.idle()), None)
            if oldest is None:
                return f"{self.total} connections are open and busy, the most this host takes"
            self.warn("evict", "at %d connections: closing the oldest idle ones", self.total)
            self.leave(oldest)
            oldest.scope.cancel()
        slot = Slot(address, scope)
        self.slots[slot] = None
        self.open[address] += 1
        return slot

    def leave(self, slot: Slot) -> None:
        if slot in self.slots:
            del self.slots[slot]
            self.open[slot.address] -= 1
            if not self.open[slot.address]:
                del self.open[slot.address]

    def warn(self, kind: str, text: str, *args: Any) -> None:
        """Log at most one warning of a kind a second (a flood of peers is not a flood of
        logs)."""
        now = trio.current_time()
        if now - self._last_warning.get(kind, -1e9) >= 1.0:
            self._last_warning[kind] = now
            log.warning(text, *args)


def _raise_fd_limit() -> None:
    """Take the hard limit of open files as the soft one: connections need them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _accept_loop(
    listener: trio.SocketListener, handle: Any, nursery: trio.Nursery, gate: Gate
) -> None:
    """Accept connections; when out of file descriptors (or memory), say so at most once a
    second and back off, instead of a traceback per attempt."""
    backoff = 0.01
    while True:
        try:
            stream = await listener.accept()
        except OSError as e:
            if e.errno not in _CAPACITY_ERRORS:
                raise
            gate.warn(
                "accept",
                "cannot accept connections: %s (%d open); backing off",
                e.strerror,
                len(gate.slots),
            )
            await trio.sleep(backoff)
            backoff = min(1.0, backoff * 2)
            continue
        backoff = 0.01
        nursery.start_soon(handle, stream)


async def _serve_client(host: Host, tcp: trio.SocketStream, wrap: Any, gate: Gate) -> None:
    """Authenticate one accepted connection and serve it; a bad peer never hurts the host."""
    try:
        address = tcp.socket.getpeername()
        peer = format_address(address[:2])
    except OSError:
        await trio.aclose_forcefully(tcp)
        return
    with trio.CancelScope() as scope:
        slot = gate.admit(address[0], scope)
        if isinstance(slot, str):
            gate.warn("refuse", "refusing connections: %s", slot)
            await trio.aclose_forcefully(tcp)
            return
        try:
            await _serve_admitted(host, tcp, wrap, peer, slot)
        finally:
            gate.leave(slot)
    if scope.cancelled_caught:
        await trio.aclose_forcefully(tcp)


async def _serve_admitted(
    host: Host, tcp: trio.SocketStream, wrap: Any, peer: str, slot: Slot
) -> None:
    config = host.config
    try:
        with trio.fail_after(config.handshake_timeout):
            # Nothing is set up for a peer until it sends something: a silent socket costs
            # a task, and is the first to go when the host is full.
            await trio.lowlevel.wait_readable(tcp.socket)
            stream = await wrap(tcp)  # with a key: mutual TLS, refused before any capability
    except Exception as e:
        log.warning("refused connection from %s: %s", peer, one_line(e))
        await trio.aclose_forcefully(tcp)
        return
    cap, lease = host.bootstrap(f"connection {peer}", peer_id_of(stream))
    try:
        async with Connection.open(
            stream, cap, name=f"client {peer}", budget=host.receive_budget
        ) as conn:
            host.connections.add(conn)
            slot.conn = conn
            try:
                await _until_closed_or_idle(conn, config.handshake_timeout, config.idle_timeout)
            finally:
                host.connections.discard(conn)
    except Exception as e:
        log.warning("connection from %s failed: %s", peer, e)
    finally:
        lease.end()
        await trio.aclose_forcefully(stream)


async def _until_closed_or_idle(conn: Connection, first: float, idle: float) -> None:
    """Return when `conn` closes, or when it has held nothing and sent no complete frame for
    `idle` seconds (`first` seconds before its first frame): then leaving closes it."""
    period = min(first, idle, 10.0)  # how late a check may come
    while not conn.closed.is_set():
        limit = idle if conn.frames_received else first
        deadline = conn.last_frame + limit
        now = trio.current_time()
        if now >= deadline and conn.holds_nothing():
            log.info("closing %s: nothing held and nothing sent for %gs", conn.name, limit)
            return
        with trio.move_on_at(min(deadline, now + period) if now < deadline else now + period):
            await conn.closed.wait()
