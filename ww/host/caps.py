"""The capabilities a host lends: Host, View, PubSub/Topic, Anchor, Channel, Process.

They are thin: each checks its arguments, turns bad input into a one-line `CapabilityError`,
and asks the `Host` (ww.host.node) to do the work.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ww.host.anchors import AnchorTree
from ww.host.channel import Channel, ChannelClosed
from ww.host.lease import Lease
from ww.host.paths import AnchorPathError, Parts, format_path, parse_path
from ww.host.pubsub import PubSubError, check_data, check_topic
from ww.rpc import Capability, CapabilityError, Ref, sink
from ww.rpc.capability import NOT_NOW

if TYPE_CHECKING:
    from ww.host.node import Host
    from ww.host.supervisor import Process

log = logging.getLogger("ww.host")

MAX_ANCHOR_BYTES = 1024 * 1024


class HostCapability(Capability):
    """The bootstrap of one connection or one spawned process; its lease ends on release.

    `certified_peer` is the peer id the connection's TLS certificate proves (None without TLS).
    """

    def __init__(self, host: Host, lease: Lease, certified_peer: str | None = None) -> None:
        self._host = host
        self._lease = lease
        self._certified_peer = certified_peer

    async def _on_release(self) -> None:
        self._lease.end()

    async def id(self) -> str:
        return self._host.peer_id

    async def view(self) -> ViewCapability:
        return ViewCapability(self._host)

    async def pubsub(self) -> PubSubCapability:
        return PubSubCapability(self._host)

    async def root(self) -> AnchorCapability:
        return AnchorCapability(self._host, (), self._lease)

    async def credentials(self) -> bytes | None:
        """A key and certificate to dial hosts of the cluster directly (`ww.dial.dial`),
        or None when the cluster has no key."""
        return self._host.credentials()

    async def channel(self, capacity: int = 0) -> ChannelCapability:
        try:
            return ChannelCapability(capacity)
        except ValueError as e:
            raise CapabilityError(str(e)) from None

    async def spawn(
        self,
        rom: bytes | str,
        args: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        volume: bool = False,
        restart: str = "no",
    ) -> ProcessCapability:
        """Run a ROM (its bytes, or the content id of one this host has cached) in a child
        process. `limits`: {"memory": bytes, "cpu_seconds": seconds}, both optional;
        `restart`: "no", "on-failure" or "always". A volume needs an anchor (Anchor.spawn)."""
        process = await self._host.spawn(
            rom,
            _check_args(args),
            _check_limits(limits),
            volume=_check_flag(volume),
            restart=restart,
        )
        return ProcessCapability(process)

    async def ps(self) -> list[dict[str, Any]]:
        """One row per process (a restarted one under the pid of its current run)."""
        return [process.info() for process in self._host.processes()]

    async def kill(self, pid: int) -> None:
        """Stop the process whose current run is `pid`: it is not restarted."""
        self._host.process(pid).kill()

    async def volumes(self) -> list[dict[str, Any]]:
        """This host's volumes: {"anchor", "path", "size", "pid"} (pid None when unused)."""
        return self._host.list_volumes()

    async def remove_volume(self, anchor: str) -> None:
        """Delete the volume of `anchor` (`/<peer id>/...`); refused while a process holds it."""
        self._host.remove_volume(anchor)

    async def logs(self, pid: int) -> bytes:
        return self._host.process(pid).logs()

    async def follow_logs(self, pid: int) -> AsyncIterator[bytes]:
        """A stream: the tail `logs` returns, then the output as the process writes it, until
        it has exited. A slow reader skips to the newest output; it never holds up the
        process."""
        async with contextlib.aclosing(self._host.process(pid).follow_logs()) as pieces:
            async for data in pieces:
                yield data

    async def stats(self) -> dict[str, int]:
        """Counters for operators and tests: connections, exports, anchors, links, ..."""
        return self._host.stats()

    async def peer_link(self, hello: dict[str, Any], link: Ref) -> dict[str, Any]:
        """Host↔host: the dialing host introduces itself and its PeerLink; we answer in kind."""
        return await self._host.accept_link(hello, link, self._certified_peer)


class ViewCapability(Capability):
    """The cluster view: live hosts as this host sees them."""

    def __init__(self, host: Host) -> None:
        self._host = host

    async def hosts(self) -> list[dict[str, Any]]:
        return self._host.live_hosts()


class PubSubCapability(Capability):
    def __init__(self, host: Host) -> None:
        self._host = host

    async def join(self, topic: str) -> TopicCapability:
        try:
            return TopicCapability(self._host, check_topic(topic))
        except PubSubError as e:
            raise CapabilityError(str(e)) from None


class TopicCapability(Capability):
    """One topic: publish to every subscriber in the cluster; subscribe to a stream."""

    def __init__(self, host: Host, topic: str) -> None:
        self._host = host
        self._topic = topic

    async def name(self) -> str:
        return self._topic

    async def publish(self, data: bytes) -> None:
        try:
            self._host.publish(self._topic, check_data(data))
        except PubSubError as e:
            raise CapabilityError(str(e)) from None

    async def subscribe(self) -> AsyncIterator[bytes]:
        sub = self._host.router.subscribe(self._topic)
        try:
            async for data in sub.receive:
                yield data
        finally:
            self._host.router.unsubscribe(sub)


