"""A simulated Raft cluster: real `Replica`s (the driver's sans-I/O half) over the simulated
network, crashed and restarted from their storage, checked after every Ready.

Time is the tick counter `now`; every choice comes from one seeded `random.Random`, so a seed
replays exactly. The safety properties checked as the run goes:

- at most one leader per term;
- a node's log agrees with the globally committed entries up to its commit index, and a
  committed entry never changes (one write-once map of index -> entry for the whole run);
- every node applies the same sequence: each applied command extends a digest, which must
  equal the digest every other node had at that index (snapshots carry it too).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ww.raft.driver import _appends_with_new_entries
from ww.raft.errors import RaftError
from ww.raft.memory import MemoryStorage
from ww.raft.node import Outcome, Replica
from ww.raft.rawnode import Config, Ready
from ww.raft.read_only import ReadOnlyOption
from ww.raft.storage import LogStorage
from ww.raft.types import ConfChange, ConfChangeSingle, ConfState, Message, MessageType

from .kv import KVStateMachine, encode
from .linearizability import Op
from .network import Faults, Network

ELECTION_TICK = 10


class InvariantViolation(AssertionError):
    pass


@dataclass(slots=True)
class SimNode:
    id: int
    storage: LogStorage
    path: Path | None
    sm: KVStateMachine = field(default_factory=KVStateMachine)
    replica: Replica | None = None
    removed: bool = False
    commit: int = 0  # persisted commit index
    term: int = 0  # persisted term

    @property
    def alive(self) -> bool:
        return self.replica is not None


@dataclass(slots=True)
class Request:
    client: int
    node: int
    request_id: bytes
    kind: str
    key: str
    arg: Any
    call: int
    deadline: int


class _TrackedKV(KVStateMachine):
    """The KV map, reporting the digest after every applied command to the checker."""

    def __init__(self, on_apply: Callable[[int, bytes], None]) -> None:
        super().__init__()
        self._on_apply = on_apply

    def apply(self, index: int, command: bytes) -> Any:
        result = super().apply(index, command)
        self._on_apply(index, self.digest)
        return result

    def restore(self, data: bytes) -> None:
        super().restore(data)
        if self.index:
            self._on_apply(self.index, self.digest)


@dataclass(slots=True)
class SimOptions:
    nodes: int = 3
    """Voters at the start."""
    learners: int = 0
    """Learners at the start (ids after the voters')."""
    disk: bool = True
    snapshot_interval: int = 5
    compaction_margin: int = 2
    max_size_per_msg: int = 256
    max_inflight_msgs: int = 4
    request_timeout: int = 60  # ticks
    read_only_option: ReadOnlyOption = ReadOnlyOption.SAFE
    same_tick_delivery: bool = False
    """Deliver what is sent within the tick it is sent in (a network much faster than a
    tick); by default a message arrives at the next tick at the earliest."""


class Cluster:
    def __init__(
        self, seed: int, options: SimOptions, workdir: Path, faults: Faults | None = None
    ) -> None:
        self.seed = seed
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.net = Network(random.Random(self.rng.getrandbits(64)), faults)
        self.now = 0
        self.clock = 0  # orders client calls and returns
        self.ops_submitted = 0
        self.nodes: dict[int, SimNode] = {}
        self.committed: dict[int, tuple[int, int, bytes]] = {}
        self.digests: dict[int, bytes] = {}
        self.leaders: dict[int, int] = {}
        self.history: list[Op] = []
        self.requests: dict[tuple[int, bytes], Request] = {}
        self.on_outcome: Callable[[SimNode, Outcome], None] | None = None
        self.crash_in_save = 0.0
        """The chance that a node dies inside each `save()` that writes entries."""
        self.crashes_in_save = 0
        voters = tuple(range(1, options.nodes + 1))
        learners = tuple(range(options.nodes + 1, options.nodes + options.learners + 1))
        for node_id in voters + learners:
            self.add_node(node_id, ConfState(voters=voters, learners=learners))

    # -- nodes ------------------------------------------------------------------------------

    def add_node(self, node_id: int, conf_state: ConfState | None = None) -> SimNode:
        """Create and start a node; without `conf_state` it joins an existing cluster."""
        path: Path | None = None
        if self.options.disk:
            from ww.raft.disk import DiskStorage

            path = self.workdir / f"node-{node_id}"
            if path.exists():
                shutil.rmtree(path)
            storage: LogStorage = DiskStorage.open(
                path, node_id=node_id, cluster_id=1, sync=False, conf_state=conf_state
            )
            storage.close()  # initialized; `start` opens it like after any restart
        else:
            storage = MemoryStorage(conf_state)
        node = SimNode(node_id, storage, path)
        self.nodes[node_id] = node
        self.start(node)
        return node

    def start(self, node: SimNode) -> None:
        assert node.replica is None
        if node.path is not None:
            from ww.raft.disk import DiskStorage

            node.storage = DiskStorage.open(node.path, node_id=node.id, cluster_id=1, sync=False)
        hard_state, _ = node.storage.initial_state()
        node.commit, node.term = hard_state.commit, hard_state.term
        node.sm = _TrackedKV(self._check_digest)
        config = Config(
            id=node.id,
            election_tick=ELECTION_TICK,
            heartbeat_tick=1,
            storage=node.storage,
            max_size_per_msg=self.options.max_size_per_msg,
            max_inflight_msgs=self.options.max_inflight_msgs,
            check_quorum=True,
            pre_vote=True,
            read_only_option=self.options.read_only_option,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node.replica = Replica(
            config,
            node.storage,
            node.sm,
            snapshot_interval=self.options.snapshot_interval,
            compaction_margin=self.options.compaction_margin,
            rng=random.Random(self.rng.getrandbits(64)),
        )

    def crash(self, node: SimNode) -> None:
        """Lose everything in memory; what `save` wrote survives."""
        assert node.replica is not None
        node.replica = None
        for key in [k for k in self.requests if k[0] == node.id]:
            self._give_up(self.requests.pop(key))
        if node.path is not None:
            node.storage.close()

    def close(self) -> None:
        """Close every node's storage (the files stay)."""
        for node in self.nodes.values():
            if node.replica is not None:
                node.replica = None
                if node.path is not None:
                    node.storage.close()

    def alive(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.replica is not None]

    def leader(self) -> SimNode | None:
        """The live leader of the highest term, if any."""
        best: SimNode | None = None
        for n in self.alive():
            assert n.replica is not None
            if is_leader(n.replica) and (best is None or n.term > best.term):
                best = n
        return best

    # -- time -------------------------------------------------------------------------------

    def tick(self) -> None:
        self.now += 1
        nodes = self.alive()
        self.rng.shuffle(nodes)
        for n in nodes:
            assert n.replica is not None
            n.replica.tick()
        for m in self.net.deliver(self.now):
            self.deliver(m)
        self._report_snapshots()
        self.process_all()
        while self.options.same_tick_delivery and self.net.due(self.now):
            for m in self.net.deliver(self.now):
                self.deliver(m)
            self._report_snapshots()
            self.process_all()
        self._expire_requests()

    def deliver(self, m: Message) -> None:
        node = self.nodes.get(m.to)
        alive = node is not None and node.replica is not None
        if alive:
            assert node is not None and node.replica is not None
            node.replica.step(m)
        if m.snapshot is not None:
            self.net.snapshot_reports.append((m, alive))

    def _report_snapshots(self) -> None:
        reports, self.net.snapshot_reports = self.net.snapshot_reports, []
        for m, ok in reports:
            sender = self.nodes.get(m.frm)
            if sender is not None and sender.replica is not None:
                sender.replica.node.report_snapshot(m.to, ok)

    def process_all(self) -> None:
        nodes = self.alive()
        self.rng.shuffle(nodes)
        for n in nodes:
            self.process(n)

    def process(self, node: SimNode) -> None:
        """Handle the node's Readys as `RaftDriver` does: a leader's appends of new entries
        leave before its save, everything else after it."""
        replica = node.replica
        assert replica is not None
        while replica.has_ready():
            ready = replica.node.ready()
            self._check_ready(node, ready)
            early = _appends_with_new_entries(ready)
            self.net.send(early, self.now)
            if ready.entries and self.rng.random() < self.crash_in_save:
                self._die_in_save(node, ready)
                return
            replica.persist(ready)
            self._check_persisted(node, ready)
            out = replica.finish(ready)
            self._check_leader(node)
            if early:
                out.messages = [m for m in out.messages if m.type != MessageType.APP]
            self.net.send(out.messages, self.now)
            self._settle(node, out)
            if self.on_outcome is not None:
                self.on_outcome(node, out)

    def _die_in_save(self, node: SimNode, ready: Ready) -> None:
        """The node dies inside `save()`: before anything reached the disk, after all of it
        did, or (on disk) with its record torn at a random byte."""
        assert node.replica is not None
        self.crashes_in_save += 1
        how = self.rng.choice(("nothing", "all", "torn"))
        if how != "nothing":
            segment = self._last_segment(node)
            size = segment.stat().st_size if segment is not None else 0
            node.replica.persist(ready)
            if how == "torn" and segment is not None and segment == self._last_segment(node):
                cut = self.rng.randrange(size, segment.stat().st_size)
                with segment.open("r+b") as f:
                    f.truncate(cut)
        self.crash(node)
        self.start(node)

    @staticmethod
    def _last_segment(node: SimNode) -> Path | None:
        if node.path is None:
            return None
        return max(node.path.glob("wal-*.log"), default=None)

    # -- clients ----------------------------------------------------------------------------

    def submit(self, client: int, node: SimNode, kind: str, key: str, arg: Any) -> bool:
        """Start a client operation on `node`; False if the node refused it outright."""
        replica = node.replica
        assert replica is not None
        self.ops_submitted += 1
        op_id = self.ops_submitted  # unique, so a duplicated entry takes effect once
        try:
            if kind == "read":
                request_id = replica.read_index()
            elif kind == "put":
                request_id = replica.propose(encode("put", key, arg, op_id=op_id))
            elif kind == "cas":
                request_id = replica.propose(encode("cas", key, *arg, op_id=op_id))
            else:
                request_id = replica.propose(encode("get", key, op_id=op_id))
        except RaftError:
            return False
        self.clock += 1
        self.requests[(node.id, request_id)] = Request(
            client,
            node.id,
            request_id,
            kind,
            key,
            arg,
            self.clock,
            self.now + self.options.request_timeout,
        )
        return True

    def _settle(self, node: SimNode, out: Outcome) -> None:
        for request_id, result in out.results:
            req = self.requests.pop((node.id, request_id), None)
            if req is not None:
                self._record(req, result)
        for request_id, _ in out.reads:
            req = self.requests.pop((node.id, request_id), None)
            if req is not None:
                self._record(req, node.sm.data.get(req.key))
        for request_id in out.dropped:
            self.requests.pop((node.id, request_id), None)

    def _record(self, req: Request, result: Any) -> None:
        self.clock += 1
        kind = "get" if req.kind == "read" else req.kind
        self.history.append(Op(req.client, req.key, kind, req.arg, result, req.call, self.clock))

    def _give_up(self, req: Request) -> None:
        kind = "get" if req.kind == "read" else req.kind
        self.history.append(Op(req.client, req.key, kind, req.arg, None, req.call, None))

    def _expire_requests(self) -> None:
        for key, req in list(self.requests.items()):
            if req.deadline <= self.now:
                del self.requests[key]
                node = self.nodes[req.node]
                if node.replica is not None:
                    node.replica.forget(req.request_id)
                self._give_up(req)

    def busy_clients(self) -> set[int]:
        return {r.client for r in self.requests.values()}

    # -- membership -------------------------------------------------------------------------

    def propose_conf_change(self, node: SimNode, *changes: ConfChangeSingle) -> bool:
        """Propose the changes (several at once go through a joint configuration)."""
        assert node.replica is not None
        cc = ConfChange(changes)
        try:
            node.replica.propose_conf_change(cc)
        except RaftError:
            return False
        return True

    # -- invariants -------------------------------------------------------------------------

    def _fail(self, what: str) -> None:
        raise InvariantViolation(f"seed {self.seed}, tick {self.now}: {what}")

    def _check_ready(self, node: SimNode, ready: Ready) -> None:
        for e in ready.entries:
            if e.index <= node.commit:
                self._fail(f"node {node.id} rewrites entry {e.index} at or below its commit")
        for e in ready.committed_entries:
            self._check_committed(node, e.index, e.term, int(e.type), e.data)
        snap = ready.snapshot
        if snap is not None and not snap.is_empty():
            known = self.committed.get(snap.metadata.index)
            if known is not None and known[0] != snap.metadata.term:
                self._fail(
                    f"node {node.id} got a snapshot at {snap.metadata.index} of term "
                    f"{snap.metadata.term}, but term {known[0]} was committed there"
                )

    def _check_persisted(self, node: SimNode, ready: Ready) -> None:
        hs = ready.hard_state
        if hs is None or hs.is_empty():
            return
        if hs.term < node.term:
            self._fail(f"node {node.id} term went back from {node.term} to {hs.term}")
        if hs.commit < node.commit:
            self._fail(f"node {node.id} commit went back from {node.commit} to {hs.commit}")
        storage = node.storage
        lo = max(node.commit + 1, storage.first_index())
        if hs.commit >= lo:
            for e in storage.entries(lo, hs.commit + 1):
                self._check_committed(node, e.index, e.term, int(e.type), e.data)
        node.commit, node.term = hs.commit, hs.term

    def _check_committed(self, node: SimNode, index: int, term: int, typ: int, data: bytes) -> None:
        record = (term, typ, data)
        known = self.committed.setdefault(index, record)
        if known != record:
            self._fail(
                f"node {node.id} has entry {index} as term {term} {data[16:]!r}, but term "
                f"{known[0]} {known[2][16:]!r} was committed there"
            )

    def _check_digest(self, index: int, digest: bytes) -> None:
        known = self.digests.setdefault(index, digest)
        if known != digest:
            self._fail(f"applied sequences diverge at index {index}")

    def _check_leader(self, node: SimNode) -> None:
        assert node.replica is not None
        if node.replica.node.stats.dropped_messages["diverged_follower"]:
            self._fail(f"node {node.id} found a follower whose committed log diverges")
        if is_leader(node.replica):
            term = node.term
            other = self.leaders.setdefault(term, node.id)
            if other != node.id:
                self._fail(f"nodes {other} and {node.id} both lead term {term}")


def is_leader(replica: Replica) -> bool:
    """As of the last Ready: the replica tracks the leader from each Ready's soft state."""
    return replica.leader == replica.id


def current_term(replica: Replica) -> int:
    return replica.node.status().hard_state.term


def lead_of(replica: Replica) -> int:
    return replica.node.status().soft_state.lead
