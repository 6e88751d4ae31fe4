"""Host↔host links: one per connected peer, carrying gossip, pubsub envelopes and leases.

Either side of a host↔host connection holds the other side's `PeerLinkCapability`. A `Link`
is our end: a bounded outbox of envelopes sent in batches, and a heartbeat loop that sends our
view every interval. The link ends when its connection closes or a call on it fails.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from ww.host.caps import AnchorCapability
from ww.host.lease import Lease
from ww.host.paths import AnchorPathError, parse_path
from ww.host.pubsub import Envelope
from ww.rpc import Capability, CapabilityError, Ref

if TYPE_CHECKING:
    from ww.host.node import Host

log = logging.getLogger("ww.host")

OUTBOX = 4096
BATCH = 256


class PeerLinkCapability(Capability):
    """What a linked host may ask of this one."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.link: Link | None = None

    async def _on_release(self) -> None:
        if self.link is not None:
            self.link.close()

    async def gossip(self, records: list[Any]) -> None:
        self._host.on_gossip(records)

    async def deliver(self, envelopes: list[Any]) -> None:
        self._host.on_deliver(envelopes, self.link.peer if self.link else None)

    async def leave(self) -> None:
        """The linked host is stopping: it leaves the view now, not after its TTL."""
        if self.link is not None:
            self._host.on_leave(self.link.peer)

    async def lease(self) -> RemoteLeaseCapability:
        """A lease on this host held for one client of the linked host."""
        name = f"client of {self.link.peer if self.link else 'a peer'}"
        return RemoteLeaseCapability(self._host, Lease(name))


class RemoteLeaseCapability(Capability):
    """Anchors held on this host for a client of another host; gone when released."""

    def __init__(self, host: Host, lease: Lease) -> None:
        self._host = host
        self._lease = lease

    async def _on_release(self) -> None:
        self._lease.end()

    async def anchor(self, path: str) -> AnchorCapability:
        try:
            parts = parse_path(path)
        except AnchorPathError as e:
            raise CapabilityError(str(e)) from None
        if not parts or parts[0] != self._host.peer_id:
            raise CapabilityError(f"{path} is not under this host, /{self._host.peer_id}")
        return AnchorCapability(self._host, parts, self._lease)


class Link:
    """Our end of a link to `peer`: `ref` is the peer's PeerLinkCapability."""

    def __init__(self, host: Host, peer: str, ref: Ref, local: PeerLinkCapability) -> None:
        self.host = host
        self.peer = peer
        self.ref = ref
        self.local = local
        local.link = self
        self.dropped = 0
        self.remote_leases: dict[int, Ref] = {}  # local lease id -> the peer's RemoteLease
        self._closed = trio.Event()
        self._out_send, self._out_recv = trio.open_memory_channel[Envelope](OUTBOX)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, env: Envelope) -> None:
        """Queue an envelope; a link that falls this far behind loses it (logged)."""
        try:
            self._out_send.send_nowait(env)
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("link to %s is behind; dropped %d messages", self.peer, self.dropped)
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        """End the link; the leases held through it die with its connection."""
        self._closed.set()
        self._out_send.close()
        self.remote_leases.clear()

    async def run(self) -> None:
        """Send envelopes and heartbeats until the link closes; never raises."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_loop)
            nursery.start_soon(self._heartbeat_loop)
            await self._closed.wait()
            nursery.cancel_scope.cancel()

    async def _deliver_loop(self) -> None:
        async for env in self._out_recv:
            batch = [env.to_wire()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._out_recv.receive_nowait().to_wire())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if not await self._call("deliver", batch):
                return

    async def _heartbeat_loop(self) -> None:
        interval = self.host.config.heartbeat_interval
        while True:
            with trio.move_on_after(self.host.config.ttl):
                if not await self._call("gossip", self.host.gossip()):
                    return
            await trio.sleep(interval)

    async def _call(self, method: str, *args: Any) -> bool:
        """Call the peer; on failure log and close the link. False when the link is done."""
        try:
            await self.ref.call(method, *args)
        except Exception as e:
            log.info("link to %s closed: %s failed: %s", self.peer, method, e)
            self.close()
            return False
        return True
