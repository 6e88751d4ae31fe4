"""Queue replicas in this process over real ww hosts: each replica talks to its own host
(`ww start` child processes on loopback), hangs its capabilities at /<peer>/raft/v1 and
reaches the others through the anchors, as the Raft ROM does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.queue.conftest import HostFactory, HostProcess, wait_for
from ww.queue.client import QueueClient, QueueError
from ww.queue.commands import Item
from ww.queue.replica import QueueReplica, ReplicaOptions
from ww.queue.snapshots import Marker
from ww.queue.state import QueueState
from ww.raft.types import Message, MessageType, Snapshot, SnapshotMetadata
from ww.rom import build_rom
from ww.rom.sandbox import landlock_abi

FAST = ReplicaOptions(
    tick_interval=0.02, election_tick=10, clock_interval=0.2, request_timeout=2.0, chunk_size=4096
)


class Group:
    """Replicas run in this process, one per host, each over its own client connection."""

    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.scopes: dict[str, trio.CancelScope] = {}
        self.replicas: dict[str, QueueReplica] = {}
        self.hosts: dict[str, HostProcess] = {}

    async def start(
        self, host: HostProcess, voters: list[str] | None, options: ReplicaOptions = FAST
    ) -> QueueReplica:
        """Run a replica over a connection of its own: a crash closes both, as a process
        exit would."""

        async def run(task_status: trio.TaskStatus[QueueReplica]) -> None:
            with trio.CancelScope() as scope:
                self.scopes[host.peer] = scope
                async with host.connect() as ref:
                    replica = QueueReplica(
                        ref,
                        f"/{host.peer}/raft/v1",
                        self.tmp / host.name,
                        voters=voters,
                        options=options,
                    )
                    async with trio.open_nursery() as nursery:
                        await nursery.start(replica.run)
                        task_status.started(replica)

        replica: QueueReplica = await self.nursery.start(run)
        self.replicas[host.peer] = replica
        self.hosts[host.peer] = host
        return replica

    def crash(self, peer: str) -> None:
        self.scopes.pop(peer).cancel()
        self.replicas.pop(peer)

    def leader(self) -> str | None:
        leaders = [p for p, r in self.replicas.items() if r.is_leader]
        return leaders[0] if len(leaders) == 1 else None


@pytest.fixture
async def cluster(host_factory: HostFactory) -> list[HostProcess]:
    return await host_factory.cluster(3, ttl=1.5)


@pytest.fixture
async def group(
    cluster: list[HostProcess], nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Group]:
    g = Group(nursery, tmp_path / "volumes")
    voters = [h.peer for h in cluster]
    for host in cluster:
        await g.start(host, voters)
    await wait_for(lambda: g.leader() is not None, timeout=10)
    yield g
    for scope in g.scopes.values():
        scope.cancel()


@pytest.fixture
async def client(cluster: list[HostProcess], group: Group) -> AsyncIterator[QueueClient]:
    async with cluster[0].connect() as host:
        c = await QueueClient.connect(host, timeout=15)
        yield c
        await c.aclose()


async def test_a_new_group_elects_its_first_voter_without_an_election_timeout(
    cluster: list[HostProcess], nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Election timeouts of 10-20 s: only the first voter's campaign elects a leader sooner.
    slow = ReplicaOptions(tick_interval=0.1, election_tick=100, request_timeout=2.0)
    g = Group(nursery, tmp_path / "volumes")
    voters = [h.peer for h in cluster]
    for host in reversed(cluster):  # the first voter starts last
        await g.start(host, voters, slow)
    await wait_for(lambda: g.leader() is not None, timeout=5)
    assert g.leader() == voters[0]
    for scope in g.scopes.values():
        scope.cancel()


async def test_put_claim_complete_read_through_the_leader(client: QueueClient) -> None:
    assert await client.create("urls")
    assert await client.create("pages", kind="log")
    put = await client.put("urls", [Item(b"a", key="a"), Item(b"b", key="b"), Item(b"a", key="a")])
    assert (put.added, put.duplicates) == (2, 1)
    claimed = await client.claim("urls", "w1", max_items=10, lease=30)
    assert sorted(c.payload for c in claimed) == [b"a", b"b"]
    done = await client.complete(
        "w1", [c.id for c in claimed], append={"pages": [b"A", b"B"]}, put={"urls": [Item(b"c")]}
    )
    assert done["done"] == 2 and done["added"] == 1
    assert await client.read("pages", 0, 10) == [(0, b"A"), (1, b"B")]
    stats = await client.stats("urls")
    assert (stats["ready"], stats["done"], stats["seen"]) == (1, 2, 2)


async def test_status_names_members_leader_and_lag(
    client: QueueClient, group: Group, cluster: list[HostProcess]
) -> None:
    await client.put("t", [Item(b"x")])
    status = await client.status()
    assert status["leader"] == group.leader()
    assert sorted(status["voters"]) == sorted(h.peer for h in cluster)
    assert set(status["replicas"]) == {h.peer for h in cluster}
    assert status["commit"] >= status["applied"] > 0
    assert all(s["lag"] >= 0 for s in status["replicas"].values())


async def test_a_malformed_request_gets_one_line_and_the_replica_keeps_serving(
    client: QueueClient, cluster: list[HostProcess], group: Group
) -> None:
    leader = group.leader()
    async with cluster[1].connect() as host:
        request = await (await (await host.root()).walk(f"/{leader}/raft/v1/request")).load()
        for bad in (b"\xc1garbage", 42, b"\x91\x01", b"\x81\xa2op\xa4nope"):
            answer = await request.submit(bad)
            assert "\n" not in answer["error"] and answer["error"]
        answer = await request.query(b"\x81\xa2op\xa5write")
        assert "unknown query" in answer["error"]
        # Garbage pushed into the Raft endpoint is dropped and counted.
        rpc = await (await (await host.root()).walk(f"/{leader}/raft/v1/rpc")).load()
        async with rpc.sink("messages", 7) as tx:
            for junk in ("junk", [b"\xc1", 5], {"a": 1}):
                await tx.send(junk)
        async with rpc.sink("snapshot", 7) as tx:
            await tx.send(b"short")
        assert tx.result is False
        # A snapshot file whose bytes do not match the trailer is refused and not kept.
        marker = Marker.for_index(10**6)
        snap = Message(
            MessageType.SNAP, to=1, frm=7, term=1,
            snapshot=Snapshot(marker.encode(), SnapshotMetadata(10**6, 1)),
        )  # fmt: skip
        async with rpc.sink("snapshot_file", 7) as tx:
            for item in (snap.encode(), b"x" * 5000, {"size": 5000, "sha256": bytes(32)}):
                await tx.send(item)
        assert tx.result is False
        files = group.replicas[leader].files
        assert files is not None and not any(marker.file in p.name for p in files.dir.iterdir())
        stats = group.replicas[leader].transport.stats  # type: ignore[union-attr]
        assert stats.bad_input >= 4
        assert group.replicas[leader].driver.dropped_messages >= 1  # type: ignore[union-attr]
        with pytest.raises(QueueError, match="topic"):
            await client.put("", [Item(b"x")])
    assert (await client.put("t", [Item(b"still")])).added == 1


async def test_leader_crash_a_new_leader_serves_and_the_old_one_catches_up(
    client: QueueClient, group: Group, cluster: list[HostProcess]
) -> None:
    await client.put("t", [Item(f"{i}".encode(), key=str(i)) for i in range(50)])
    old = group.leader()
    assert old is not None
    group.crash(old)
    # Retried against the new leader; the key set dedups nothing new.
    assert (await client.put("t", [Item(b"50", key="50")])).added == 1
    assert group.leader() != old
    host = group.hosts[old]
    replica = await group.start(host, None)  # restarted on its volume: voters come from disk
    await wait_for(
        lambda: replica.status()["applied"] >= group.replicas[group.leader()].status()["commit"]
    )
    state = replica.state.state  # type: ignore[union-attr]
    assert isinstance(state, QueueState)
    assert state.query({"op": "stats", "topic": "t"})["ready"] == 51


async def test_restart_replays_only_entries_after_the_applied_index(
    client: QueueClient, group: Group
) -> None:
    await client.put("t", [Item(b"x", key="x")])
    peer = next(p for p in group.replicas if p != group.leader())
    replica = group.replicas[peer]
    await wait_for(
        lambda: replica.status()["applied"] == group.replicas[group.leader()].status()["applied"]
    )
    # Entries applied since the database's last commit (grouped, every commit_interval) are
    # applied again after a crash: commit now, so that the test knows the durable index.
    replica.state.state.commit()  # type: ignore[union-attr]
    applied_before = replica.state.applied_index  # type: ignore[union-attr]
    group.crash(peer)
    calls: list[int] = []
    restarted = await group.start(group.hosts[peer], None)
    original = restarted.state.state.apply  # type: ignore[union-attr]

    def counting(index: int, data: bytes) -> Any:
        calls.append(index)
        return original(index, data)

    restarted.state.state.apply = counting  # type: ignore[union-attr,method-assign]
    await client.put("t", [Item(b"y", key="y")])
    await wait_for(
        lambda: restarted.status()["applied"] >= group.replicas[group.leader()].status()["applied"]
    )
    assert calls and min(calls) > applied_before


SNAPPY = ReplicaOptions(
    tick_interval=0.02,
    clock_interval=0.2,
    request_timeout=2.0,
    chunk_size=4096,
    snapshot_interval=20,
    compaction_margin=5,
)


async def test_add_by_snapshot_transfer_and_remove(
    host_factory: HostFactory, nursery: trio.Nursery, tmp_path: Path
) -> None:
    hosts = await host_factory.cluster(4, ttl=1.5)
    g = Group(nursery, tmp_path / "volumes")
    voters = [h.peer for h in hosts[:3]]
    for host in hosts[:3]:
        await g.start(host, voters, SNAPPY)
    await wait_for(lambda: g.leader() is not None, timeout=10)
    async with hosts[0].connect() as ref:
        client = await QueueClient.connect(ref, timeout=15)
        for i in range(60):  # past a few snapshots: the log behind them is compacted
            await client.put("t", [Item(b"x" * 500, key=str(i))])
        newcomer = hosts[3].peer
        joined = await g.start(hosts[3], None, SNAPPY)  # empty: waits to be added
        status = await client.add(newcomer)
        assert newcomer in status["voters"]
        assert joined.transport is not None and joined.transport.stats.snapshots_received >= 1
        await wait_for(
            lambda: joined.status()["applied"] >= g.replicas[g.leader()].status()["commit"]
        )
        state = joined.state.state  # type: ignore[union-attr]
        assert state.query({"op": "stats", "topic": "t"})["seen"] == 60

        await client.transfer(newcomer)
        assert g.leader() == newcomer
        old = hosts[0].peer
        status = await client.remove(old)
        assert old not in status["voters"] and len(status["voters"]) == 3
        g.crash(old)
        assert (await client.put("t", [Item(b"after", key="after")])).added == 1
        # Removing the leader hands leadership on first, then removes it.
        status = await client.remove(newcomer)
        assert newcomer not in status["voters"] and status["leader"] != newcomer


async def test_follow_yields_records_as_they_commit(client: QueueClient) -> None:
    await client.create("log", kind="log")
    await client.append("log", [b"r0", b"r1"])
    got: list[tuple[int, bytes]] = []
    async with trio.open_nursery() as nursery:

        async def follow() -> None:
            async for offset, record in client.follow("log", 1):
                got.append((offset, record))
                if len(got) == 3:
                    nursery.cancel_scope.cancel()

        nursery.start_soon(follow)
        await wait_for(lambda: len(got) == 1)
        assert await client.append("log", [b"r2", b"r3"]) == 2
    assert got == [(1, b"r1"), (2, b"r2"), (3, b"r3")]
    await client.set_cursor("log", "reader", 3)
    assert await client.cursor("log", "reader") == 3
    with pytest.raises(QueueError):
        async for _ in client.follow("no-such-log", 0):
            pass


async def test_the_client_dials_the_other_replicas_hosts_and_not_its_own(
    cluster: list[HostProcess], group: Group
) -> None:
    async with cluster[0].connect() as host:
        client = await QueueClient.connect(host, timeout=15)
        others = {h.peer for h in cluster[1:]}
        await wait_for(lambda: set(client.dialed()) == others)
        assert all(conn is not host.connection for conn in client.dialed().values())
        assert await client.create("urls")
        assert (await client.put("urls", [Item(b"a")])).added == 1
        connections = list(client.dialed().values())
        await client.aclose()
        assert client.dialed() == {}
        assert all(conn.closed.is_set() for conn in connections)


async def test_without_direct_the_client_goes_through_its_host(
    cluster: list[HostProcess], group: Group
) -> None:
    async with cluster[0].connect() as host:
        client = await QueueClient.connect(host, timeout=15, direct=False)
        assert await client.create("urls")
        assert (await client.put("urls", [Item(b"a")])).added == 1
        assert client.dialed() == {}
        await client.aclose()


async def test_losing_the_dialed_connection_loses_and_repeats_no_write(
    cluster: list[HostProcess], group: Group
) -> None:
    leader = group.leader()
    via = next(h for h in cluster if h.peer != leader)
    async with via.connect() as host:
        client = await QueueClient.connect(host, timeout=15)
        await wait_for(lambda: leader in client.dialed())
        lost = client.dialed()[leader]
        await client.create("log", kind="log")
        answered = trio.Event()

        async def append(n: int) -> None:
            await client.append("log", [b"%d" % n])
            answered.set()

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(append, n)
            await answered.wait()
            await lost.aclose()
        records = await client.read("log", 0, 100)
        assert sorted(int(r) for _, r in records) == list(range(40))
        await wait_for(lambda: client.dialed().get(leader) not in (None, lost))
        await client.aclose()


CLIENT_ROM = """
import trio
from ww.queue.client import Item, QueueClient

