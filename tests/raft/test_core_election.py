"""Elections beyond the paper: pre-vote, check-quorum and the leader lease, leadership
transfer."""

from __future__ import annotations

from ww.raft.core import CAMPAIGN_TRANSFER, StateType
from ww.raft.errors import ProposalDroppedError
from ww.raft.types import NONE, Message, MessageType

MT = MessageType
F, C, P, L = StateType.FOLLOWER, StateType.CANDIDATE, StateType.PRE_CANDIDATE, StateType.LEADER


def states(n):
    return {i: n.raft(i).state for i in n.peers}


# -- pre-vote ---------------------------------------------------------------------------------


def test_a_partitioned_node_that_rejoins_does_not_unseat_the_leader_with_pre_vote(kit):
    n = kit.Network.of(3, pre_vote=True)
    n.campaign(1)
    assert states(n) == {1: L, 2: F, 3: F}
    n.isolate(3)
    n.tick(100, only=[3])  # many election timeouts alone
    r3 = n.raft(3)
    assert r3.state == P
    assert r3.term == 1  # a pre-candidate never raises its term
    n.recover()
    n.tick(3)
    assert states(n) == {1: L, 2: F, 3: F}
    assert [n.raft(i).term for i in (1, 2, 3)] == [1, 1, 1]
    assert r3.lead == 1


def test_without_pre_vote_the_rejoining_node_does_unseat_the_leader(kit):
    n = kit.Network.of(3, pre_vote=False)
    n.campaign(1)
    n.isolate(3)
    n.tick(100, only=[3])
    assert n.raft(3).state == C
    assert n.raft(3).term > 1
    n.recover()
    n.campaign(3)  # its next election reaches the leader, which must adopt the higher term
    assert n.raft(1).state == F
    assert n.raft(1).term == n.raft(3).term > 1


def test_a_pre_vote_changes_neither_term_nor_vote_of_the_voters(kit):
    n = kit.Network.of(3, pre_vote=True)
    n.ignore(MT.VOTE)  # stop after the pre-vote round
    n.campaign(1)
    assert n.raft(1).state == C  # pre-vote won, real election started at term 1
    for i in (2, 3):
        assert n.raft(i).term == 0
        assert n.raft(i).vote == NONE


def test_a_pre_candidate_with_a_stale_log_is_refused_and_gives_up(kit):
    n = kit.Network.of(3, pre_vote=True)
    n.campaign(1)
    n.isolate(3)
    n.propose(1, b"x")  # 3 misses it
    n.recover()
    n.ignore(MT.APP)
    n.ignore(MT.HEARTBEAT)
    n.raft(1).become_follower(1, NONE)  # pretend the leader vanished; 2 keeps its log
    n.raft(2).become_follower(1, NONE)
    n.campaign(3)
    assert n.raft(3).state == F
    assert n.raft(3).term == 1


# -- check-quorum and the lease ---------------------------------------------------------------


def test_a_leader_without_a_live_quorum_steps_down(kit):
    n = kit.Network.of(3, check_quorum=True)
    n.campaign(1)
    n.isolate(1)
    r1 = n.raft(1)
    n.tick(r1.election_timeout, only=[1])
    assert r1.state == L  # the first check still counts the followers active at election
    n.tick(r1.election_timeout, only=[1])
    assert r1.state == F
    assert r1.lead == NONE


def test_a_leader_with_a_live_quorum_stays(kit):
    n = kit.Network.of(3, check_quorum=True)
    n.campaign(1)
    n.isolate(3)
    n.tick(5 * n.raft(1).election_timeout, only=[1])
    assert n.raft(1).state == L


def test_a_follower_in_the_lease_of_a_live_leader_ignores_vote_requests(kit):
    n = kit.Network.of(3, check_quorum=True)
    n.campaign(1)
    r2 = n.raft(2)
    vote = Message(type=MT.VOTE, frm=3, to=2, term=5, index=10, log_term=5)
    r2.step(vote)
    assert r2.read_messages() == []
    assert r2.term == 1 and r2.lead == 1
    assert r2.stats.dropped_messages["vote_in_lease"] == 1
    # Once the election timeout passed without word from the leader, the lease is over.
    for _ in range(r2.election_timeout):
        r2.tick()
    r2.read_messages()
    r2.step(vote)
    (resp,) = r2.read_messages()
    assert (resp.type, resp.term, resp.reject) == (MT.VOTE_RESP, 5, False)


def test_a_transfer_campaign_overrides_the_lease(kit):
    n = kit.Network.of(3, check_quorum=True)
    n.campaign(1)
    r2 = n.raft(2)
    r2.step(
        Message(type=MT.VOTE, frm=3, to=2, term=2, index=1, log_term=1, context=CAMPAIGN_TRANSFER)
    )
    (resp,) = r2.read_messages()
    assert (resp.type, resp.reject) == (MT.VOTE_RESP, False)


def test_a_stuck_candidate_is_ignored_within_the_lease_and_freed_by_the_next_heartbeat(kit):
    # Without pre-vote an isolated node campaigns at ever higher terms (etcd's
    # TestFreeStuckCandidateWithCheckQuorum).
    n = kit.Network.of(3, check_quorum=True)
    n.campaign(1)
    n.isolate(3)
    n.tick(100, only=[3])
    r1, r3 = n.raft(1), n.raft(3)
    assert r3.state == C and r3.term > r1.term
    n.recover()
    n.campaign(3)  # its vote requests fall within the lease: 1 and 2 ignore them
    assert r1.state == L and r1.term == 1
    assert r3.state == C
    # The leader's next heartbeat is answered with the higher term: it steps down, so the
    # stuck node is not locked out forever.
    n.send(Message(type=MT.BEAT, frm=1, to=1))
    assert r1.state == F and r1.term == r3.term
    n.campaign(3)
    assert r3.state == L