class AnchorCapability(Capability):
    """A path in the cluster-wide tree, held for one lease.

    The root `/` lists live hosts; `/<peer id>/...` is that host's own tree. An instance here
    is either the root or a path in this host's tree: walking elsewhere returns the owning
    host's anchor, reached over the host↔host link.
    """

    def __init__(self, host: Host, parts: Parts, lease: Lease) -> None:
        self._host = host
        self._parts = parts
        self._lease = lease

    @property
    def _local(self) -> Parts:
        return self._parts[1:]

    async def path(self) -> str:
        return format_path(self._parts)

    async def ls(self) -> list[str]:
        if not self._parts:
            return [h["peer"] for h in self._host.live_hosts()]
        return self._host.tree.ls(self._local)

    async def walk(self, path: str) -> AnchorCapability | Ref:
        try:
            parts = parse_path(path, base=self._parts)
        except AnchorPathError as e:
            raise CapabilityError(str(e)) from None
        if not parts or parts[0] == self._host.peer_id:
            return AnchorCapability(self._host, parts, self._lease)
        return await self._host.remote_anchor(parts, self._lease)

    async def store(self, value: Any) -> None:
        self._check_writable()
        if isinstance(value, bytes) and len(value) > MAX_ANCHOR_BYTES:
            raise CapabilityError(f"anchor value is {len(value)} bytes; at most {MAX_ANCHOR_BYTES}")
        if value is not None and not isinstance(value, bytes | Capability | Ref):
            raise CapabilityError(f"anchors hold bytes or a capability, not {type(value).__name__}")
        _store(self._host.tree, self._local, value, self._lease)

    async def load(self) -> Any:
        if not self._parts:
            return None
        return self._host.tree.load(self._local)

    async def spawn(
        self,
        rom: bytes | str,
        args: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        volume: bool = False,
        restart: str = "no",
    ) -> ProcessCapability:
        """Spawn a ROM on this host and hang its Process here for as long as it runs (each
        run hangs it again). `volume`: give it this anchor's durable directory; `restart`:
        "no", "on-failure" or "always"."""
        self._check_writable()
        process = await self._host.spawn(
            rom,
            _check_args(args),
            _check_limits(limits),
            at=self._parts,
            volume=_check_flag(volume),
            restart=restart,
        )
        return ProcessCapability(process)

    def _check_writable(self) -> None:
        if not self._parts:
            raise CapabilityError("the root anchor lists hosts; walk to /<peer id>/NAME to store")


def _store(tree: AnchorTree, parts: Parts, value: Any, lease: Lease) -> None:
    try:
        tree.store(parts, value, lease)
    except ValueError as e:
        raise CapabilityError(str(e)) from None


class ChannelCapability(Capability):
    """A channel (ww.host.channel.Channel) lent out.

    Releasing it does not close it: a channel hung at an anchor stays usable after its maker
    drops its own reference. Closing is explicit (`close`)."""

    def __init__(self, capacity: int = 0) -> None:
        self._channel = Channel(capacity)

    async def send(self, value: Any) -> None:
        try:
            if not self._channel.send_nowait(value):
                await self._channel.send(value)
        except ChannelClosed as e:
            raise CapabilityError(str(e)) from None

    def _send_nowait(self, value: Any) -> Any:
        return None if self._channel.send_nowait(value) else NOT_NOW

    @sink
    async def send_stream(self, values: AsyncIterator[Any]) -> None:
        """Send every value the caller pushes, in order, each as `send` would: the caller
        pushes without waiting for each one, and is held back while the channel is full."""
        async for value in values:
            await self.send(value)

    def _send_stream_nowait(self, value: Any) -> bool:
        return self._channel.send_nowait(value)

    async def recv(self) -> Any:
        try:
            return await self._channel.recv()
        except ChannelClosed as e:
            raise CapabilityError(str(e)) from None

    async def close(self) -> None:
        self._channel.close()

    async def capacity(self) -> int:
        return self._channel.capacity

    async def recv_stream(self) -> AsyncIterator[Any]:
        async for value in self._channel.stream():
            yield value


class ProcessCapability(Capability):
    """A spawned ROM process."""

    def __init__(self, process: Process) -> None:
        self._record = process

    async def wait(self) -> int:
        """The exit code of its last run, once it is not restarted again."""
        return await self._record.wait()

    async def kill(self) -> None:
        """Stop it: kill the current run; it is not restarted."""
        self._record.kill()

    async def info(self) -> dict[str, Any]:
        return self._record.info()

    async def logs(self) -> bytes:
        return self._record.logs()

    async def follow_logs(self) -> AsyncIterator[bytes]:
        """A stream: `logs`, then the output as it is written, until the process has exited."""
        async with contextlib.aclosing(self._record.follow_logs()) as pieces:
            async for data in pieces:
                yield data


def _check_args(args: object) -> list[str]:
    if args is None:
        return []
    if not isinstance(args, list | tuple) or not all(isinstance(a, str) for a in args):
        raise CapabilityError("ROM arguments must be a list of strings")
    return list(args)


def _check_flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise CapabilityError(f"volume must be true or false, not {value!r}")
    return value


def _check_limits(limits: object) -> dict[str, float]:
    if limits is None:
        return {}
    if not isinstance(limits, dict) or not set(limits) <= {"memory", "cpu_seconds"}:
        raise CapabilityError('limits must be a map with "memory" and/or "cpu_seconds"')
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise CapabilityError(f"limit {name} must be a positive number, not {value!r}")
    return dict(limits)
