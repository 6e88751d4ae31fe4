"""Raft under simulated faults: many seeded runs of the deterministic simulator.

    pytest tests/raft/test_simulation.py                        # the default seeds
    RAFT_SIM_SEEDS=10000 pytest tests/raft/test_simulation.py   # a soak (seeds 0..9999)
    RAFT_SIM_FIRST_SEED=10000 RAFT_SIM_SEEDS=5000 pytest ...     # the next 5000
    RAFT_SIM_SEED=1234 pytest tests/raft/test_simulation.py -k replay   # one seed again

Each run checks the safety invariants after every Ready, liveness after the faults end, and
the linearizability of the client history (see tests/raft/sim/).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from sim.cluster import ELECTION_TICK, Cluster, SimOptions, current_term, is_leader, lead_of
from sim.kv import encode
from sim.linearizability import check_kv
from sim.network import Faults
from sim.scenario import LIVENESS_BOUND, RunStats, Scenario

from ww.raft.read_only import ReadOnlyOption
from ww.raft.types import ConfChangeSingle, ConfChangeType

DEFAULT_SEEDS = 200
SEEDS_PER_BATCH = 25


def _seed_count() -> int:
    return int(os.environ.get("RAFT_SIM_SEEDS", DEFAULT_SEEDS))


def run_seed(seed: int) -> RunStats:
    with tempfile.TemporaryDirectory(prefix=f"raft-sim-{seed}-") as tmp:
        try:
            return Scenario(seed, Path(tmp)).run()
        except Exception as e:
            raise AssertionError(
                f"seed {seed} failed: {e}\n"
                f"replay: RAFT_SIM_SEED={seed} pytest tests/raft/test_simulation.py -k replay"
            ) from e


def _batches() -> list[range]:
    first = int(os.environ.get("RAFT_SIM_FIRST_SEED", 0))
    end = first + _seed_count()
    return [range(lo, min(lo + SEEDS_PER_BATCH, end)) for lo in range(first, end, SEEDS_PER_BATCH)]


@pytest.mark.parametrize("seeds", _batches(), ids=lambda r: f"seeds{r.start}-{r.stop - 1}")
def test_random_faults_keep_raft_safe_live_and_linearizable(seeds: range) -> None:
    started = time.monotonic()
    stats = [run_seed(seed) for seed in seeds]
    # The runs must actually exercise what they claim to (checked on a whole batch).
    if len(stats) < SEEDS_PER_BATCH:
        return
    assert sum(s.crashes for s in stats) > 0
    assert sum(s.crashes_in_save for s in stats) > 0
    assert sum(s.partitions for s in stats) > 0
    assert sum(s.snapshots_sent for s in stats) > 0
    assert sum(s.conf_changes for s in stats) > 0
    assert sum(s.ops - s.unknown for s in stats) > 10 * len(stats)
    assert max(s.recovery_ticks for s in stats) <= LIVENESS_BOUND
    print(
        f"{len(stats)} seeds in {time.monotonic() - started:.1f} s; "
        f"max recovery {max(s.recovery_ticks for s in stats)} ticks"
    )


def test_replay_one_seed() -> None:
    """Replays the seed in RAFT_SIM_SEED (seed 0 when unset), printing what it did."""
    stats = run_seed(int(os.environ.get("RAFT_SIM_SEED", 0)))
    print(stats)


# -- scenarios ------------------------------------------------------------------------------


def _settled(seed: int, tmp: Path, nodes: int = 3) -> Cluster:
    c = Cluster(seed, SimOptions(nodes=nodes, disk=False), tmp)
    for _ in range(100):
        c.tick()
    assert c.leader() is not None
    return c


def test_a_rejoining_partitioned_follower_does_not_unseat_a_healthy_leader(tmp_path: Path) -> None:
    c = _settled(1, tmp_path)
    leader = c.leader()
    assert leader is not None and leader.replica is not None
    term = current_term(leader.replica)
    follower = next(n for n in c.alive() if n is not leader)
    c.net.isolate(follower.id)
    for _ in range(10 * ELECTION_TICK):
        c.tick()
    assert follower.replica is not None
    assert not is_leader(follower.replica)
    c.net.heal()
    for _ in range(10 * ELECTION_TICK):
        c.tick()
    assert c.leader() is leader
    assert current_term(leader.replica) == term
    assert lead_of(follower.replica) == leader.id


def test_a_restarted_node_far_behind_catches_up_through_a_snapshot(tmp_path: Path) -> None:
    c = Cluster(3, SimOptions(nodes=3, disk=True, snapshot_interval=5), tmp_path)
    sent: list[int] = []
    c.on_outcome = lambda node, out: sent.extend(
        m.to for m in out.messages if m.snapshot is not None
    )
    for _ in range(100):
        c.tick()
    leader = c.leader()
    assert leader is not None and leader.replica is not None
    lagger = next(n for n in c.alive() if n is not leader)
    c.crash(lagger)
    for i in range(40):
        c.submit(0, leader, "put", "k", i)
        c.tick()
    c.start(lagger)
    for _ in range(100):
        c.tick()
    assert lagger.id in sent
    assert lagger.replica is not None and lagger.replica.applied == leader.replica.applied
    assert lagger.sm.data == leader.sm.data
    c.close()


def test_liveness_after_a_long_partition_of_the_leader(tmp_path: Path) -> None:
    c = _settled(5, tmp_path, nodes=5)
    old = c.leader()
    assert old is not None
    c.net.isolate(old.id)
    start = c.now
    while True:
        new = c.leader()
        if new is not None and new is not old:
            break
        c.tick()
        assert c.now - start <= LIVENESS_BOUND
    assert new.replica is not None
    assert c.submit(0, new, "put", "k", 1)
    while c.requests:
        c.tick()
        assert c.now - start <= LIVENESS_BOUND
    c.net.heal()
    for _ in range(50):
        c.tick()
    assert old.replica is not None and not is_leader(old.replica)
    assert check_kv(c.history) == []


def test_the_simulation_is_deterministic(tmp_path: Path) -> None:
    a = Scenario(11, tmp_path / "a").run()
    b = Scenario(11, tmp_path / "b").run()
    assert a == b


def test_a_diverging_log_is_caught(tmp_path: Path) -> None:
    """The checker must notice a committed entry that changes."""
    c = _settled(2, tmp_path)
    leader = c.leader()
    assert leader is not None
    c.submit(0, leader, "put", "k", 1)
    for _ in range(20):
        c.tick()
    index = max(c.committed)
    term, typ, data = c.committed[index]
    with pytest.raises(AssertionError, match="committed there"):
        c._check_committed(leader, index, term + 1, typ, data)


def test_a_node_joining_before_any_compaction_learns_the_configuration(tmp_path: Path) -> None:
    c = Cluster(4, SimOptions(nodes=3, disk=False, snapshot_interval=1000), tmp_path)
    for _ in range(100):
        c.tick()
    leader = c.leader()
    assert leader is not None and leader.replica is not None
    assert leader.storage.first_index() == 1  # nothing compacted: no snapshot to send
    joiner = c.add_node(4)
    assert c.propose_conf_change(leader, ConfChangeSingle(ConfChangeType.ADD_LEARNER, 4))
    for _ in range(50):
        c.tick()
    assert joiner.replica is not None
    assert joiner.replica.conf_state.learners == (4,)
    assert joiner.replica.applied == leader.replica.applied


def test_a_vote_survives_a_restart(tmp_path: Path) -> None:
    c = Cluster(6, SimOptions(nodes=3, disk=True), tmp_path)
    for _ in range(100):
        c.tick()
    leader = c.leader()
    assert leader is not None
    candidate, voter = (n for n in c.alive() if n is not leader)
    c.net.isolate(leader.id)
    for _ in range(3 * ELECTION_TICK):
        c.tick()  # the followers' lease on the old leader runs out
    assert candidate.replica is not None
    candidate.replica.node.campaign()
    while c.leader() in (None, leader):
        c.tick()
    new_leader = c.leader()
    assert new_leader is not None and new_leader.replica is not None
    term = current_term(new_leader.replica)
    assert voter.replica is not None
    assert voter.replica.node.status().hard_state.vote == new_leader.id
    c.crash(voter)
    c.start(voter)
    assert voter.replica is not None
    hard_state = voter.replica.node.status().hard_state
    assert (hard_state.term, hard_state.vote) == (term, new_leader.id)
    c.close()


def test_a_duplicated_forwarded_proposal_is_applied_twice_but_takes_effect_once(
    tmp_path: Path,
) -> None:
    """Raft applies a proposal at least once: the leader appends a forwarded proposal the
    network delivered twice. The command's id makes the second application a no-op."""
    c = _settled(7, tmp_path)
    leader = c.leader()
    follower = next(n for n in c.alive() if n is not leader)
    c.net.faults = Faults(duplicate=1.0)
    c.submit(0, follower, "put", "k", 1)
    c.submit(0, follower, "cas", "k", (1, 2))
    while c.requests:
        c.tick()
    c.net.faults = Faults()
    for _ in range(20):
        c.tick()
    cas = [e for e in c.committed.values() if e[2][16:] == encode("cas", "k", 1, 2, op_id=2)]
    assert len(cas) == 2
    assert follower.sm.data["k"] == 2
    assert [op.result for op in c.history] == [None, True]


