"""The queue's client: one library for the Raft ROM's commands, worker ROMs and the crawler.

    client = await QueueClient.connect(host)            # host: any Host capability
    await client.put("urls", [Item(b"https://example.org/", key="https://example.org/")])
    for item in await client.claim("urls", "worker-1", max_items=10, lease=30):
        ...
    await client.complete("worker-1", [item.id], append={"pages": [b"..."]})
    await client.aclose()

It finds the replicas of the group by walking `/<peer>/<group>/request` for the hosts in the
cluster view, sends each request to the leader (following "not leader" answers), and lets
many requests be in flight at once: each call is independent.

Once a replica answered through `host`, the client dials that replica's host (`ww.dial`) and
reaches the replica over that connection of its own from then on, kept open for every call
until `aclose()`: a request is then not relayed by the client's host as well (one process
hop less each way). Where it cannot dial (a ROM without the `net.connect` permission, a host
address this process cannot reach) it goes on through `host`, as it does for every call
with `direct=False`. Losing that connection is losing the replica: the client forgets it,
finds it again and retries.

Every write carries this client's id and a sequence number; a request that got no answer
(the leader changed, timed out, its host went away) is sent again with the same id and
number, so the state machine applies it once and answers the retry with its first answer.
`ack` tells the state machine which answers the client has, so it can forget them.

An answer with "error" raises `QueueError` (one line); a request that no leader answered
within `timeout` seconds raises it too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ww.dial import dial
from ww.queue.commands import (
    GROUP,
    Claimed,
    Command,
    Item,
    Query,
    claimed_from_answer,
    encode,
)
from ww.rpc import CapabilityError, Connection, ConnectionLost, RemoteError

logger = logging.getLogger(__name__)

__all__ = ["Claimed", "Item", "PutResult", "QueueClient", "QueueError"]

DISCOVERY_TIMEOUT = 1.0
"""How long to wait for one host's anchor when looking for the replicas."""

ADMIN_TIMEOUT = 120.0
"""How long `add`, `remove` and `transfer` may take: an `add` waits on the leader until the
new replica has caught up (`ReplicaOptions.catch_up_timeout`, 60 s), which for a large state
means copying the database and sending it."""

DIAL_TIMEOUT = 5.0
"""How long a connection of the client's own to a replica's host may take to open."""

_GONE = (RemoteError, ConnectionLost, CapabilityError, OSError)
"""What a call on a replica raises when the replica, its host or the way there is gone."""


