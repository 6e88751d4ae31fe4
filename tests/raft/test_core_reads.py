"""Linearizable reads: ReadIndex confirmed by a quorum's heartbeats, lease-based reads, and
a new leader holding reads back until it has committed an entry of its term."""

from __future__ import annotations

import pytest

from ww.raft.core import Config
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


def test_a_lease_based_read_needs_no_heartbeat_round(kit):
    c = kit.Cluster([1, 2, 3], read_only_option=ReadOnlyOption.LEASE_BASED)
    c.elect(1)
    c.ignore.add(MT.HEARTBEAT)
    c.nodes[1].read_index(b"lease")
    c.stabilize()
    assert read_states(c, 1) == [ReadState(c.raft(1).raft_log.committed, b"lease")]
    assert not any(m.type == MT.HEARTBEAT for m in c.sent[-5:])


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
    c = kit.Cluster([1, 2, 3], read_only_option=option)
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
