"""A state machine with `commit()` is committed once per Ready that applied entries to it,
after all of them and before their requests are answered; the rest of the time never."""

from __future__ import annotations

from typing import Any

from ww.raft.memory import MemoryStorage
from ww.raft.node import Replica, batch_commit
from ww.raft.rawnode import Config
from ww.raft.types import ConfChange, ConfChangeSingle, ConfChangeType, ConfState


class Grouping:
    """Applies into a pending list that `commit()` makes durable; records each commit."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.durable: list[int] = []
        self.commits: list[list[int]] = []

    @property
    def applied_index(self) -> int:
        return self.durable[-1] if self.durable else 0

    def apply(self, index: int, data: bytes) -> Any:
        self.pending.append(index)
        return index

    def commit(self) -> None:
        self.commits.append(list(self.pending))
        self.durable += self.pending
        self.pending.clear()

    def snapshot(self) -> bytes:
        assert not self.pending, "a snapshot is taken of committed state only"
        return self.applied_index.to_bytes(8, "big")

    def restore(self, data: bytes) -> None:
        self.durable = [int.from_bytes(data, "big")]


def leader(sm: Grouping, **options: Any) -> Replica:
    storage = MemoryStorage(ConfState(voters=(1,)))
    replica = Replica(Config(id=1, storage=storage), storage, sm, **options)
    for step in (lambda: None, replica.node.campaign):
        step()  # first apply what is committed (the configuration), then campaign
        while replica.has_ready():
            replica.handle_ready()
    assert replica.leader == 1
    return replica


def test_a_ready_of_many_entries_is_committed_once_before_it_is_answered() -> None:
    sm = Grouping()
    replica = leader(sm)
    sm.commits.clear()
    ids = replica.propose_batch([f"c{i}".encode() for i in range(5)])
    answered: list[bytes] = []
    while replica.has_ready():
        out = replica.handle_ready()
        if out.results:
            # Every entry answered here is durable by now.
            assert all(index in sm.durable for _, index in out.results)
        answered += [rid for rid, _ in out.results]
    assert answered == ids
    assert len(sm.commits) == 1 and len(sm.commits[0]) == 5
    assert sm.pending == []


def test_readies_that_apply_nothing_to_the_state_machine_do_not_commit() -> None:
    sm = Grouping()
    replica = leader(sm)
    sm.commits.clear()
    for _ in range(20):
        replica.tick()
        while replica.has_ready():
            replica.handle_ready()
    replica.propose_conf_change(ConfChange((ConfChangeSingle(ConfChangeType.ADD_LEARNER, 2),)))
    while replica.has_ready():
        replica.handle_ready()
    assert replica.conf_state.learners == (2,)
    assert sm.commits == []


def test_a_snapshot_sees_the_entries_of_its_ready_committed() -> None:
    sm = Grouping()
    replica = leader(sm, snapshot_interval=3, compaction_margin=0)
    replica.propose_batch([b"a", b"b", b"c", b"d"])
    while replica.has_ready():
        replica.handle_ready()  # Grouping.snapshot asserts nothing is pending
    assert replica.storage.snapshot().metadata.index == replica.applied


def test_only_a_callable_commit_counts() -> None:
    class NoCommit:
        commit = 5

    assert batch_commit(NoCommit()) is None  # type: ignore[arg-type]
    sm = Grouping()
    assert batch_commit(sm) == sm.commit


def test_large_entries_trigger_a_snapshot_by_bytes_and_keep_a_bounded_tail() -> None:
    sm = Grouping()
    replica = leader(sm, snapshot_interval=10_000, compaction_margin=1_000, snapshot_bytes=5000)
    proposed = 0
    while replica.storage.snapshot().is_empty():
        replica.propose(b"x" * 500)  # 516 bytes with the request id
        proposed += 1
        while replica.has_ready():
            replica.handle_ready()
    # Due somewhere between 3,750 and 5,000 bytes: after 8 to 10 such entries.
    assert 8 <= proposed <= 10
    assert replica.storage.snapshot().metadata.index == replica.applied
    kept = replica.storage.entries(replica.storage.first_index(), replica.applied + 1)
    assert len(kept) >= 1 and sum(len(e.data) for e in kept) <= 5000 // 4
