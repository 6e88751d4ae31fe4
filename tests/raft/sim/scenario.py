"""One seeded simulation run: chaos, then healing, then the liveness and linearizability
verdicts.

Chaos: clients hammer the KV map through random nodes while the network drops, duplicates and
delays messages, partitions come and go, nodes crash and restart from their storage, learners
join, are promoted and voters are removed, and leadership is transferred. Healing: the network
becomes reliable, every member is restarted; within `LIVENESS_BOUND` ticks a leader must emerge
and a fresh proposal commit. Then every request still in flight settles, and the whole client
history must be linearizable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ww.raft.errors import RaftError
from ww.raft.read_only import ReadOnlyOption
from ww.raft.types import ConfChangeSingle, ConfChangeType

from .cluster import ELECTION_TICK, Cluster, InvariantViolation, SimNode, SimOptions, is_leader
from .kv import encode
from .linearizability import check_kv
from .network import Faults

LIVENESS_BOUND = 20 * ELECTION_TICK
"""Ticks from the end of all faults until a fresh proposal is applied on a leader."""

KEYS = ("a", "b", "c")
CLIENTS = 4
MAX_EXTRA_NODES = 3


@dataclass(slots=True)
class RunStats:
    seed: int
    nodes: int
    disk: bool
    ticks: int
    ops: int
    unknown: int
    crashes: int
    partitions: int
    conf_changes: int
    snapshots_sent: int
    recovery_ticks: int
    max_term: int
    crashes_in_save: int = 0


def options_for(seed: int) -> SimOptions:
    """3 or 5 voters (for one seed in five, a single voter with two learners), disk or memory
    storage, for one seed in four lease-based reads, and for one in two messages delivered
    within the tick they are sent in (which leaves a stale leader's lease the least room),
    chosen by the seed so that every combination comes round."""
    lease = (seed // 4) % 4 == 3
    single = (seed // 8) % 5 == 2
    return SimOptions(
        nodes=1 if single else 3 if seed % 2 == 0 else 5,
        learners=2 if single else 0,
        disk=seed % 4 < 2,
        read_only_option=ReadOnlyOption.LEASE_BASED if lease else ReadOnlyOption.SAFE,
        same_tick_delivery=(seed // 2) % 2 == 1,
    )


class Scenario:
    def __init__(self, seed: int, workdir: Path, chaos_ticks: int = 300) -> None:
        self.seed = seed
        self.rng = random.Random(seed ^ 0x5EED)
        faults = Faults(
            drop=self.rng.choice((0.0, 0.02, 0.1)),
            duplicate=self.rng.choice((0.0, 0.05)),
            max_delay=self.rng.choice((0, 2, 5)),
        )
        self.cluster = Cluster(seed, options_for(seed), workdir, faults)
        self.cluster.crash_in_save = self.rng.choice((0.0, 0.003, 0.01))
        self.chaos_ticks = chaos_ticks
        self.next_value = 0
        self.crashes = self.partitions = self.conf_changes = self.snapshots_sent = 0
        self.cluster.on_outcome = self._count_snapshots

    def _count_snapshots(self, node: SimNode, out: object) -> None:
        self.snapshots_sent += sum(
            1 for m in getattr(out, "messages", ()) if m.snapshot is not None
        )

    # -- chaos ------------------------------------------------------------------------------

    def _clients(self) -> None:
        c = self.cluster
        busy = c.busy_clients()
        for client in range(CLIENTS):
            if client in busy or self.rng.random() > 0.3:
                continue
            node = c.nodes[self.rng.choice(sorted(c.nodes))]
            kind = self.rng.choice(("put", "put", "cas", "get", "read", "read"))
            if self.rng.random() < 0.5:
                # On a node that thinks it leads, which may be cut off: reads answered there
                # from a lease must still be linearizable with writes through the new one.
                leaders = [n for n in c.alive() if n.replica is not None and is_leader(n.replica)]
                node = self.rng.choice(leaders) if leaders else node
            if node.replica is None:
                continue
            key = self.rng.choice(KEYS)
            arg: object = None
            if kind == "put":
                self.next_value += 1
                arg = self.next_value
            elif kind == "cas":
                self.next_value += 1
                arg = (
                    self.rng.choice((None, *range(max(1, self.next_value - 4), self.next_value))),
                    self.next_value,
                )
            c.submit(client, node, kind, key, arg)

    def _fault(self) -> None:
        c, r = self.cluster, self.rng.random()
        alive = c.alive()
        if r < 0.01 and alive:
            c.crash(self.rng.choice(alive))
            self.crashes += 1
        elif r < 0.02 and alive:
            # A quick restart, preferably in the middle of an election: whatever the node
            # said (a vote above all) must survive in its storage.
            electing = [n for n in alive if n.replica is not None and n.replica.leader == 0]
            node = self.rng.choice(electing or alive)
            c.crash(node)
            c.start(node)
            self.crashes += 1
        elif r < 0.05:
            down = [n for n in c.nodes.values() if n.replica is None]
            if down:
                c.start(self.rng.choice(down))
        elif r < 0.06:
            ids = sorted(c.nodes)
            self.rng.shuffle(ids)
            cut = self.rng.randint(1, len(ids) - 1)
            c.net.partition([ids[:cut]])
            self.partitions += 1
        elif r < 0.08:
            c.net.heal()
        elif r < 0.09:
            self._membership()
        elif r < 0.095:
            leader = c.leader()
            if leader is not None and leader.replica is not None:
                voters = [v for v in leader.replica.conf_state.voters if v != leader.id]
                if voters:
                    leader.replica.node.transfer_leader(self.rng.choice(voters))
        elif r < 0.1:
            leader = c.leader()
            if leader is not None:
                c.net.isolate(leader.id)  # the others elect a new leader; it may not know
                self.partitions += 1

    def _membership(self) -> None:
        """One membership change through the leader: a new node joins as a learner or a
        voter, a learner is promoted, a member is removed, or (through a joint
        configuration) a learner replaces a voter."""
        c = self.cluster
        leader = c.leader()
        if leader is None or leader.replica is None:
            return
        conf = leader.replica.conf_state
        voters, learners = conf.voters, conf.learners
        choice = self.rng.random()
        changes: list[ConfChangeSingle] = []
        if choice < 0.4 and len(c.nodes) < c.options.nodes + MAX_EXTRA_NODES:
            new_id = max(c.nodes) + 1
            c.add_node(new_id)
            kind = ConfChangeType.ADD_LEARNER if choice < 0.3 else ConfChangeType.ADD_NODE
            changes = [ConfChangeSingle(kind, new_id)]
        elif choice < 0.6 and learners:
            changes = [ConfChangeSingle(ConfChangeType.ADD_NODE, self.rng.choice(learners))]
        elif choice < 0.8 and learners and len(voters) >= 3:
            changes = [
                ConfChangeSingle(ConfChangeType.ADD_NODE, self.rng.choice(learners)),
                ConfChangeSingle(ConfChangeType.REMOVE_NODE, self.rng.choice(voters)),
            ]
        elif len(voters) > 3 or learners:
            target = self.rng.choice(voters if len(voters) > 3 else learners)
            changes = [ConfChangeSingle(ConfChangeType.REMOVE_NODE, target)]
        if changes:
            self.conf_changes += c.propose_conf_change(leader, *changes)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> RunStats:
        try:
            return self._run()
        finally:
            self.cluster.close()

    def _run(self) -> RunStats:
        c = self.cluster
        for _ in range(self.chaos_ticks):
            self._fault()
            self._clients()
            c.tick()
        recovery = self._heal()
        self._settle()
        bad = check_kv(c.history)
        if bad:
            raise InvariantViolation(f"seed {self.seed}: history not linearizable for keys {bad}")
        return RunStats(
            seed=self.seed,
            nodes=c.options.nodes,
            disk=c.options.disk,
            ticks=c.now,
            ops=len(c.history),
            unknown=sum(1 for op in c.history if op.ret is None),
            crashes=self.crashes,
            partitions=self.partitions,
            conf_changes=self.conf_changes,
            snapshots_sent=self.snapshots_sent,
            recovery_ticks=recovery,
            max_term=max(n.term for n in c.nodes.values()),
            crashes_in_save=c.crashes_in_save,
        )

    def _heal(self) -> int:
        """End all faults; return the ticks until a fresh proposal was applied on a leader."""
        c = self.cluster
        c.net.heal()
        c.net.faults = Faults.reliable()
        c.crash_in_save = 0.0
        for n in c.nodes.values():
            if n.replica is None:
                c.start(n)
        start = c.now
        marker: bytes | None = None
        marker_node: SimNode | None = None
        done = False

        def seen(node: SimNode, out: object) -> None:
            nonlocal done
            if node is marker_node and any(rid == marker for rid, _ in getattr(out, "results", ())):
                done = True

        c.on_outcome = seen
        while not done:
            if c.now - start > LIVENESS_BOUND:
                raise InvariantViolation(
                    f"seed {self.seed}: no proposal committed within {LIVENESS_BOUND} ticks "
                    f"of healing (tick {c.now})"
                )
            leader = c.leader()
            if leader is not None and leader is not marker_node and leader.replica is not None:
                try:
                    marker = leader.replica.propose(encode("put", "liveness", c.now))
                    marker_node = leader
                except RaftError:
                    pass
            c.tick()
        c.on_outcome = None
        return c.now - start

    def _settle(self) -> None:
        """Let every request in flight be answered or time out; then all live members must
        have applied the same log."""
        c = self.cluster
        while c.requests:
            c.tick()
        target = None
        for _ in range(LIVENESS_BOUND):
            leader = c.leader()
            if leader is not None and leader.replica is not None:
                members = set(leader.replica.conf_state.voters) | set(
                    leader.replica.conf_state.learners
                )
                target = leader.replica.applied
                if all(
                    c.nodes[m].replica is not None and c.nodes[m].replica.applied == target  # type: ignore[union-attr]
                    for m in members
                    if m in c.nodes
                ):
                    return
            c.tick()
        raise InvariantViolation(
            f"seed {self.seed}: members did not converge on applied index {target}"
        )


def leader_count(c: Cluster) -> int:
    return sum(1 for n in c.alive() if n.replica is not None and is_leader(n.replica))
