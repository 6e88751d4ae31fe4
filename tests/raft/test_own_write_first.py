"""A leader counts its own entries toward a commit only once they are on its disk, with any
number of voters: the driver sends its appends while it writes, so a commit index that covered
entries not yet saved would reach the followers before the write (etcd-io/etcd#14413)."""

from __future__ import annotations

import random

from ww.raft.core import Config, StateType
from ww.raft.driver import _appends_with_new_entries
from ww.raft.memory import MemoryStorage
from ww.raft.rawnode import RawNode, Ready
from ww.raft.types import ConfChange, ConfState, EntryType, Message

CONF = ConfState(voters=(1,), learners=(2,))


class Pair:
    """Node 1, the single voter, and node 2, its learner, run through the driver's Ready
    cycle (appends leave before the save, everything else after it)."""

    def __init__(self) -> None:
        self.storage = {i: MemoryStorage(CONF) for i in (1, 2)}
        self.nodes = {i: self._start(i) for i in (1, 2)}
        self.applied: dict[int, list[bytes]] = {1: [], 2: []}
        self.wire: list[Message] = []

    def _start(self, i: int) -> RawNode:
        return RawNode(Config(i, storage=self.storage[i], rng=random.Random(i)))

    def handle(self, i: int, *, die_in_save: bool = False) -> Ready | None:
        node = self.nodes[i]
        if not node.has_ready():
            return None
        rd = node.ready()
        self.wire += _appends_with_new_entries(rd)  # they leave while the node writes
        if die_in_save:
            self.nodes[i] = self._start(i)  # the write never reached the disk
            self.applied[i] = []  # the state machine is rebuilt from the log
            return rd
        self.storage[i].save(rd.hard_state, rd.entries, rd.snapshot)
        early = set(map(id, _appends_with_new_entries(rd)))
        self.wire += [m for m in rd.messages if id(m) not in early]
        for e in rd.committed_entries:
            if e.type == EntryType.CONF_CHANGE:
                node.apply_conf_change(ConfChange.decode(e.data))
            elif e.data:
                self.applied[i].append(e.data)
        node.advance(rd)
        return rd

    def settle(self) -> None:
        for _ in range(100):
            moved = False
            for i in (1, 2):
                moved |= self.handle(i) is not None
            wire, self.wire = self.wire, []
            for m in wire:
                self.nodes[m.to].step(m)
            if not moved and not wire:
                return
        raise AssertionError("did not settle")


def test_a_single_voter_does_not_advertise_a_commit_before_its_own_write() -> None:
    p = Pair()
    p.settle()
    p.nodes[1].campaign()
    p.settle()
    assert p.nodes[1].raft.state == StateType.LEADER
    p.nodes[1].propose(b"ok")
    p.settle()
    assert p.applied[2] == [b"ok"]
    p.nodes[1].propose(b"X")
    rd = p.handle(1, die_in_save=True)  # node 1 dies inside the fsync of X
    assert rd is not None and [e.data for e in rd.entries] == [b"X"]
    p.settle()  # the appends that left before the crash arrive; node 1 restarted
    assert b"X" not in p.applied[2], "the learner applied an entry its leader never saved"
    assert all(m.commit < rd.entries[0].index for m in rd.messages)
    p.nodes[1].campaign()
    p.settle()
    p.nodes[1].propose(b"Y")
    p.settle()
    assert p.applied[1] == [b"ok", b"Y"]
    assert p.applied[2] == [b"ok", b"Y"]


def test_a_single_voter_commits_once_its_write_returns() -> None:
    p = Pair()
    p.settle()
    p.nodes[1].campaign()
    p.settle()
    p.nodes[1].propose(b"a")
    rd = p.handle(1)
    assert rd is not None and [e.data for e in rd.entries] == [b"a"]
    assert rd.hard_state is None or rd.hard_state.commit < rd.entries[0].index
    assert not rd.committed_entries
    rd = p.handle(1)  # acknowledged by its own save: now it commits and tells the learner
    assert rd is not None and [e.data for e in rd.committed_entries] == [b"a"]
    p.settle()
    assert p.applied[2] == [b"a"]
