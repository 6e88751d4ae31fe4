"""Helpers for the protocol-core tests, after etcd's raft_test.go: a node factory and an
in-memory `Network` that moves messages between cores until the cluster is quiet.

Test modules reach them through the `kit` fixture (`kit.new_raft(...)`, `kit.Network(...)`),
so nothing depends on how pytest names this module.
"""

from __future__ import annotations

import contextlib
import random
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from ww.raft.core import Config, Raft, StateType
from ww.raft.errors import RaftError
from ww.raft.memory import MemoryStorage
from ww.raft.rawnode import RawNode, Ready
from ww.raft.types import (
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

__all__ = [
    "ConfChange",
    "ConfChangeSingle",
    "ConfChangeType",
    "ConfState",
    "Entry",
    "Snapshot",
    "SnapshotMetadata",
    "StateType",
]

MT = MessageType


def storage_with(
    voters: Iterable[int] = (),
    entries: Sequence[Entry] = (),
    term: int = 0,
    learners: Iterable[int] = (),
) -> MemoryStorage:
    """A MemoryStorage for a cluster of `voters`, holding `entries` and hard state `term`."""
    s = MemoryStorage(ConfState(voters=tuple(voters), learners=tuple(learners)))
    s.append(list(entries))
    if term:
        s.set_hard_state(HardState(term=term))
    return s


def new_raft(
    id: int,
    voters: Iterable[int] = (1, 2, 3),
    election: int = 10,
    heartbeat: int = 1,
    storage: MemoryStorage | None = None,
    learners: Iterable[int] = (),
    seed: int | None = None,
    **kw: Any,
) -> Raft:
    """A core with etcd's test defaults: pre-vote and check-quorum off unless asked for."""
    if storage is None:
        storage = storage_with(voters, learners=learners)
    kw.setdefault("pre_vote", False)
    kw.setdefault("check_quorum", False)
    rng = random.Random(id if seed is None else seed)
    return Raft(
        Config(id, storage=storage, election_tick=election, heartbeat_tick=heartbeat, rng=rng, **kw)
    )


def ents(*terms: int) -> list[Entry]:
    """Entries 1..n with the given terms."""
    return [Entry(term=t, index=i + 1) for i, t in enumerate(terms)]


def log_of(r: Raft) -> list[tuple[int, int, bytes]]:
    """(index, term, data) of every entry in r's log."""
    return [(e.index, e.term, e.data) for e in r.raft_log.all_entries()]


def elapse_to_campaign(r: Raft) -> None:
    """Tick until r's election timeout fires."""
    for _ in range(2 * r.election_timeout):
        if r.state in (StateType.CANDIDATE, StateType.PRE_CANDIDATE, StateType.LEADER):
            return
        r.tick()


def persist_leader(r: Raft) -> None:
    """Save a leader's new entries to its MemoryStorage and tell it (`advance`): its own
    acknowledgement, which counts toward a commit, comes only from there."""
    ents = r.raft_log.unstable_entries()
    if r.state == StateType.LEADER and ents and isinstance(r.raft_log.storage, MemoryStorage):
        r.raft_log.storage.append(ents)
        r.advance(ents, None, ())


def read_messages(r: Raft) -> list[Message]:
    """r's messages, once a leader among them has saved its entries (etcd's test network
    does the same)."""
    persist_leader(r)
    return r.read_messages()


class Network:
    """Connects cores by id. `peers[i] is None` makes node i a black hole."""

    def __init__(self, *peers: Raft | None, seed: int = 0) -> None:
        self.peers: dict[int, Raft | None] = {}
        for i, p in enumerate(peers, start=1):
            self.peers[i] = p
        self.dropm: dict[tuple[int, int], float] = {}
        self.ignorem: set[MessageType] = set()
        self.rng = random.Random(seed)
        self.delivered: list[Message] = []

    @staticmethod
    def of(n: int, **kw: Any) -> Network:
        ids = list(range(1, n + 1))
        return Network(*(new_raft(i, ids, **kw) for i in ids))

    def raft(self, i: int) -> Raft:
        p = self.peers[i]
        assert p is not None
        return p

    def send(self, *msgs: Message) -> None:
        queue = list(msgs)
        while queue:
            m = queue.pop(0)
            p = self.peers.get(m.to)
            if p is None:
                continue
            self.delivered.append(m)
            with contextlib.suppress(RaftError):  # a dropped proposal, as in etcd's network
                p.step(m)
            queue.extend(self.filter(read_messages(p)))

    def tick(self, times: int = 1, only: Iterable[int] | None = None) -> None:
        """Tick the live nodes (or `only` those) `times` times, delivering what they send."""
        for _ in range(times):
            for i, p in self.peers.items():
                if p is None or (only is not None and i not in only):
                    continue
                p.tick()
                self.send(*self.filter(read_messages(p)))

    def campaign(self, i: int) -> None:
        self.send(Message(type=MT.HUP, frm=i, to=i))

    def propose(self, i: int, data: bytes = b"somedata") -> None:
        self.send(Message(type=MT.PROP, frm=i, to=i, entries=(Entry(0, 0, data=data),)))

    def filter(self, msgs: Iterable[Message]) -> list[Message]:
        out = []
        for m in msgs:
            if m.type in self.ignorem:
                continue
            if m.type == MT.HUP:
                raise AssertionError("unexpected HUP on the network")
            perc = self.dropm.get((m.frm, m.to), 0.0)
            if perc and self.rng.random() < perc:
                continue
            out.append(m)
        return out

    def drop(self, frm: int, to: int, perc: float) -> None:
        self.dropm[(frm, to)] = perc

    def cut(self, one: int, other: int) -> None:
        self.drop(one, other, 2.0)
        self.drop(other, one, 2.0)

    def isolate(self, i: int) -> None:
        for j in self.peers:
            if j != i:
                self.cut(i, j)

    def ignore(self, t: MessageType) -> None:
        self.ignorem.add(t)

    def recover(self) -> None:
        self.dropm.clear()
        self.ignorem.clear()


class Cluster:
    """RawNodes over MemoryStorage, run through the full Ready cycle: persist, send, apply
    (conf changes included), advance. `applied[i]` is what node i applied, in order."""

    def __init__(self, ids: Sequence[int], voters: Sequence[int] | None = None, **kw: Any) -> None:
        voters = list(ids) if voters is None else list(voters)
        kw.setdefault("pre_vote", True)
        kw.setdefault("check_quorum", True)
        self.kw = kw
        self.nodes: dict[int, RawNode] = {}
        self.storage: dict[int, MemoryStorage] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.conf: dict[int, ConfState] = {}
        self.inbox: list[Message] = []
        self.down: set[int] = set()
        self.cut_links: set[tuple[int, int]] = set()
        self.ignore: set[MessageType] = set()
        self.sent: list[Message] = []
        self.readys: list[tuple[int, Ready]] = []
        self.snapshot_reports = True
        self.drop_if: Callable[[Message], bool] = lambda m: False
        for i in ids:
            self.add(i, ConfState(voters=tuple(voters)) if i in voters else ConfState())

    def add(self, i: int, cs: ConfState) -> RawNode:
        s = MemoryStorage(cs)
        self.storage[i] = s
        self.applied[i] = []
        self.conf[i] = cs
        kw = dict(self.kw)
        kw.setdefault("election_tick", 10)
        node = RawNode(Config(i, storage=s, rng=random.Random(i), **kw))
        self.nodes[i] = node
        return node

    def raft(self, i: int) -> Raft:
        return self.nodes[i].raft

    def leader(self) -> int:
        leaders = [i for i, n in self.nodes.items() if n.raft.state == StateType.LEADER]
        leaders.sort(key=lambda i: -self.nodes[i].raft.term)
        return leaders[0] if leaders else 0

    def isolate(self, i: int) -> None:
        for j in self.nodes:
            if j != i:
                self.cut_links.add((i, j))
                self.cut_links.add((j, i))

    def heal(self) -> None:
        self.cut_links.clear()

    def handle_ready(self, i: int) -> None:
        node = self.nodes[i]
        rd = node.ready()
        self.readys.append((i, rd))
        s = self.storage[i]
        s.save(rd.hard_state, rd.entries, rd.snapshot)
        for m in rd.messages:
            self.inbox.append(m)
        if rd.snapshot is not None:
            self.conf[i] = rd.snapshot.metadata.conf_state
            self.applied[i] = [
                Entry(rd.snapshot.metadata.term, rd.snapshot.metadata.index, data=b"<snapshot>")
            ]
        for e in rd.committed_entries:
            if e.type == EntryType.CONF_CHANGE:
                self.conf[i] = node.apply_conf_change(ConfChange.decode(e.data))
            self.applied[i].append(e)
        node.advance(rd)

    def stabilize(self, max_rounds: int = 1000) -> None:
        """Process readys and deliver messages until nothing moves."""
        for _ in range(max_rounds):
            progressed = False
            for i, node in list(self.nodes.items()):
                if i not in self.down and node.has_ready():
                    self.handle_ready(i)
                    progressed = True
            inbox, self.inbox = self.inbox, []
            for m in inbox:
                if (m.frm, m.to) in self.cut_links or m.type in self.ignore or self.drop_if(m):
                    continue
                if m.to in self.down or m.to not in self.nodes:
                    continue
                self.sent.append(m)
                self.nodes[m.to].step(m)
                if m.type == MT.SNAP and self.snapshot_reports:
                    self.nodes[m.frm].report_snapshot(m.to, True)
                progressed = True
            if not progressed:
                return
        raise AssertionError("cluster did not stabilize")

    def tick(self, n: int = 1, only: Iterable[int] | None = None) -> None:
        ids = list(self.nodes) if only is None else list(only)
        for _ in range(n):
            for i in ids:
                if i not in self.down:
                    self.nodes[i].tick()
            self.stabilize()

    def elect(self, i: int) -> None:
        self.stabilize()  # apply the bootstrap entries first: campaign waits for them
        self.nodes[i].campaign()
        self.stabilize()
        assert self.raft(i).state == StateType.LEADER, self.raft(i).state

    def data_applied(self, i: int) -> list[bytes]:
        return [e.data for e in self.applied[i] if e.type == EntryType.NORMAL and e.data]


@pytest.fixture
def kit() -> types.ModuleType:
    """This module: the helpers above, for the test modules."""
    return sys.modules[__name__]
