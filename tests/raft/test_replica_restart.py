"""A replica restarting over a state machine that keeps its own durable applied index.

Such a state machine (ww.queue's SQLite state) is not restored from the snapshot when it is
already at or past it, and is handed only the entries after its index; the replica still
applies the membership changes among the entries it skips.
"""

from __future__ import annotations

from typing import Any

from ww.raft.memory import MemoryStorage
from ww.raft.node import Replica, durable_applied_index
from ww.raft.rawnode import Config
from ww.raft.types import ConfChange, ConfChangeSingle, ConfChangeType, ConfState


class DurableLog:
    """A state machine that records what it is given; `applied_index` as if kept on disk."""

    def __init__(self, applied_index: int = 0) -> None:
        self.applied_index = applied_index
        self.applied: list[tuple[int, bytes]] = []
        self.restored: list[bytes] = []

    def apply(self, index: int, data: bytes) -> Any:
        self.applied.append((index, data))
        self.applied_index = index
        return index

    def snapshot(self) -> bytes:
        return self.applied_index.to_bytes(8, "big")

    def restore(self, data: bytes) -> None:
        self.restored.append(data)
        self.applied_index = int.from_bytes(data, "big")


class Plain(DurableLog):
    """The same, without a durable index (the attribute is not an int)."""

    applied_index = None  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.applied_index = None  # type: ignore[assignment]


def drain(replica: Replica) -> None:
    while replica.has_ready():
        replica.handle_ready()


def single_node(storage: MemoryStorage, sm: DurableLog, **options: Any) -> Replica:
    """A one-voter replica over `storage`, elected leader."""
    replica = Replica(Config(id=1, storage=storage), storage, sm, **options)
    drain(replica)  # apply what is already committed before campaigning
    replica.node.campaign()
    drain(replica)
    assert replica.leader == 1
    return replica


def write(replica: Replica, n: int) -> None:
    for i in range(n):
        replica.propose(f"cmd{i}".encode())
        drain(replica)


def test_restart_replays_only_entries_after_the_durable_index() -> None:
    storage = MemoryStorage(ConfState(voters=(1,)))
    first = DurableLog()
    replica = single_node(storage, first, snapshot_interval=5, compaction_margin=100)
    write(replica, 12)
    last = replica.applied
    assert storage.snapshot().metadata.index == 10  # a snapshot at 10 (5 and 10 applied)

    # The state machine on disk got as far as last - 2: a lost tail of its transactions.
    again = DurableLog(applied_index=last - 2)
    single_node(storage, again)
    assert again.restored == []  # already past the snapshot: not restored
    assert [i for i, _ in again.applied] == [last - 1, last]


def test_a_state_machine_behind_the_snapshot_is_restored() -> None:
    storage = MemoryStorage(ConfState(voters=(1,)))
    replica = single_node(storage, DurableLog(), snapshot_interval=5, compaction_margin=100)
    write(replica, 12)
    last = replica.applied

    again = DurableLog(applied_index=3)
    single_node(storage, again)
    assert again.restored == [(10).to_bytes(8, "big")]
    assert [i for i, _ in again.applied] == list(range(11, last + 1))


def test_conf_changes_among_skipped_entries_still_apply() -> None:
    storage = MemoryStorage(ConfState(voters=(1,)))
    sm = DurableLog()
    replica = single_node(storage, sm)
    replica.propose_conf_change(ConfChange((ConfChangeSingle(ConfChangeType.ADD_LEARNER, 2),)))
    drain(replica)
    write(replica, 3)
    assert replica.conf_state.learners == (2,)

    again = DurableLog(applied_index=replica.applied)
    restarted = single_node(storage, again)
    assert again.applied == []
    assert restarted.conf_state.learners == (2,)


def test_durable_index_only_counts_when_it_is_an_int() -> None:
    assert durable_applied_index(DurableLog(7)) == 7
    assert durable_applied_index(Plain()) == 0


class LaterCopy(DurableLog):
    """Its snapshot is a copy made after more entries were applied (as a copy made in a
    thread is): it records an index past the snapshot's."""

    def snapshot(self) -> bytes:
        return (self.applied_index + 2).to_bytes(8, "big")


def test_an_installed_snapshot_past_its_index_is_not_handed_those_entries_again() -> None:
    conf = ConfState(voters=(1,))
    leader_sm = LaterCopy()
    leader = single_node(MemoryStorage(conf), leader_sm, snapshot_interval=5, compaction_margin=0)
    write(leader, 12)

    follower_sm = DurableLog()
    storage = MemoryStorage()
    follower = Replica(Config(id=2, storage=storage), storage, follower_sm)
    leader.propose_conf_change(ConfChange((ConfChangeSingle(ConfChangeType.ADD_LEARNER, 2),)))
    nodes = {1: leader, 2: follower}

    def pump(ticks: int) -> None:
        for _ in range(ticks):
            for node in nodes.values():
                node.tick()
            for node in nodes.values():
                while node.has_ready():
                    for m in node.handle_ready().messages:
                        nodes[m.to].step(m)

    pump(50)
    for i in range(4):
        leader.propose(f"later{i}".encode())
    pump(5)
    snap_index = storage.snapshot().metadata.index
    (restored,) = follower_sm.restored
    copy_index = int.from_bytes(restored, "big")
    assert copy_index > snap_index > 0
    assert follower.applied == leader.applied
    # The entries the copy already held are skipped; the ones after it are applied.
    later = [i for i, _ in leader_sm.applied if i > copy_index]
    assert later and [i for i, _ in follower_sm.applied] == later
