"""Linearizable reads: ReadIndex confirmed by a quorum's heartbeats, lease-based reads, and
a new leader holding reads back until it has committed an entry of its term."""

from __future__ import annotations

import random

import pytest

from ww.raft.core import LEASE_MARGIN_TICKS, Config
from ww.raft.errors import ConfigError
from ww.raft.memory import MemoryStorage
from ww.raft.rawnode import ReadState
from ww.raft.read_only import ReadOnlyOption
from ww.raft.types import ConfState, MessageType

MT = MessageType


def read_states(c, i):
    return [rs for j, rd in c.readys if j == i for rs in rd.read_states]


def test_a_read_on_the_leader_is_answered_once_a_quorum_acknowledges_a_heartbeat(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.nodes[1].propose(b"x")
    c.stabilize()
    commit = c.raft(1).raft_log.committed
    c.isolate(1)
    c.nodes[1].read_index(b"r1")
    c.stabilize()
    assert read_states(c, 1) == []  # no quorum has confirmed the leadership
    c.heal()
    c.nodes[1].read_index(b"r1")  # a retry rides the next heartbeats
    c.stabilize()
    assert read_states(c, 1) == [ReadState(commit, b"r1")]
    heartbeats = [m for m in c.sent if m.type == MT.HEARTBEAT and m.context == b"r1"]
    assert {m.to for m in heartbeats} == {2, 3}


def test_one_heartbeat_round_confirms_every_read_queued_before_it(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.ignore.add(MT.HEARTBEAT)
    for ctx in (b"a", b"b", b"c"):
        c.nodes[1].read_index(ctx)
    c.stabilize()
    c.ignore.clear()
    c.tick(1)  # the heartbeat carries the last context; its acks release all three
    assert [rs.request_ctx for rs in read_states(c, 1)] == [b"a", b"b", b"c"]


def test_a_read_on_a_follower_is_forwarded_and_answered_with_the_leaders_commit(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.nodes[2].propose(b"x")
    c.stabilize()
    c.nodes[2].read_index(b"from-2")
    c.stabilize()
    assert read_states(c, 2) == [ReadState(c.raft(1).raft_log.committed, b"from-2")]
    assert read_states(c, 1) == []


def lease_cluster(kit):
    """Three nodes with lease reads, past their first election timeout (until then a node
    grants no vote: it cannot know whether it heard a leader just before it started)."""
    c = kit.Cluster([1, 2, 3], read_only_option=ReadOnlyOption.LEASE_BASED)
    c.tick(10)
    assert c.leader() == 0
    return c


def test_a_lease_based_read_needs_no_heartbeat_round(kit):
    c = lease_cluster(kit)
    c.elect(1)
    c.tick(1)  # a quorum answers a heartbeat: the lease starts
    c.ignore.add(MT.HEARTBEAT)
    before = len(c.sent)
    c.nodes[1].read_index(b"lease")
    c.stabilize()
    assert read_states(c, 1) == [ReadState(c.raft(1).raft_log.committed, b"lease")]
    assert c.sent[before:] == []


def test_lease_based_reads_require_check_quorum():
    with pytest.raises(ConfigError, match="check_quorum"):
        Config(
            1,
            storage=MemoryStorage(ConfState(voters=(1,))),
            read_only_option=ReadOnlyOption.LEASE_BASED,
            check_quorum=False,
        ).validate()


@pytest.mark.parametrize("option", list(ReadOnlyOption))
def test_a_new_leader_serves_no_read_before_it_commits_an_entry_of_its_term(kit, option):
    c = lease_cluster(kit) if option == ReadOnlyOption.LEASE_BASED else kit.Cluster([1, 2, 3])
    c.stabilize()
    c.ignore.add(MT.APP)  # the new leader's empty entry cannot commit yet
    c.nodes[1].campaign()
    c.stabilize()
    r1 = c.raft(1)
    assert r1.state == kit.StateType.LEADER
    c.nodes[1].read_index(b"early")
    c.stabilize()
    assert read_states(c, 1) == []
    assert len(r1.pending_read_index_messages) == 1
    c.ignore.clear()
    c.tick(1)
    (rs,) = read_states(c, 1)
    assert rs.request_ctx == b"early"
    assert r1.raft_log.term(rs.index) == r1.term  # the read waits for the new term's entry


def test_a_single_voter_answers_a_read_at_once(kit):
    c = kit.Cluster([1])
    c.elect(1)
    c.nodes[1].read_index(b"solo")
    c.stabilize()
    assert read_states(c, 1) == [ReadState(c.raft(1).raft_log.committed, b"solo")]


def test_a_read_without_a_leader_is_dropped_and_counted(kit):
    c = kit.Cluster([1, 2, 3])
    c.stabilize()
    c.nodes[2].read_index(b"nobody")
    c.stabilize()
    assert read_states(c, 2) == []
    assert c.nodes[2].stats.dropped_messages["read_index_no_leader"] == 1


def test_the_lease_runs_from_the_acknowledged_heartbeats_send_tick(kit):
    """The lease starts when the heartbeats a quorum answered were sent, and ends
    LEASE_MARGIN_TICKS before an election timeout after that; then reads confirm with a quorum
    again."""
    c = lease_cluster(kit)
    c.elect(1)
    c.tick(1)
    r1 = c.raft(1)
    sent = r1.clock  # the heartbeats of this tick were answered
    assert r1.lease_valid()
    c.ignore.add(MT.HEARTBEAT_RESP)  # from now on no answer dates the lease again
    served = []
    for _ in range(12):
        c.tick(1, only=[1])
        ctx = b"%d" % r1.clock
        c.nodes[1].read_index(ctx)
        c.stabilize()
        if any(rs.request_ctx == ctx for rs in read_states(c, 1)):
            served.append(r1.clock - sent)
    assert served == list(range(1, r1.election_timeout - LEASE_MARGIN_TICKS))
    assert r1.lease_ticks == r1.election_timeout - LEASE_MARGIN_TICKS


def test_a_leader_that_hands_over_leadership_gives_up_its_lease(kit):
    c = lease_cluster(kit)
    c.elect(1)
    c.tick(1)
    assert c.raft(1).lease_valid()
    c.nodes[1].transfer_leader(2)
    assert not c.raft(1).lease_valid()
    c.stabilize()
    assert c.leader() == 2


def test_a_restarted_node_grants_no_vote_within_its_first_election_timeout(kit):
    """A restarted node cannot know whether it heard a leader just before it stopped: with
    lease reads on, it acts as if it had."""
    c = lease_cluster(kit)
    c.elect(1)
    c.tick(1)
    c.isolate(1)
    restarted = kit.RawNode(
        Config(
            2,
            storage=c.storage[2],
            read_only_option=ReadOnlyOption.LEASE_BASED,
            rng=random.Random(2),
        )
    )
    c.nodes[2] = restarted
    c.stabilize()
    c.nodes[3].raft.election_elapsed = 10  # node 3's own lease on node 1 ran out
    c.nodes[3].campaign()
    c.stabilize()
    assert c.raft(3).state != kit.StateType.LEADER
    assert restarted.stats.dropped_messages["vote_in_lease"] >= 1
    c.tick(10, only=[2, 3])  # past the hold, a new leader is elected without node 1
    assert c.leader() in (2, 3)
    assert c.raft(c.leader()).term > c.raft(1).term