class QueueError(Exception):
    """A refused request, or one that no leader answered in time. `answer` is the replica's
    answer when there was one (e.g. `{"error": ..., "lost": [ids]}` of a refused complete)."""

    def __init__(self, message: str, answer: Mapping[str, Any] | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.answer = dict(answer) if answer is not None else {}


@dataclass(slots=True, frozen=True)
class PutResult:
    added: int
    duplicates: int


@dataclass(slots=True, eq=False)
class _Link:
    """A connection of the client's own to one host, held open by a task of its own."""

    root: Any = None
    """The far host's root anchor while the connection is open."""
    connection: Connection | None = None
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class QueueClient:
    """A client of one replica group. Make it with `await QueueClient.connect(host)`."""

    def __init__(
        self,
        host: Any,
        group: str = GROUP,
        *,
        client_id: str | None = None,
        timeout: float = 30.0,
        attempt_timeout: float = 10.0,
        direct: bool = True,
    ) -> None:
        self._host = host
        self._direct = direct
        self._links: dict[str, _Link] = {}  # peer id -> connection to its host
        self._home: str | None = None  # the peer id of `host` (never dialed: it is there)
        self.group = group.strip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self._replicas: dict[str, Any] = {}  # peer id -> `request` Ref
        self._leader: str | None = None
        self._seq = 0
        self._outstanding: set[int] = set()

    @classmethod
    async def connect(
        cls,
        host: Any,
        group: str = GROUP,
        *,
        client_id: str | None = None,
        timeout: float = 30.0,
        direct: bool = True,
    ) -> QueueClient:
        """A client of the group `group` (a path below each host, e.g. "raft/v1") found
        through `host`, reaching each replica over a connection of its own to the replica's
        host (`direct=False`: through `host`). Raises QueueError when no replica is found."""
        client = cls(host, group, client_id=client_id, timeout=timeout, direct=direct)
        try:
            await client._discover()
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        if not client._replicas:
            await client.aclose()
            raise QueueError(
                f"no replica of {client.group} found in the cluster; "
                "start one with `ww run roms/raft start`"
            )
        return client

    async def aclose(self) -> None:
        """Release the replicas and close the connections of the client's own."""
        self._direct = False  # a call still running opens no new connection
        replicas, self._replicas = self._replicas, {}
        for ref in replicas.values():
            with contextlib.suppress(*_GONE):
                await ref.release()
        links, self._links = self._links, {}
        for link in links.values():
            link.scope.cancel()
        for link in links.values():
            await link.done.wait()

    def dialed(self) -> dict[str, Connection]:
        """The open connections of the client's own, by the peer id of the host at the far
        end: the replicas on those hosts are reached over them."""
        return {
            peer: link.connection
            for peer, link in self._links.items()
            if link.connection is not None and link.root is not None
        }

    async def __aenter__(self) -> QueueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the queue --------------------------------------------------------------------------

    async def create(
        self,
        topic: str,
        kind: str = "work",
        max_attempts: int = 5,
        dead_letter: str | None = None,
    ) -> bool:
        """Create a topic ("work" or "log"); False when it existed already."""
        answer = await self._write(Command.create(topic, kind, max_attempts, dead_letter))
        return bool(answer.get("created"))

    async def put(self, topic: str, items: Sequence[Item]) -> PutResult:
        answer = await self._write(Command.put(topic, items))
        return PutResult(answer["added"], answer["duplicates"])

    async def claim(
        self, topic: str, consumer: str, max_items: int = 1, lease: float = 30.0
    ) -> list[Claimed]:
        answer = await self._write(Command.claim(topic, consumer, max_items, lease))
        return claimed_from_answer(answer)

    async def complete(
        self,
        consumer: str,
        ids: Sequence[int],
        append: Mapping[str, Sequence[bytes]] | None = None,
        put: Mapping[str, Sequence[Item]] | None = None,
    ) -> dict[str, Any]:
        """Acknowledge leases, append results and put new items, all or nothing."""
        return await self._write(Command.complete(consumer, ids, append, put))

    async def release(self, consumer: str, ids: Sequence[int], delay: float = 0.0) -> int:
        answer = await self._write(Command.release(consumer, ids, delay))
        return int(answer.get("released", 0))

    async def limit(
        self,
        topic: str,
        partition: str | None,
        max_leased: int | None,
        min_interval: float = 0.0,
    ) -> None:
        await self._write(Command.limit(topic, partition, max_leased, min_interval))

    async def append(self, topic: str, records: Sequence[bytes]) -> int:
        """Append records to a log topic; returns the offset of the first."""
        answer = await self._write(Command.append(topic, records))
        return int(answer["first"])

    async def trim(self, topic: str, offset: int) -> int:
        answer = await self._write(Command.trim(topic, offset))
        return int(answer.get("trimmed", 0))

    async def set_cursor(self, topic: str, consumer: str, offset: int) -> None:
        await self._write(Command.cursor(topic, consumer, offset))

    async def cursor(self, topic: str, consumer: str) -> int:
        answer = await self._query(Query.cursor_get(topic, consumer))
        return int(answer["offset"])

    async def read(self, topic: str, offset: int, n: int) -> list[tuple[int, bytes]]:
        answer = await self._query(Query.read(topic, offset, n))
        return [(int(o), bytes(r)) for o, r in answer["records"]]

    async def stats(self, topic: str) -> dict[str, Any]:
        return await self._query(Query.stats(topic))

    async def topics(self) -> list[str]:
        return list((await self._query(Query.topics()))["topics"])

    async def follow(self, topic: str, offset: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        """Records of log topic `topic` from `offset` on, as they commit; goes on (from where
        it was) on another replica when the one it reads from goes away."""
        deadline = trio.current_time() + self.timeout
        while True:
            peer = self._leader or await self._any_peer(deadline)
            try:
                response = await self._anchor(peer, "response")
                async with response.stream("follow", topic, offset, window=256) as records:
                    async for off, record in records:
                        offset = int(off) + 1
                        deadline = trio.current_time() + self.timeout
                        yield int(off), bytes(record)
            except RemoteError as e:
                if e.type in ("CapabilityError", "ValueError"):
                    raise QueueError(e.message) from None
                self._forget(peer)
            except _GONE:
                self._forget(peer)
            await self._pause(deadline, "no replica to follow")

    # -- the group --------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The leader's status (members, leader, term, commit, applied), with "replicas": each
        reachable replica's own status and its lag (the leader's commit minus its applied)."""
        await self._discover()
        replicas: dict[str, dict[str, Any]] = {}
        for peer, ref in list(self._replicas.items()):
            try:
                with trio.fail_after(self.attempt_timeout):
                    replicas[peer] = await ref.status()
            except (*_GONE, trio.TooSlowError) as e:
                replicas[peer] = {"error": str(e) or type(e).__name__}
                self._forget(peer)
        leaders = [s for s in replicas.values() if s.get("role") == "leader"]
        leader = max(leaders, key=lambda s: s["term"]) if leaders else None
        out: dict[str, Any] = dict(leader) if leader else {"leader": None}
        for s in replicas.values():
            if "applied" in s and leader is not None:
                s["lag"] = max(0, leader["commit"] - s["applied"])
        out["replicas"] = replicas
        if leader is not None:
            self._leader = leader["peer"]
        return out

    async def add(self, peer: str) -> dict[str, Any]:
        """Make the replica started on `peer` (without voters) a voter of the group."""
        return await self._admin("add", peer)

    async def remove(self, peer: str) -> dict[str, Any]:
        return await self._admin("remove", peer)

    async def transfer(self, peer: str) -> dict[str, Any]:
        return await self._admin("transfer", peer)

    async def stop_replica(self, peer: str) -> None:
        """Ask the replica on `peer` to exit (normally, so its host does not restart it)."""
        ref = await self._anchor(peer, "request")
        with contextlib.suppress(ConnectionLost):
            await ref.stop()

    # -- requests ---------------------------------------------------------------------------

    async def _write(self, command: Command) -> dict[str, Any]:
        self._seq += 1
        seq = self._seq
        self._outstanding.add(seq)
        ack = min(self._outstanding) - 1
        try:
            return await self._send(
                "submit", command.encode(client=self.client_id, seq=seq, ack=ack)
            )
        finally:
            self._outstanding.discard(seq)

    async def _query(self, query: dict[str, Any]) -> dict[str, Any]:
        return await self._send("query", encode(query))

    async def _admin(self, method: str, peer: str) -> dict[str, Any]:
        await self._discover()
        return await self._send(method, peer, ADMIN_TIMEOUT)

    async def _send(self, method: str, arg: Any, timeout: float | None = None) -> dict[str, Any]:
        """Call `method(arg)` on the leader until it answers; retried requests are the same.
        Each attempt may take `timeout` seconds, all of them together as much or `self.timeout`
        (default: `attempt_timeout` and `self.timeout`)."""
        attempt_timeout = self.attempt_timeout if timeout is None else timeout
        deadline = trio.current_time() + max(self.timeout, timeout or 0.0)
        last = "no replica answered"
        while True:
            peer = self._leader or await self._any_peer(deadline)
            try:
                ref = await self._anchor(peer, "request")
                with trio.fail_after(
                    min(attempt_timeout, max(deadline - trio.current_time(), 0.01))
                ):
                    answer = await ref.call(method, arg)
            except (*_GONE, trio.TooSlowError) as e:
                last = f"{peer}: {e or type(e).__name__}"
                self._forget(peer)
            else:
                if not isinstance(answer, dict):
                    raise QueueError(f"{method}: unexpected answer {answer!r:.100}")
                error = answer.get("error")
                if error is None:
                    self._leader = peer
                    return answer
                if error == "not leader":
                    leader = answer.get("leader")
                    self._leader = leader if isinstance(leader, str) and leader != peer else None
                    last = f"{peer} is not the leader"
                    if self._leader is not None and trio.current_time() < deadline:
                        continue
                elif answer.get("retry"):
                    last = f"{peer}: {error}"
                else:
                    raise QueueError(str(error), answer)
            await self._pause(deadline, last)

    async def _pause(self, deadline: float, last: str) -> None:
        if trio.current_time() >= deadline:
            raise QueueError(
                f"no leader of {self.group} answered in time ({last}); "
                "see `ww run roms/raft status`"
            )
        await trio.sleep(min(0.05, max(deadline - trio.current_time(), 0)))

    async def _any_peer(self, deadline: float) -> str:
        while True:
            if not self._replicas:
                try:
                    await self._discover()
                except _GONE as e:
                    logger.debug("discovery failed: %s", e)
            if self._replicas:
                # Rotate, so a retry after a failure tries another replica.
                peer = next(iter(self._replicas))
                self._replicas[peer] = self._replicas.pop(peer)
                return peer
            await self._pause(deadline, "no replica found")

    async def _discover(self) -> None:
        """Find the replicas: `/<peer>/<group>/request` for the hosts in the view."""
        root = await self._host.root()
        peers = await root.ls()
        if self._home is None:
            self._home = await self._host.id()

        async def look(peer: str) -> None:
            # A host killed a moment ago is still in the view; do not wait long for it.
            with contextlib.suppress(*_GONE), trio.move_on_after(DISCOVERY_TIMEOUT):
                await self._anchor(peer, "request")

        async with trio.open_nursery() as nursery:
            for peer in peers:
                if peer not in self._replicas:
                    nursery.start_soon(look, peer)

    async def _anchor(self, peer: str, name: str) -> Any:
        """The capability at `/<peer>/<group>/<name>` (cached for "request"): over the
        connection of the client's own to `peer`'s host when it is open, else through the
        client's host (and then, once a replica answered there, that connection is opened)."""
        if name == "request" and peer in self._replicas:
            return self._replicas[peer]
        link = self._links.get(peer)
        if link is not None and link.root is not None:
            root = link.root
        else:
            root = await self._host.root()
        ref = await load_at(root, f"/{peer}/{self.group}/{name}")
        if name == "request":
            self._replicas[peer] = ref
            if self._direct and link is None and self._home not in (None, peer):
                link = self._links[peer] = _Link()
                trio.lowlevel.spawn_system_task(self._hold, peer, link, name=f"queue link {peer}")
        return ref

    async def _hold(self, peer: str, link: _Link) -> None:
        """Dial `peer`'s host, reach its replica over that connection from then on, and hold
        the connection open until it closes or the client closes.

        It runs as a system task, so that the connection outlives the call that opened it
        without asking the client's user for a nursery. Whatever goes wrong here only leaves
        the client going through its own host."""
        try:
            with link.scope:
                link.scope.deadline = trio.current_time() + DIAL_TIMEOUT
                async with dial(self._host, peer) as far:
                    root = await far.root()
                    ref = await load_at(root, f"/{peer}/{self.group}/request")
                    link.scope.deadline = math.inf
                    link.root, link.connection = root, far.connection
                    if peer in self._replicas:
                        self._replicas[peer] = ref
                    await far.connection.closed.wait()
                    if self._replicas.get(peer) is ref:
                        del self._replicas[peer]  # found again (and dialed again) when needed
        except Exception as e:  # it cannot be dialed, has no replica, or the connection broke
            logger.debug("connection to host %s: %s", peer, e)
        finally:
            link.root = None
            if self._links.get(peer) is link:
                del self._links[peer]
            link.done.set()

    def _forget(self, peer: str) -> None:
        self._replicas.pop(peer, None)
        if self._leader == peer:
            self._leader = None


async def load_at(root: Any, path: str) -> Any:
    """The capability stored at `path` below `root`; CapabilityError when none is."""
    anchor = await root.walk(path)
    ref = await anchor.load()
    if ref is None or isinstance(ref, bytes):
        raise CapabilityError(f"no replica at {path}")
    return ref
