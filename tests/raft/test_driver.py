"""The trio driver: three replicas over an in-memory trio transport, on a mock clock.

Every test takes pytest-trio's `autojump_clock` (MockClock(autojump_threshold=0)): time
jumps ahead whenever all tasks wait, so seconds of timeouts pass in milliseconds.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from sim.kv import KVStateMachine, encode

from ww.raft.disk import DiskStorage
from ww.raft.driver import (
    FrameAssembler,
    NotLeaderError,
    RaftDriver,
    RaftStoppedError,
    RequestDroppedError,
    RequestTimeoutError,
    split_frame,
)
from ww.raft.errors import UncommittedSizeLimitError
from ww.raft.memory import MemoryStorage
from ww.raft.node import Replica
from ww.raft.rawnode import Config
from ww.raft.storage import LogStorage
from ww.raft.types import (
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

VOTERS = (1, 2, 3)
TICK = 0.05  # the driver's default: election timeouts of 0.5 to 1 s
FAILOVER_MEDIAN_BOUND = 1.5
ELECTION_TIMEOUT_MAX = 20 * TICK  # randomized in [10, 20) ticks


class Router:
    """An in-memory network: `send` hands each message straight to the target's driver;
    nodes can be disconnected."""

    def __init__(self) -> None:
        self.drivers: dict[int, RaftDriver] = {}
        self.cut: set[int] = set()

    def link(self, node_id: int) -> Link:
        return Link(self, node_id)


class Link:
    def __init__(self, router: Router, node_id: int) -> None:
        self.router = router
        self.node_id = node_id

    def send(self, messages: list[Message]) -> None:
        for m in messages:
            target = self.router.drivers.get(m.to)
            if target is not None and not {m.frm, m.to} & self.router.cut:
                target.step(m)


class Cluster:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.router = Router()
        self.scopes: dict[int, trio.CancelScope] = {}
        self.machines: dict[int, KVStateMachine] = {}

    async def start(
        self,
        node_id: int,
        seed: int = 0,
        storage: LogStorage | None = None,
        **driver_options: Any,
    ) -> RaftDriver:
        if storage is None:
            storage = MemoryStorage(ConfState(voters=VOTERS))
        sm = KVStateMachine()
        config = Config(id=node_id, storage=storage, rng=random.Random(f"{seed}/{node_id}"))
        replica = Replica(config, storage, sm, rng=random.Random(f"{seed}/{node_id}/ids"))
        driver = RaftDriver(replica, self.router.link(node_id), **driver_options)
        self.router.drivers[node_id] = driver
        self.machines[node_id] = sm
        scope = trio.CancelScope()
        self.scopes[node_id] = scope

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await driver.run(task_status=task_status)

        await self.nursery.start(run)
        return driver

    def crash(self, node_id: int) -> None:
        self.scopes[node_id].cancel()
        del self.router.drivers[node_id]

    def leader(self) -> RaftDriver | None:
        for node_id, d in self.router.drivers.items():
            if d.replica.leader == node_id and node_id not in self.router.cut:
                return d
        return None

    async def wait_for(self, predicate: Callable[[], object], within: float = 5.0) -> None:
        with trio.fail_after(within):
            while not predicate():
                await trio.sleep(TICK)

    async def wait_for_leader(self, within: float = 5.0) -> RaftDriver:
        await self.wait_for(self.leader, within)
        leader = self.leader()
        assert leader is not None
        return leader


@pytest.fixture
async def cluster(autojump_clock: trio.testing.MockClock) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        for node_id in VOTERS:
            await c.start(node_id)
        yield c
        nursery.cancel_scope.cancel()


async def test_elects_a_leader_and_applies_a_proposal_on_every_node(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    assert await leader.propose(encode("put", "x", 1)) is None
    assert await leader.propose(encode("get", "x")) == 1
    await cluster.wait_for(lambda: all(m.data.get("x") == 1 for m in cluster.machines.values()))


async def test_a_burst_of_proposals_is_batched_into_few_readies(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    saves = 0
    storage = leader.replica.storage
    save = storage.save

    def counting_save(*args: object, **kwargs: object) -> None:
        nonlocal saves
        saves += 1
        save(*args, **kwargs)  # type: ignore[arg-type]

    storage.save = counting_save  # type: ignore[method-assign]
    batches: list[int] = []
    propose_batch = leader.replica.propose_batch

    def counting_propose_batch(datas: list[bytes]) -> list[bytes]:
        batches.append(len(datas))
        return propose_batch(datas)

    leader.replica.propose_batch = counting_propose_batch  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(leader.propose, encode("put", f"k{i}", i))
    assert all(cluster.machines[leader.replica.id].data[f"k{i}"] == i for i in range(50))
    assert saves <= 5
    assert sum(batches) == 50 and len(batches) <= 5


async def test_a_leaders_appends_leave_before_its_own_save_which_precedes_the_commit(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    await leader.propose(encode("put", "x", 0))
    events: list[str] = []
    save, send = leader.replica.storage.save, leader.transport.send

    def recording_save(*args: Any, **kwargs: Any) -> None:
        if args[1]:  # entries
            index = args[1][-1].index
            committed = leader.replica.node.status().hard_state.commit >= index
            events.append(f"save {index} committed={committed}")
        save(*args, **kwargs)

    def recording_send(messages: list[Message]) -> None:
        events.extend(f"app {m.entries[-1].index}" for m in messages if m.entries)
        send(messages)

    leader.replica.storage.save = recording_save  # type: ignore[method-assign]
    leader.transport.send = recording_send  # type: ignore[method-assign]
    await leader.propose(encode("put", "x", 1))
    index = leader.replica.applied
    assert events[:3] == [f"app {index}", f"app {index}", f"save {index} committed=False"]


async def test_durable_replicas_persist_in_threads_and_restart_with_their_state(
    tmp_path: Path,
) -> None:
    """DiskStorage with fsync, written from worker threads: what was applied survives a
    restart of every node, and the restarted cluster serves it again.

    On the real clock: a mock clock would jump ahead while every task waits for an fsync
    in a thread, making each fsync last arbitrarily many ticks."""

    def disk(node_id: int) -> DiskStorage:
        return DiskStorage.open(
            tmp_path / str(node_id), node_id=node_id, cluster_id="t", conf_state=ConfState(VOTERS)
        )

    for generation in range(2):
        storages = {n: disk(n) for n in VOTERS}
        async with trio.open_nursery() as nursery:
            c = Cluster(nursery)
            for n in VOTERS:
                await c.start(n, seed=generation, storage=storages[n], persist_in_thread=True)
            leader = await c.wait_for_leader(within=10)
            if generation == 0:
                async with trio.open_nursery() as proposers:
                    for i in range(20):
                        proposers.start_soon(leader.propose, encode("put", f"k{i}", i))
            else:
                assert await leader.propose(encode("get", "k19")) == 19
                machines = c.machines.values()
                await c.wait_for(lambda: all(m.data.get("k7") == 7 for m in machines))  # noqa: B023
            nursery.cancel_scope.cancel()
        for storage in storages.values():
            storage.close()


async def test_a_learner_added_through_the_driver_catches_up(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    await leader.propose(encode("put", "x", "before"))
    learner = await cluster.start(4, storage=MemoryStorage())
    cc = ConfChange((ConfChangeSingle(ConfChangeType.ADD_LEARNER, 4),))
    conf = await leader.propose_conf_change(cc)
    assert (conf.voters, conf.learners) == (VOTERS, (4,))
    await cluster.wait_for(lambda: cluster.machines[4].data.get("x") == "before")
    assert learner.replica.conf_state.learners == (4,)


async def test_read_index_on_a_follower_sees_the_latest_write(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    follower = next(d for d in cluster.router.drivers.values() if d is not leader)
    await leader.propose(encode("put", "x", "fresh"))
    index = await follower.read_index()
    assert follower.replica.applied >= index
    assert cluster.machines[follower.replica.id].data["x"] == "fresh"


async def test_a_read_lost_with_its_leader_fails_fast_when_a_new_term_begins(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    follower = next(d for d in cluster.router.drivers.values() if d is not leader)
    cluster.router.cut.add(leader.replica.id)
    started = trio.current_time()
    with pytest.raises(RequestDroppedError):
        await follower.read_index()
    assert trio.current_time() - started < follower.request_timeout


async def test_a_proposal_on_a_follower_is_forwarded_and_answered(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    follower = next(d for d in cluster.router.drivers.values() if d is not leader)
    assert await follower.propose(encode("cas", "y", None, 5)) is True
    assert await follower.propose(encode("cas", "y", None, 6)) is False
    await cluster.wait_for(lambda: cluster.machines[leader.replica.id].data.get("y") == 5)


async def test_leader_crash_elects_a_new_leader_and_writes_resume(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    await leader.propose(encode("put", "x", 1))
    old_id = leader.replica.id
    cluster.crash(old_id)
    new_leader = await cluster.wait_for_leader()
    assert new_leader.replica.id != old_id
    assert await new_leader.propose(encode("get", "x")) == 1


async def test_failover_with_default_timeouts_takes_well_under_one_and_a_half_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The time from a leader crash until writes commit again, over 15 clusters whose
    election timeouts are randomized differently: the median must stay under 1.5 s."""
    times = []
    for seed in range(15):
        async with trio.open_nursery() as nursery:
            c = Cluster(nursery)
            for node_id in VOTERS:
                await c.start(node_id, seed=seed)
            leader = await c.wait_for_leader()
            await leader.propose(encode("put", "x", seed))
            crashed_at = trio.current_time()
            c.crash(leader.replica.id)
            new_leader = await c.wait_for_leader()
            assert await new_leader.propose(encode("get", "x")) == seed
            times.append(trio.current_time() - crashed_at)
            nursery.cancel_scope.cancel()
    assert statistics.median(times) < FAILOVER_MEDIAN_BOUND
    assert max(times) < 3 * ELECTION_TIMEOUT_MAX


