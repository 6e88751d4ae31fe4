"""`run_host`: listen, authenticate, serve each connection its Host capability, run the host."""

from __future__ import annotations

import logging
from typing import Any

import trio

from ww.auth import peer_id_of
from ww.host.config import Address, HostConfig, HostError, HostInfo, format_address
from ww.host.node import Host, one_line
from ww.host.restarts import RestartStore
from ww.rpc import Connection

log = logging.getLogger("ww.host")

HANDSHAKE_TIMEOUT = 10.0


async def run_host(
    config: HostConfig, *, task_status: trio.TaskStatus[HostInfo] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a host until cancelled. Raises HostError (one line) when it cannot start."""
    from ww.auth import Identity, load_cluster_key, open_client_stream, server_stream_wrapper
    from ww.rom.executor import Executor

    config.check()
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
    )
    async with executor, trio.open_nursery() as nursery:
        host = Host(config, identity.peer_id, addr, nursery, dialer, executor, key, restarts)

        async def handle(tcp: trio.SocketStream) -> None:
            await _serve_client(host, tcp, wrap)

        nursery.start_soon(trio.serve_listeners, handle, listeners)
        nursery.start_soon(host.tick_loop)
        for peer in config.peers:
            nursery.start_soon(host.keep_peer, peer)
        log.info("host %s listening on %s", host.peer_id, format_address(addr))
        task_status.started(HostInfo(host.peer_id, addr))
        await host.start_recorded(records)
        try:
            await trio.sleep_forever()
        finally:
            log.info("host %s stopping", host.peer_id)


async def _serve_client(host: Host, tcp: trio.SocketStream, wrap: Any) -> None:
    """Authenticate one accepted connection and serve it; a bad peer never hurts the host."""
    try:
        peer = format_address(tcp.socket.getpeername()[:2])
    except OSError:
        peer = "a peer that left"
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream = await wrap(tcp)  # with a key: mutual TLS, refused before any capability
    except Exception as e:
        log.warning("refused connection from %s: %s", peer, one_line(e))
        await trio.aclose_forcefully(tcp)
        return
    cap, lease = host.bootstrap(f"connection {peer}", peer_id_of(stream))
    try:
        async with Connection.open(stream, cap, name=f"client {peer}") as conn:
            host.connections.add(conn)
            try:
                await conn.closed.wait()
            finally:
                host.connections.discard(conn)
    except Exception as e:
        log.warning("connection from %s failed: %s", peer, e)
    finally:
        lease.end()
        await trio.aclose_forcefully(stream)