# -- leadership transfer ----------------------------------------------------------------------


def test_leadership_moves_to_an_up_to_date_follower_at_once(kit):
    n = kit.Network.of(3, check_quorum=True, pre_vote=True)
    n.campaign(1)
    n.send(Message(type=MT.TRANSFER_LEADER, frm=2, to=1))
    assert states(n) == {1: F, 2: L, 3: F}
    assert n.raft(2).term == 2
    assert any(m.type == MT.TIMEOUT_NOW and m.to == 2 for m in n.delivered)


def test_a_lagging_transferee_is_caught_up_before_timeout_now(kit):
    n = kit.Network.of(3)
    n.campaign(1)
    n.isolate(3)
    n.propose(1, b"x")
    n.recover()
    n.send(Message(type=MT.TRANSFER_LEADER, frm=3, to=1))
    assert n.raft(3).state == L
    assert [e[2] for e in kit.log_of(n.raft(3))][:2] == [b"", b"x"]


def test_proposals_are_dropped_while_a_transfer_is_under_way(kit):
    n = kit.Network.of(3)
    n.campaign(1)
    n.isolate(3)
    r1 = n.raft(1)
    n.send(Message(type=MT.TRANSFER_LEADER, frm=3, to=1))
    assert r1.lead_transferee == 3
    try:
        r1.step(Message(type=MT.PROP, frm=1, to=1, entries=(kit.Entry(0, 0, data=b"x"),)))
    except ProposalDroppedError as e:
        assert "transferred to 3" in str(e)
    else:
        raise AssertionError("proposal accepted during a transfer")


def test_a_transfer_that_does_not_finish_within_an_election_timeout_is_abandoned(kit):
    n = kit.Network.of(3)
    n.campaign(1)
    n.isolate(3)
    r1 = n.raft(1)
    n.send(Message(type=MT.TRANSFER_LEADER, frm=3, to=1))
    n.tick(r1.election_timeout, only=[1])
    assert r1.lead_transferee == NONE
    assert r1.state == L
    n.propose(1, b"after")
    assert kit.log_of(r1)[-1][2] == b"after"


def test_transfers_to_self_or_to_a_learner_are_ignored(kit):
    n = kit.Network(
        kit.new_raft(1, (1, 2), learners=(3,)),
        kit.new_raft(2, (1, 2), learners=(3,)),
        kit.new_raft(3, (1, 2), learners=(3,)),
    )
    n.campaign(1)
    n.send(Message(type=MT.TRANSFER_LEADER, frm=1, to=1))
    n.send(Message(type=MT.TRANSFER_LEADER, frm=3, to=1))
    assert n.raft(1).state == L and n.raft(1).lead_transferee == NONE
    assert n.raft(1).stats.dropped_messages["transfer_to_learner"] == 1


def test_a_follower_forwards_a_transfer_request_to_the_leader(kit):
    n = kit.Network.of(3)
    n.campaign(1)
    n.send(Message(type=MT.TRANSFER_LEADER, frm=3, to=2))
    assert n.raft(3).state == L


def test_a_learner_never_campaigns(kit):
    r = kit.new_raft(3, (1, 2), learners=(3,))
    for _ in range(100):
        r.tick()
    assert r.state == F
    assert r.read_messages() == []
    r.step(Message(type=MT.TIMEOUT_NOW, frm=1, to=3, term=1))
    assert r.state == F


def test_with_pre_vote_and_check_quorum_the_survivors_elect_a_new_leader_in_bounded_time(kit):
    n = kit.Network.of(3, pre_vote=True, check_quorum=True)
    n.campaign(1)
    n.isolate(1)  # the leader dies
    et = n.raft(2).election_timeout
    ticks = 0
    while L not in (n.raft(2).state, n.raft(3).state) and ticks < 4 * et:
        n.tick(1, only=[2, 3])
        ticks += 1
    assert {n.raft(2).state, n.raft(3).state} == {L, F}
    assert ticks < 3 * et  # one randomized timeout plus the lease
    assert max(n.raft(2).term, n.raft(3).term) == 2  # pre-vote wasted no terms


def test_a_transferee_that_needs_a_snapshot_gets_it_then_takes_over(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for i in range(10):
        c.nodes[1].propose(b"e%d" % i)
    c.stabilize()
    applied = c.raft(1).raft_log.applied
    c.storage[1].create_snapshot(applied, c.conf[1], b"snap")
    c.storage[1].compact(applied)
    c.heal()
    c.nodes[1].transfer_leader(3)
    c.stabilize()
    assert any(m.type == MT.SNAP and m.to == 3 for m in c.sent)
    assert c.raft(3).state == L
    assert c.raft(1).state == F and c.raft(1).lead == 3


def test_repeating_a_transfer_does_not_extend_its_deadline(kit):
    n = kit.Network.of(3)
    n.campaign(1)
    n.isolate(3)
    r1 = n.raft(1)
    n.send(Message(type=MT.TRANSFER_LEADER, frm=3, to=1))
    n.tick(r1.election_timeout // 2, only=[1])
    n.send(Message(type=MT.TRANSFER_LEADER, frm=3, to=1))
    n.tick(r1.election_timeout - r1.election_timeout // 2, only=[1])
    assert r1.lead_transferee == NONE
