"""TCP plumbing of the benchmark processes: the raft transport, the client protocol and the
start-up handshake.

Raft messages between processes on loopback: length-prefixed msgpack frames over TCP.

One outbound connection per peer, written by its own task. `send()` never blocks the raft
loop: it encodes each message, appends the frame to the peer's queue and returns; when a
queue is full the message is dropped (Raft retransmits). A broken connection is closed, its
queue is dropped, raft is told the peer is unreachable (once per outage), and the task
reconnects after a short pause. Inbound connections are read
frame by frame; a frame that does not decode is dropped and counted.

Client protocol (served by _raft_node.py and _pysyncobj_node.py alike): a stream of msgpack
arrays on TCP, pipelined, answered in any order.
    request  [rid, "put", data]      reply [rid, "ok", index] | [rid, "redirect", leader_id]
                                           | [rid, "err", "one line"]
    request  [rid, "status"]          reply [rid, "ok", {"id", "role", "leader", ...}]

Start-up handshake on stdin/stdout (one JSON line each way): a node binds its raft and client
listeners and prints {"raft_port": .., "client_port": ..}; the parent answers with
{"peers": {"<id>": ["127.0.0.1", port], ...}} (all voters, the node included). A node exits
when its stdin closes, so it never outlives the benchmark that started it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import trio

from ww.raft.types import Message, MessageDecodeError

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
"""A frame longer than this is treated as garbage: the connection is closed."""


@dataclass(slots=True)
class TransportStats:
    sent: int = 0
    received: int = 0
    dropped_full: int = 0
    dropped_disconnected: int = 0
    bad_frames: int = 0
    connects: int = 0


def frame(payload: bytes) -> bytes:
    """One frame: a 4-byte big-endian length, then the payload."""
    return _LEN.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into frames (sans-I/O: feed bytes, get payloads)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            if end - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


class _Peer:
    __slots__ = ("address", "node_id", "queue", "wakeup")

    def __init__(self, node_id: int, address: tuple[str, int]) -> None:
        self.node_id = node_id
        self.address = address
        self.queue: deque[bytes] = deque()
        self.wakeup = trio.Event()


class TcpTransport:
    """Sends raft messages to peers by node id; delivers inbound ones to `deliver`."""

    def __init__(
        self,
        peers: dict[int, tuple[str, int]],
        *,
        queue_limit: int = 4096,
        reconnect_delay: float = 0.05,
        on_unreachable: Callable[[int], None] | None = None,
    ) -> None:
        self._peers = {node_id: _Peer(node_id, addr) for node_id, addr in peers.items()}
        self._queue_limit = queue_limit
        self._reconnect_delay = reconnect_delay
        self._on_unreachable = on_unreachable
        self.stats = TransportStats()

    # -- outbound ---------------------------------------------------------------------------

    def send(self, messages: Iterable[Message]) -> None:
        """Queue messages for their peers; never blocks. Unknown destinations are dropped."""
        for m in messages:
            peer = self._peers.get(m.to)
            if peer is None:
                self.stats.dropped_disconnected += 1
                continue
            if len(peer.queue) >= self._queue_limit:
                self.stats.dropped_full += 1
                continue
            peer.queue.append(frame(m.encode()))
            peer.wakeup.set()

    async def run(self, deliver: Callable[[Message], None], listener: trio.SocketListener) -> None:
        """Run the per-peer senders and accept inbound connections until cancelled."""
        async with trio.open_nursery() as nursery:
            for peer in self._peers.values():
                nursery.start_soon(self._sender, peer)

            async def receive(stream: trio.SocketStream) -> None:
                await self._receive(stream, deliver)

            await trio.serve_listeners(receive, [listener], handler_nursery=nursery)

    async def _sender(self, peer: _Peer) -> None:
        reachable = True
        while True:
            try:
                with trio.fail_after(1.0):
                    stream = await trio.open_tcp_stream(*peer.address)
            except (OSError, trio.TooSlowError):
                self.stats.dropped_disconnected += len(peer.queue)
                peer.queue.clear()
                if reachable:
                    reachable = False
                    self._report_unreachable(peer)
                await trio.sleep(self._reconnect_delay)
                continue
            reachable = True
            self.stats.connects += 1
            try:
                async with stream:
                    while True:
                        if not peer.queue:
                            peer.wakeup = trio.Event()
                            await peer.wakeup.wait()
                        batch = b"".join(peer.queue)
                        count = len(peer.queue)
                        peer.queue.clear()
                        await stream.send_all(batch)
                        self.stats.sent += count
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.debug("connection to %s lost: %s", peer.address, e)
                self.stats.dropped_disconnected += len(peer.queue)
                peer.queue.clear()
                reachable = False
                self._report_unreachable(peer)
                await trio.sleep(self._reconnect_delay)

    def _report_unreachable(self, peer: _Peer) -> None:
        """Tell raft once per outage, so a leader probes that follower instead of streaming."""
        if self._on_unreachable is not None:
            self._on_unreachable(peer.node_id)

    # -- inbound ----------------------------------------------------------------------------

    async def _receive(self, stream: trio.abc.Stream, deliver: Callable[[Message], None]) -> None:
        reader = FrameReader()
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        return
                    for payload in reader.feed(data):
                        try:
                            msg = Message.decode(payload)
                        except MessageDecodeError as e:
                            self.stats.bad_frames += 1
                            log.warning("dropped a bad raft frame: %s", e)
                            continue
                        self.stats.received += 1
                        deliver(msg)
        except ValueError as e:
            self.stats.bad_frames += 1
            log.warning("closed a connection sending garbage: %s", e)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


ReplyFn = Callable[[str, Any], None]


class ClientHandler(Protocol):
    def put(self, data: bytes, reply: ReplyFn) -> None:
        """Start replicating `data`; call `reply` once, when applied or refused."""

    def status(self) -> dict[str, Any]: ...


# -- the client protocol ---------------------------------------------------------------------------


class _ClientConnection:
    """One client: reads pipelined requests, batches replies into as few writes as possible."""

    def __init__(self, stream: trio.abc.Stream, handler: ClientHandler) -> None:
        self._stream = stream
        self._handler = handler
        self._out: list[bytes] = []
        self._wakeup = trio.Event()
        self._closed = False

    def _send(self, obj: Any) -> None:
        if self._closed:
            return
        self._out.append(msgpack.packb(obj))
        self._wakeup.set()

    def _reply_to(self, rid: int) -> ReplyFn:
        return lambda code, value: self._send([rid, code, value])

    async def serve(self) -> None:
        """Serve until the client goes away or sends garbage; never raises."""
        try:
            async with self._stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, nursery.cancel_scope)
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True

    async def _reader(self) -> None:
        unpacker = msgpack.Unpacker(max_buffer_size=1 << 24)
        try:
            while True:
                data = await self._stream.receive_some(1 << 16)
                if not data:
                    return
                unpacker.feed(data)
                for req in unpacker:
                    self._dispatch(req)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except (ValueError, msgpack.UnpackException) as e:
            log.warning("closed a client connection that sent something other than msgpack: %r", e)

    def _dispatch(self, req: Any) -> None:
        if not isinstance(req, list) or len(req) < 2 or not isinstance(req[0], int):
            self._send([-1, "err", "a request is [rid, op, ...]"])
            return
        rid, op = req[0], req[1]
        if op == "put" and len(req) == 3 and isinstance(req[2], bytes):
            self._handler.put(req[2], self._reply_to(rid))
        elif op == "status":
            self._send([rid, "ok", self._handler.status()])
        else:
            self._send([rid, "err", f"unknown request {op!r}"])

    async def _writer(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                if not self._out:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                batch = b"".join(self._out)
                self._out.clear()
                await self._stream.send_all(batch)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


async def serve_clients(listener: trio.SocketListener, handler: ClientHandler) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        await _ClientConnection(stream, handler).serve()

    await trio.serve_listeners(serve, [listener])


# -- process plumbing shared with _pysyncobj_node.py -------------------------------------------


async def handshake(raft_port: int, client_port: int) -> dict[int, tuple[str, int]]:
    """Report our ports on stdout, read the cluster's raft addresses from stdin."""
    print(json.dumps({"raft_port": raft_port, "client_port": client_port}), flush=True)
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    if not line:
        raise SystemExit("stdin closed before the peer list arrived")
    peers = json.loads(line)["peers"]
    return {int(k): (str(v[0]), int(v[1])) for k, v in peers.items()}


async def exit_when_stdin_closes(cancel: Callable[[], None]) -> None:
    """The parent holds our stdin; when it goes away (exit or kill), so do we."""
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
    cancel()


def node_arguments(
    description: str, extra: Sequence[tuple[str, type, Any, str]] = ()
) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    for flag, kind, default, help_text in extra:
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help_text)
        else:
            p.add_argument(flag, type=kind, default=default, help=help_text)
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--raft-port", type=int, default=0)
    p.add_argument("--client-port", type=int, default=0)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--profile", default="", help="write a cProfile dump here at exit")
    args = p.parse_args()
    logging.basicConfig(
        level=args.log_level,
        format=f"node{args.id} %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args


def run_profiled(main: Callable[[], Awaitable[None]], profile_path: str) -> None:
    """trio.run(main), under cProfile when a path is given (the dump is written on SIGTERM)."""
    if not profile_path:
        trio.run(main)
        return
    import cProfile
    import signal

    prof = cProfile.Profile()

    def dump(*_: object) -> None:
        prof.disable()
        prof.dump_stats(profile_path)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    prof.enable()
    try:
        trio.run(main)
    finally:
        dump()
