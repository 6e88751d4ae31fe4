"""The Raft ROM in real processes: three `ww start` hosts, `ww run roms/raft start`, a client
load, and `kill -9` of the leader's host, of a follower's host, then of all three, each host
started again on its data dir (its replica comes back by itself, from its volume)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from tests.queue.conftest import HostFactory, HostProcess, wait_for
from ww.queue.client import QueueClient, QueueError
from ww.queue.commands import Item

ROM = str(Path(__file__).resolve().parents[2] / "roms" / "raft")
TTL = 1.5


async def ww_run(host: HostProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "ww", "run", "--dial", host.address, ROM, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


class Load:
    """A producer putting keyed items and a consumer completing them into a results log."""

    def __init__(self) -> None:
        self.acked: set[str] = set()  # keys of puts that were acknowledged
        self.completed: list[str] = []  # keys whose complete was acknowledged
        self.attempts: dict[str, int] = {}  # key -> attempts of its last claim
        self.next = 0

    async def produce(self, client: QueueClient) -> None:
        while True:
            keys = [f"k{self.next + i}" for i in range(10)]
            self.next += 10
            result = await client.put("work", [Item(k.encode(), key=k) for k in keys])
            assert result.added + result.duplicates == len(keys)
            self.acked.update(keys)
            await trio.sleep(0.01)

    async def consume(self, client: QueueClient, consumer: str = "worker") -> None:
        while True:
            items = await client.claim("work", consumer, max_items=10, lease=30)
            if not items:
                await trio.sleep(0.02)
                continue
            await self.complete(client, consumer, items)

    async def complete(self, client: QueueClient, consumer: str, items: list[Any]) -> None:
        keys = [i.payload.decode() for i in items]
        self.attempts.update((k, i.attempts) for k, i in zip(keys, items, strict=True))
        append = {"results": [k.encode() for k in keys]}
        await client.complete(consumer, [i.id for i in items], append=append)
        self.completed.extend(keys)

    async def run_for(self, client: QueueClient, seconds: float) -> None:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.produce, client)
                nursery.start_soon(self.consume, client)


async def leader_of(client: QueueClient) -> str:
    status: dict[str, Any] = {}

    async def elected() -> bool:
        nonlocal status
        status = await client.status()
        return bool(status.get("leader"))

    await wait_for(elected, timeout=20)
    return str(status["leader"])


async def caught_up(client: QueueClient, peers: set[str]) -> bool:
    status = await client.status()
    replicas = status.get("replicas", {})
    return bool(status.get("leader")) and all(replicas.get(p, {}).get("lag", 1) == 0 for p in peers)


async def restart(
    factory: HostFactory, dead: HostProcess, peer_of: HostProcess | None
) -> HostProcess:
    host = await factory.start(
        name=f"{dead.name}r", data_dir=dead.data_dir, peers=[peer_of] if peer_of else [], ttl=TTL
    )
    assert host.peer == dead.peer
    return host


async def test_kill_the_leader_a_follower_then_all_three(host_factory: HostFactory) -> None:
    hosts = await host_factory.cluster(3, ttl=TTL)
    started = await ww_run(hosts[0], "start")
    assert started.returncode == 0, started.stderr.decode()
    assert b"leader" in started.stdout
    again = await ww_run(hosts[0], "start")
    assert again.returncode == 0 and b"exists already" in again.stdout
    by_peer = {h.peer: h for h in hosts}
    load = Load()

    async with hosts[0].connect() as ref:
        client = await QueueClient.connect(ref, timeout=30)
        await client.create("work", max_attempts=10)
        await client.create("results", kind="log")
        leader = await leader_of(client)
    # A consumer that dies holding leases: its items must come back.
    ghost_host = next(h for h in hosts if h.peer != leader)
    async with ghost_host.connect() as ref:
        ghost = await QueueClient.connect(ref)
        await ghost.put("work", [Item(f"g{i}".encode(), key=f"g{i}") for i in range(5)])
        load.acked.update(f"g{i}" for i in range(5))
        held = await ghost.claim("work", "ghost", max_items=5, lease=1.0)
        assert len(held) == 5

    # 1. kill -9 the leader's host while the load runs through another host.
    client_host = ghost_host
    async with client_host.connect() as ref:
        client = await QueueClient.connect(ref, timeout=30)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run_for, client, 3.0)
            await trio.sleep(1.0)
            by_peer[leader].kill()
            new_leader = await leader_of(client)
            assert new_leader != leader
        by_peer[leader] = await restart(host_factory, by_peer[leader], client_host)
        await wait_for(lambda: caught_up(client, set(by_peer)), timeout=30)

        # 2. kill -9 a follower's host (not the one the client uses).
        leader = await leader_of(client)
        follower = next(p for p in by_peer if p not in (leader, client_host.peer))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run_for, client, 2.0)
            await trio.sleep(0.7)
            by_peer[follower].kill()
        by_peer[follower] = await restart(host_factory, by_peer[follower], client_host)
        await wait_for(lambda: caught_up(client, set(by_peer)), timeout=30)

        # 3. kill -9 all three, then start them again on their data dirs.
        await load.run_for(client, 1.0)
        for h in by_peer.values():
            h.kill()
    first: HostProcess | None = None
    for peer, dead in list(by_peer.items()):
        await dead.process.wait()
        by_peer[peer] = await restart(host_factory, dead, first)
        first = first or by_peer[peer]
    assert first is not None

    async with first.connect() as ref:
        client = await QueueClient.connect(ref, timeout=30)
        await wait_for(lambda: caught_up(client, set(by_peer)), timeout=30)
        # Drain: every acknowledged put is there, the ghost's leases came back.
        while True:
            items = await client.claim("work", "final", max_items=100, lease=30)
            if not items:
                stats = await client.stats("work")
                if stats["ready"] == 0 and stats["leased"] == 0 and stats["delayed"] == 0:
                    break
                await trio.sleep(0.2)
                continue
            await load.complete(client, "final", items)
        ghosts = [f"g{i}" for i in range(5)]
        assert all(load.attempts[g] >= 2 for g in ghosts), load.attempts
        results: list[bytes] = []
        offset = 0
        while batch := await client.read("results", offset, 1000):
            results.extend(r for _, r in batch)
            offset = batch[-1][0] + 1
        keys = [r.decode() for r in results]
        assert len(keys) == len(set(keys)), "an item was completed twice"
        assert load.acked <= set(keys), "an acknowledged put was lost"
        assert set(load.completed) <= set(keys)
        stats = await client.stats("work")
        assert stats["done"] == len(keys) and stats["dead"] == 0
        assert len(load.acked) > 50

        # A malformed request gets one line, and the replica keeps serving.
        leader = await leader_of(client)
        request = await (await (await ref.root()).walk(f"/{leader}/raft/v1/request")).load()
        answer = await request.submit(b"\x93not a map")
        assert answer["error"] and "\n" not in answer["error"]
        try:
            await client.put("work", [Item(b"x", key="x", not_before=float("nan"))])
        except QueueError as e:
            assert "\n" not in str(e)
        else:
            raise AssertionError("a NaN not_before was accepted")
        assert (await client.put("work", [Item(b"y", key="y")])).added == 1