async def test_a_proposal_before_any_election_fails_with_not_leader(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    driver = cluster.router.drivers[1]
    with pytest.raises(NotLeaderError, match="no leader is known"):
        await driver.propose(encode("put", "x", 1))


async def test_a_lost_proposal_times_out_with_an_unknown_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        drivers = [await c.start(n, request_timeout=0.3) for n in VOTERS]
        leader = await c.wait_for_leader()
        follower = next(d for d in drivers if d is not leader)
        c.router.cut.add(follower.replica.id)
        with pytest.raises(RequestTimeoutError, match="may or may not"):
            await follower.propose(encode("put", "x", 1))
        nursery.cancel_scope.cancel()


async def test_requests_time_out_in_deadline_order_within_a_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Waiting requests expire from the head of the deadline queue on the ticker: each one
    fails between its deadline and one tick after it."""
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        drivers = [await c.start(n, request_timeout=0.3) for n in VOTERS]
        leader = await c.wait_for_leader()
        follower = next(d for d in drivers if d is not leader)
        c.router.cut.add(follower.replica.id)
        failed: dict[int, float] = {}

        async def propose_late(i: int) -> None:
            await trio.sleep(0.1 * i)
            started = trio.current_time()
            with pytest.raises(RequestTimeoutError, match="may or may not"):
                await follower.propose(encode("put", "x", i))
            failed[i] = trio.current_time() - started

        async with trio.open_nursery() as inner:
            for i in range(3):
                inner.start_soon(propose_late, i)
        assert sorted(failed) == [0, 1, 2]
        assert all(0.3 <= t <= 0.3 + TICK + 1e-9 for t in failed.values()), failed
        nursery.cancel_scope.cancel()


async def test_a_caller_cancelled_before_its_proposal_is_made_is_skipped(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    with trio.CancelScope() as scope:
        scope.cancel()
        await leader.propose(encode("put", "gone", 1))
    assert scope.cancelled_caught
    assert await leader.propose(encode("put", "kept", 2)) is None
    machine = cluster.machines[leader.replica.id]
    assert machine.data.get("kept") == 2 and "gone" not in machine.data


async def test_a_burst_over_the_uncommitted_limit_fails_only_the_proposals_that_do_not_fit(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    """Proposals are stepped in as one batch, which the limit accepts or refuses whole;
    refused, they are proposed one by one, so the ones that fit still get in."""
    leader = await cluster.wait_for_leader()
    for node_id in VOTERS:
        if node_id != leader.replica.id:
            cluster.router.cut.add(node_id)
    raft = leader.replica.node.raft
    command = encode("put", "k", "v" * 40)
    size = 16 + len(command)  # the request id, then the command
    raft.max_uncommitted_size = 5 * size
    outcomes: list[str] = []

    async def propose() -> None:
        try:
            await leader.propose(command)
        except UncommittedSizeLimitError:
            outcomes.append("refused")
        else:
            outcomes.append("applied")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(propose)  # the first one is uncommitted while the rest arrive
        await cluster.wait_for(lambda: raft.uncommitted_size > 0)
        for _ in range(9):
            nursery.start_soon(propose)
        await cluster.wait_for(lambda: outcomes.count("refused") == 5)
        assert raft.uncommitted_size == 5 * size and outcomes == ["refused"] * 5
        cluster.router.cut.clear()
    assert sorted(outcomes) == ["applied"] * 5 + ["refused"] * 5


async def test_transfer_leader_hands_over_leadership(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    target = next(n for n in VOTERS if n != leader.replica.id)
    await leader.transfer_leader(target)
    await cluster.wait_for(lambda: cluster.leader() is cluster.router.drivers[target], within=2.0)


async def test_stopping_the_driver_fails_waiting_requests(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    follower_id = next(n for n in VOTERS if n != leader.replica.id)
    follower = cluster.router.drivers[follower_id]
    cluster.router.cut.add(follower_id)

    async def crash_soon() -> None:
        await trio.sleep(0.1)
        cluster.crash(follower_id)

    cluster.nursery.start_soon(crash_soon)
    with pytest.raises(RaftStoppedError, match="stopped"):
        await follower.propose(encode("put", "x", 1))


async def test_undecodable_bytes_are_dropped_and_counted(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    leader = await cluster.wait_for_leader()
    leader.step_encoded(b"\x93garbage")
    leader.step_encoded(Message(MessageType.HEARTBEAT, to=leader.replica.id, frm=2).encode()[:-3])
    assert leader.dropped_messages == 2
    assert await leader.propose(encode("put", "x", 1)) is None


def test_large_messages_split_into_frames_and_join_again() -> None:
    snap = Snapshot(bytes(range(256)) * 400, SnapshotMetadata(index=9, term=2))
    data = Message(MessageType.SNAP, to=2, frm=1, term=2, snapshot=snap).encode()
    chunks = list(split_frame(data, 4096))
    assert len(chunks) == -(-len(data) // 4096)
    assembler = FrameAssembler()
    joined = [assembler.feed(c) for c in chunks]
    assert joined[:-1] == [None] * (len(chunks) - 1)
    assert joined[-1] is not None
    assert Message.decode(joined[-1]).snapshot == snap
    with pytest.raises(ValueError, match="exceeds the limit"):
        FrameAssembler(max_size=100).feed(chunks[0])


def test_frames_refuse_chunks_that_contradict_their_header() -> None:
    assert [FrameAssembler().feed(c) for c in split_frame(b"", 10)] == [b""]
    first, second = split_frame(b"0123456789", 5)
    assembler = FrameAssembler()
    with pytest.raises(ValueError, match="shorter than its header"):
        assembler.feed(b"\x00")
    assert assembler.feed(first) is None
    with pytest.raises(ValueError, match="exceed the announced"):
        assembler.feed(first[:9] + b"too many bytes")
    with pytest.raises(ValueError, match="announced 10"):
        FrameAssembler().feed(second)


async def test_ticks_keep_up_with_the_clock_when_the_loop_is_held_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A save that holds the loop for several tick intervals costs no ticks: a leader whose
    tick count fell behind the clock would hold its read lease too long."""
    storage = MemoryStorage(ConfState(voters=(1,)))
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        driver = await c.start(1, storage=storage, tick_interval=TICK)
        await c.wait_for_leader()
        raft = driver.replica.node.raft
        start_clock, start = raft.clock, trio.current_time()
        save = storage.save

        def slow_save(*args: Any, **kwargs: Any) -> None:
            autojump_clock.jump(7.5 * TICK)  # the loop is held up for 7.5 tick intervals
            save(*args, **kwargs)

        storage.save = slow_save  # type: ignore[method-assign]
        for i in range(5):
            await driver.propose(encode("put", "x", i))
        storage.save = save  # type: ignore[method-assign]
        await trio.sleep(TICK)
        elapsed_ticks = (trio.current_time() - start) / TICK
        assert elapsed_ticks > 30
        assert abs((raft.clock - start_clock) - elapsed_ticks) <= 2
        nursery.cancel_scope.cancel()