@pytest.mark.parametrize("phase", range(ELECTION_TICK))
def test_a_cut_off_leader_serves_no_stale_lease_read(tmp_path: Path, phase: int) -> None:
    """Every node ticks in lockstep (perfect clocks) and messages arrive within the tick. The
    leader is cut off `phase` ticks into its check-quorum period; the others elect a new
    leader and write x=2. Reads on the old leader, asked every tick while it still thinks it
    leads, must never return x=1 once x=2 is written: its lease must end before anyone else
    can be elected."""
    options = SimOptions(
        nodes=3,
        disk=False,
        read_only_option=ReadOnlyOption.LEASE_BASED,
        same_tick_delivery=True,
    )
    c = Cluster(9, options, tmp_path)
    for _ in range(100):
        c.tick()
    old = c.leader()
    assert old is not None and old.replica is not None
    assert c.submit(0, old, "put", "x", 1)
    while c.requests:
        c.tick()
    while old.replica.node.raft.election_elapsed != phase:
        c.tick()
    c.net.isolate(old.id)
    lease_reads = 0
    wrote = False
    for _ in range(4 * ELECTION_TICK):
        if is_leader(old.replica) and not any(r.node == old.id for r in c.requests.values()):
            lease_reads += c.submit(1, old, "read", "x", None)
        new = c.leader()
        if new is not None and new is not old and not wrote:
            wrote = c.submit(2, new, "put", "x", 2)
        c.tick()
    assert wrote and lease_reads > 0
    while c.requests:
        c.tick()
    assert check_kv(c.history) == []
    put_done = next(op.ret for op in c.history if op.kind == "put" and op.arg == 2)
    assert put_done is not None
    stale = [op for op in c.history if op.kind == "get" and op.call > put_done and op.result == 1]
    assert stale == []
