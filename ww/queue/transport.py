"""Raft messages between replicas, over ww capabilities.

Each replica hangs a `RaftRpc` capability at `/<peer id>/<group>/rpc`. A replica reaches a
peer's by walking that anchor, over a connection of its own to the peer's host (`ww.dial`, one
hop less than relaying through its own host) or, with `direct=False`, through its own host.

`WwTransport.send(messages)` never blocks the Raft loop: it encodes each message and queues it
for its peer. One task per peer pushes the queue, a batch (a list of encoded messages) at a
time, into the peer's `messages` sink. A snapshot whose data is a marker naming a file
(`ww.queue.snapshots`) goes through the sink `snapshot_file`: the message, then the file read
in chunks; the receiver writes the file into its own volume, checks its size and digest,
fsyncs it and only then hands the message to Raft. Any other message over `chunk_size` (or a
snapshot held in memory) goes through the sink `snapshot` in chunks (`split_frame`). The
leader hears whether a snapshot arrived (`report_snapshot`). When a peer cannot be reached,
or its sink fails, what is queued for it is dropped (Raft sends again), Raft is told once per
outage (`report_unreachable`) and the task connects again after a backoff.

Raft node ids are derived from peer ids (`node_id_of`), so a replica finds the host of any
member in the cluster view.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ww.dial import dial
from ww.queue.client import load_at
from ww.queue.snapshots import Marker, Receiver, SnapshotFileError, SnapshotFiles, read_chunks
from ww.raft.driver import FrameAssembler, split_frame
from ww.raft.types import Message, MessageDecodeError, MessageType
from ww.rpc import Capability, sink

logger = logging.getLogger(__name__)

__all__ = ["RaftRpc", "TransportStats", "WwTransport", "node_id_of"]

MAX_SNAPSHOT = 1 << 34
"""The largest snapshot a replica accepts (16 GiB)."""


def node_id_of(peer: str) -> int:
    """The Raft node id of the replica on host `peer`: the first 8 bytes of sha256(peer id)
    as a positive 63-bit int (never 0, which Raft reserves for "no node")."""
    digest = hashlib.sha256(peer.encode()).digest()
    return (int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)) or 1


@dataclass(slots=True)
class TransportStats:
    sent: int = 0
    received: int = 0
    batches: int = 0
    snapshots_sent: int = 0
    snapshots_received: int = 0
    dropped: int = 0
    bad_input: int = 0
    connects: int = 0


class RaftRpc(Capability):
    """The `rpc` anchor of a replica: peers push encoded Raft messages into it.

    `deliver` takes one encoded message (the driver's `step_encoded`, which drops what does not
    decode). A batch that is not a list of bytes is dropped and counted, never raised on.
    """

    def __init__(
        self,
        deliver: Callable[[bytes], None],
        stats: TransportStats,
        files: SnapshotFiles | None = None,
    ) -> None:
        self._deliver = deliver
        self._stats = stats
        self._files = files

    @sink
    async def messages(self, batches: AsyncIterator[Any], sender: int) -> None:
        async for batch in batches:
            self._take(batch)

    def _messages_nowait(self, batch: Any, sender: int) -> bool:
        self._take(batch)
        return True

    def _take(self, batch: Any) -> None:
        if not isinstance(batch, list):
            self._stats.bad_input += 1
            logger.warning("dropped a raft batch that is not a list")
            return
        for data in batch:
            if isinstance(data, bytes):
                self._stats.received += 1
                self._deliver(data)
            else:
                self._stats.bad_input += 1
                logger.warning("dropped a raft message that is not bytes")

    @sink
    async def snapshot(self, chunks: AsyncIterator[Any], sender: int) -> bool:
        """One large message in chunks; True once it arrived whole and was handed on."""
        assembler = FrameAssembler(max_size=MAX_SNAPSHOT)
        delivered = False
        async for chunk in chunks:
            if delivered:
                continue
            try:
                if not isinstance(chunk, bytes):
                    raise ValueError("a chunk is not bytes")
                data = assembler.feed(chunk)
            except ValueError as e:
                self._stats.bad_input += 1
                logger.warning("dropped a chunked raft message: %s", e)
                return False
            if data is not None:
                self._stats.snapshots_received += 1
                self._deliver(data)
                delivered = True
        return delivered

    @sink
    async def snapshot_file(self, chunks: AsyncIterator[Any], sender: int) -> bool:
        """A snapshot message whose data is a file marker, the file in chunks, then a trailer
        `{"size": N, "sha256": DIGEST}`; True once the file is whole, checked and durable here
        and the message was handed on."""
        receiver: Receiver | None = None
        message: bytes | None = None
        try:
            async for chunk in chunks:
                if isinstance(chunk, dict) and receiver is not None:
                    size, digest = chunk.get("size"), chunk.get("sha256")
                    if not isinstance(size, int) or not isinstance(digest, bytes):
                        raise SnapshotFileError("malformed snapshot trailer")
                    await trio.to_thread.run_sync(receiver.finish, size, digest)
                    break
                if not isinstance(chunk, bytes):
                    raise SnapshotFileError("a chunk is not bytes")
                if receiver is None:
                    message = chunk
                    receiver = self._receiver(chunk)
                else:
                    receiver.write(chunk)
                    if receiver.size > MAX_SNAPSHOT:
                        raise SnapshotFileError(f"snapshot over {MAX_SNAPSHOT} bytes")
            if receiver is None or message is None or not receiver.done:
                raise SnapshotFileError("the snapshot stream ended early")
        except (SnapshotFileError, OSError) as e:
            self._stats.bad_input += 1
            logger.warning("dropped a snapshot from node %s: %s", sender, e)
            return False
        finally:
            if receiver is not None and not receiver.done:
                receiver.abort()  # refused, cancelled, or the stream broke
        self._stats.snapshots_received += 1
        self._deliver(message)
        return True

    def _receiver(self, data: bytes) -> Receiver:
        if self._files is None:
            raise SnapshotFileError("this replica takes no snapshot files")
        try:
            message = Message.decode(data)
        except MessageDecodeError as e:
            raise SnapshotFileError(str(e)) from None
        if message.type != MessageType.SNAP or message.snapshot is None:
            raise SnapshotFileError(f"expected a snapshot message, got {message.type.name}")
        return self._files.receiver(Marker.decode(message.snapshot.data))


@dataclass(slots=True)
class _Peer:
    node_id: int
    queue: deque[bytes] = field(default_factory=deque)
    large: deque[tuple[bytes, bool]] = field(default_factory=deque)  # (data, is a snapshot)
    wakeup: trio.Event = field(default_factory=trio.Event)
    large_wakeup: trio.Event = field(default_factory=trio.Event)
    reachable: bool = True


class WwTransport:
    """A `ww.raft.driver.Transport` over ww capabilities.

    `peers` maps node ids to peer ids (update it with `set_peers` as the cluster view changes);
    `on_unreachable(node_id)` and `on_snapshot(node_id, ok)` are the driver's
    `report_unreachable` and `report_snapshot`.
    """

    def __init__(
        self,
        host: Any,
        group: str,
        node_id: int,
        *,
        on_unreachable: Callable[[int], None],
        on_snapshot: Callable[[int, bool], None],
        direct: bool = True,
        queue_limit: int = 8192,
        window: int = 64,
        batch_bytes: int = 1 << 20,
        chunk_size: int = 1 << 20,
        files: SnapshotFiles | None = None,
    ) -> None:
        self._host = host
        self._files = files
        self._group = group.strip("/")
        self.node_id = node_id
        self._on_unreachable = on_unreachable
        self._on_snapshot = on_snapshot
        self._direct = direct
        self._queue_limit = queue_limit
        self._window = window
        self._batch_bytes = batch_bytes
        self._chunk_size = chunk_size
        self._peer_ids: dict[int, str] = {}
        self._peers: dict[int, _Peer] = {}
        self._nursery: trio.Nursery | None = None
        self.stats = TransportStats()

    def set_peers(self, peers: dict[int, str]) -> None:
        """Where each node lives: node id -> peer id (this node's own entry is ignored)."""
        self._peer_ids = {n: p for n, p in peers.items() if n != self.node_id}

    def peer_of(self, node_id: int) -> str | None:
        return self._peer_ids.get(node_id)

    # -- outbound ---------------------------------------------------------------------------

    def send(self, messages: Sequence[Message] | Iterable[Message]) -> None:
        """Queue messages for their peers; never blocks. Messages to a node that is not in the
        peer map, or beyond a full queue, are dropped (Raft sends again)."""
        for m in messages:
            peer = self._peer(m.to)
            if peer is None:
                self.stats.dropped += 1
                if m.type == MessageType.SNAP:
                    self._on_snapshot(m.to, False)
                continue
            data = m.encode()
            if m.type == MessageType.SNAP or len(data) > self._chunk_size:
                peer.large.append((data, m.type == MessageType.SNAP))
                peer.large_wakeup.set()
            elif len(peer.queue) >= self._queue_limit:
                self.stats.dropped += 1
            else:
                peer.queue.append(data)
                peer.wakeup.set()

    def _peer(self, node_id: int) -> _Peer | None:
        peer = self._peers.get(node_id)
        if peer is None:
            if node_id not in self._peer_ids or self._nursery is None:
                return None
            peer = self._peers[node_id] = _Peer(node_id)
            self._nursery.start_soon(self._run_peer, peer)
        return peer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the per-peer senders until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _run_peer(self, peer: _Peer) -> None:
        backoff = 0.05
        while True:
            try:
                async with self._connect(peer.node_id) as rpc:
                    self.stats.connects += 1
                    peer.reachable = True
                    backoff = 0.05
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._push_large, peer, rpc)
                        await self._push_messages(peer, rpc)
            except Exception as e:  # the peer or its host is gone, or not there yet
                logger.debug("raft peer %d: %s", peer.node_id, e)
            self._drop_queued(peer)
            if peer.reachable:
                peer.reachable = False
                self._on_unreachable(peer.node_id)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _drop_queued(self, peer: _Peer) -> None:
        self.stats.dropped += len(peer.queue) + len(peer.large)
        peer.queue.clear()
        for _, is_snapshot in peer.large:
            if is_snapshot:
                self._on_snapshot(peer.node_id, False)
        peer.large.clear()

    @asynccontextmanager
    async def _connect(self, node_id: int) -> AsyncIterator[Any]:
        """The peer's `rpc` capability, for the block."""
        peer_id = self._peer_ids.get(node_id)
        if peer_id is None:
            raise LookupError(f"node {node_id} is not in the cluster view")
        path = f"/{peer_id}/{self._group}/rpc"
        if self._direct:
            async with dial(self._host, peer_id) as far:
                yield await load_at(await far.root(), path)
        else:
            yield await load_at(await self._host.root(), path)

    async def _push_messages(self, peer: _Peer, rpc: Any) -> None:
        async with rpc.sink("messages", self.node_id, window=self._window) as tx:
            while True:
                if not peer.queue:
                    peer.wakeup = trio.Event()
                    await peer.wakeup.wait()
                batch: list[bytes] = []
                size = 0
                while peer.queue and size < self._batch_bytes:
                    data = peer.queue.popleft()
                    batch.append(data)
                    size += len(data)
                await tx.send(batch)
                self.stats.sent += len(batch)
                self.stats.batches += 1

    async def _push_large(self, peer: _Peer, rpc: Any) -> None:
        while True:
            if not peer.large:
                peer.large_wakeup = trio.Event()
                await peer.large_wakeup.wait()
            data, is_snapshot = peer.large[0]
            delivered = False
            try:
                marker = self._marker(data) if is_snapshot else None
                if marker is not None:
                    delivered = await self._push_file(rpc, data, marker)
                else:
                    async with rpc.sink("snapshot", self.node_id, window=8) as tx:
                        for chunk in split_frame(data, self._chunk_size):
                            await tx.send(chunk)
                    delivered = bool(tx.result)
            finally:
                peer.large.popleft()
                if is_snapshot:
                    self._on_snapshot(peer.node_id, delivered)
            if is_snapshot and delivered:
                self.stats.snapshots_sent += 1

    def _marker(self, data: bytes) -> Marker | None:
        """The file marker of an encoded snapshot message, if this transport sends files."""
        if self._files is None:
            return None
        snapshot = Message.decode(data).snapshot
        if snapshot is None:
            return None
        try:
            return Marker.decode(snapshot.data)
        except SnapshotFileError:
            return None

    async def _push_file(self, rpc: Any, message: bytes, marker: Marker) -> bool:
        """Send the snapshot message, its file in chunks (never the whole file at once), then
        the file's size and digest. The file is written from the database first if need be."""
        assert self._files is not None
        try:
            path = await trio.to_thread.run_sync(self._files.ensure, marker)
            chunks = read_chunks(path, self._chunk_size)
        except (OSError, SnapshotFileError) as e:  # a newer snapshot replaced it, or no room
            logger.info("snapshot file %s cannot be sent: %s", marker.file, e)
            return False
        try:
            async with rpc.sink("snapshot_file", self.node_id, window=8) as tx:
                await tx.send(message)
                while isinstance(chunk := await trio.to_thread.run_sync(_next, chunks), bytes):
                    await tx.send(chunk)
                size, digest = chunk
                await tx.send({"size": size, "sha256": digest})
            return bool(tx.result)
        finally:
            chunks.close()


def _next(chunks: Generator[bytes, None, tuple[int, bytes]]) -> bytes | tuple[int, bytes]:
    """The next chunk, or what the generator returns at its end."""
    try:
        return next(chunks)
    except StopIteration as end:
        result: tuple[int, bytes] = end.value
        return result