async def main(host, args):
    client = await QueueClient.connect(host, timeout=15)
    added = (await client.put("from-rom", [Item(b"a", key="a")])).added
    with trio.move_on_after(3):
        while len(client.dialed()) < 2:
            await trio.sleep(0.05)
    added += (await client.put("from-rom", [Item(b"b", key="b")])).added
    print("RESULT", added, len(client.dialed()), flush=True)
    await client.aclose()
"""


@pytest.mark.skipif(landlock_abi() < 4, reason="needs Landlock ABI 4 or later")
@pytest.mark.parametrize(("permissions", "dialed"), [(["net.connect"], 2), ([], 0)])
async def test_a_rom_dials_with_net_connect_and_goes_through_its_host_without(
    cluster: list[HostProcess],
    group: Group,
    tmp_path: Path,
    permissions: list[str],
    dialed: int,
) -> None:
    src = tmp_path / "client-rom"
    src.mkdir()
    (src / "rom.toml").write_text(
        'name = "client"\nversion = "1"\nentry = "client:main"\n'
        f'requires = ["trio", "msgpack", "ww.queue"]\npermissions = {json.dumps(permissions)}\n'
    )
    (src / "client.py").write_text(CLIENT_ROM)
    async with cluster[0].connect() as host:
        process = await host.spawn(build_rom(src), [])
        code = await process.wait()
        logs = (await process.logs()).decode()
    line = next((x for x in logs.splitlines() if x.startswith("RESULT")), None)
    assert code == 0 and line is not None, logs
    assert line.split()[1:] == ["2", str(dialed)]
