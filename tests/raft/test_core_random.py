"""Seeded random schedules on a small cluster of cores (no driver): messages dropped at
random, partitions come and go, proposals and membership changes arrive at any node. After
every step the safety properties must hold: one leader per term, committed entries never
change, every node applies a prefix of the same sequence."""

from __future__ import annotations

import contextlib
import random

import pytest

from ww.raft.core import StateType
from ww.raft.errors import RaftError
from ww.raft.types import ConfChange, ConfChangeSingle, ConfChangeType, ConfState


class Checker:
    def __init__(self, c) -> None:
        self.c = c
        self.leaders: dict[int, int] = {}
        self.committed: dict[int, tuple[int, int, bytes]] = {}

    def check(self) -> None:
        c = self.c
        for i, node in c.nodes.items():
            r = node.raft
            if r.state == StateType.LEADER:
                assert self.leaders.setdefault(r.term, i) == i, f"two leaders in term {r.term}"
        for i, applied in c.applied.items():
            for e in applied:
                if e.data == b"<snapshot>":
                    continue
                key = (e.term, int(e.type), e.data)
                assert self.committed.setdefault(e.index, key) == key, (
                    f"node {i} applied a different entry at {e.index}"
                )
            indices = [e.index for e in applied]
            assert indices == sorted(indices) and len(set(indices)) == len(indices)


def run(kit, seed: int, steps: int = 400) -> Checker:
    rng = random.Random(seed)
    c = kit.Cluster([1, 2, 3, 4, 5] if seed % 2 else [1, 2, 3])
    check = Checker(c)
    c.drop_if = lambda m: rng.random() < 0.1
    proposals = 0
    for _ in range(steps):
        action = rng.random()
        if action < 0.05:
            c.heal()
            a = rng.choice(list(c.nodes))
            c.isolate(a)
        elif action < 0.1:
            c.heal()
        elif action < 0.4:
            i = rng.choice(list(c.nodes))
            try:
                c.nodes[i].propose(b"%d:%d" % (seed, proposals))
                proposals += 1
            except RaftError:
                pass
        elif action < 0.42:
            leader = c.leader()
            voters = c.conf[leader].voters if leader else ()
            if leader and len(voters) > 3:
                cc = ConfChange((ConfChangeSingle(ConfChangeType.REMOVE_NODE, max(voters)),))
            elif leader:
                new = max(c.nodes) + 1
                c.add(new, ConfState())
                cc = ConfChange((ConfChangeSingle(ConfChangeType.ADD_NODE, new),))
            else:
                continue
            with contextlib.suppress(RaftError):  # one change at a time: may be refused
                c.nodes[leader].propose_conf_change(cc)
        c.tick(1)
        check.check()
    c.heal()
    c.drop_if = lambda m: False
    c.tick(60)
    check.check()
    leader = c.leader()
    assert leader, "no leader once the network is healed"
    members = set(c.conf[leader].voters)
    applied = {i: c.raft(i).raft_log.applied for i in members}
    assert len(set(applied.values())) == 1, f"members did not converge: {applied}"
    return check


@pytest.mark.parametrize("seed", range(10))
def test_random_schedules_keep_the_cluster_safe_and_it_recovers(kit, seed):
    check = run(kit, seed)
    assert len(check.committed) > 20
