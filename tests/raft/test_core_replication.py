"""Log replication beyond the paper: progress states, flow control, batching, the
uncommitted-size limit and snapshots."""

from __future__ import annotations

import logging

import pytest

from ww.raft.core import StateType
from ww.raft.errors import UncommittedSizeLimitError
from ww.raft.tracker import ProgressState
from ww.raft.types import Entry, HardState, Message, MessageType

MT = MessageType


def leader_with_replicating_followers(kit, **kw):
    """Node 1 leads (1, 2, 3); its empty entry is acknowledged, so 2 and 3 replicate."""
    r = kit.new_raft(1, **kw)
    r.become_candidate()
    r.become_leader()
    r.bcast_append()
    for m in r.read_messages():
        r.step(
            Message(type=MT.APP_RESP, frm=m.to, to=1, term=r.term, index=m.index + len(m.entries))
        )
    r.read_messages()
    assert r.prs.progress[2].state == ProgressState.REPLICATE
    return r


def propose(r, data=b"x"):
    r.step(Message(type=MT.PROP, frm=r.id, to=r.id, entries=(Entry(0, 0, data=data),)))


def apps_to(msgs, to):
    return [m for m in msgs if m.type == MT.APP and m.to == to]


# -- flow control -----------------------------------------------------------------------------


def test_appends_in_flight_are_bounded_by_max_inflight_msgs(kit):
    r = leader_with_replicating_followers(kit, max_inflight_msgs=3)
    sent = []
    for i in range(10):
        propose(r, b"%d" % i)
        sent += apps_to(r.read_messages(), 2)
    assert len(sent) == 3
    assert r.prs.progress[2].is_paused()
    # The first acknowledgement frees one slot: the rest goes out as one append.
    r.step(Message(type=MT.APP_RESP, frm=2, to=1, term=1, index=sent[0].entries[-1].index))
    (more,) = apps_to(r.read_messages(), 2)
    assert [e.data for e in more.entries] == [b"%d" % i for i in range(3, 10)]


def test_an_append_carries_at_most_max_size_per_msg_bytes_but_at_least_one_entry(kit):
    r = leader_with_replicating_followers(kit, max_size_per_msg=250)
    r.flush_appends()
    r.prs.progress[2].msg_app_flow_paused = True  # hold 2 back while the batch builds
    for _ in range(5):
        propose(r, b"a" * 100)
    r.read_messages()
    r.prs.progress[2].msg_app_flow_paused = False
    r.bcast_append()
    msgs = apps_to(r.read_messages(), 2)
    assert [len(m.entries) for m in msgs] == [2, 2, 1]  # 116 bytes counted per entry
    propose(r, b"b" * 1000)  # larger than the limit on its own: still sent
    (big,) = apps_to(r.read_messages(), 2)
    assert len(big.entries) == 1


def test_proposals_between_readys_go_out_as_one_append_per_follower(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    for i in range(100):
        c.nodes[1].propose(b"p%d" % i)
    rd = c.nodes[1].ready()
    apps = [m for m in rd.messages if m.type == MT.APP]
    assert sorted(m.to for m in apps) == [2, 3]
    assert all(len(m.entries) == 100 for m in apps)
    assert len(rd.entries) == 100


def test_an_unreachable_follower_is_probed_instead_of_streamed_to(kit):
    r = leader_with_replicating_followers(kit)
    r.step(Message(type=MT.UNREACHABLE, frm=2, to=1))
    pr = r.prs.progress[2]
    assert pr.state == ProgressState.PROBE
    propose(r, b"x")
    propose(r, b"y")
    assert len(apps_to(r.read_messages(), 2)) == 1  # one probe, then wait


def test_a_paused_probe_resumes_on_a_heartbeat_answer(kit):
    r = leader_with_replicating_followers(kit)
    r.step(Message(type=MT.UNREACHABLE, frm=2, to=1))
    propose(r, b"x")
    r.read_messages()
    propose(r, b"y")
    assert apps_to(r.read_messages(), 2) == []
    r.step(Message(type=MT.HEARTBEAT_RESP, frm=2, to=1, term=1))
    (m,) = apps_to(r.read_messages(), 2)
    assert [e.data for e in m.entries] == [b"x", b"y"]


def test_a_stale_rejection_does_not_move_next_back(kit):
    r = leader_with_replicating_followers(kit)
    for d in (b"a", b"b"):
        propose(r, d)
    r.read_messages()
    pr = r.prs.progress[2]
    r.step(Message(type=MT.APP_RESP, frm=2, to=1, term=1, index=3))
    before = (pr.match, pr.next)
    r.step(Message(type=MT.APP_RESP, frm=2, to=1, term=1, index=1, reject=True, reject_hint=1))
    assert (pr.match, pr.next) == before


def test_an_acknowledgement_past_the_leaders_log_is_dropped(kit):
    r = leader_with_replicating_followers(kit)
    r.step(Message(type=MT.APP_RESP, frm=2, to=1, term=1, index=99))
    assert r.prs.progress[2].match == 1
    assert r.stats.dropped_messages["app_resp_past_last_index"] == 1


# -- the uncommitted-size limit ---------------------------------------------------------------


def test_proposals_past_the_uncommitted_limit_are_refused_naming_the_limit(kit):
    r = leader_with_replicating_followers(kit, max_uncommitted_entries_size=1000)
    for _ in range(10):
        propose(r, b"a" * 100)
    with pytest.raises(UncommittedSizeLimitError) as e:
        propose(r, b"a" * 100)
    assert "max_uncommitted_entries_size=1000 bytes" in str(e.value)
    assert r.raft_log.last_index() == 11
    # Once committed and applied, the room is back.
    kit.persist_leader(r)
    r.step(Message(type=MT.APP_RESP, frm=2, to=1, term=1, index=11))
    ents = r.raft_log.next_committed_ents()
    r.advance((), None, ents)
    propose(r, b"a" * 100)
    assert r.raft_log.last_index() == 12


def test_one_oversized_proposal_is_accepted_when_nothing_is_uncommitted(kit):
    r = leader_with_replicating_followers(kit, max_uncommitted_entries_size=10)
    propose(r, b"a" * 100)
    assert r.raft_log.last_index() == 2
    with pytest.raises(UncommittedSizeLimitError):
        propose(r, b"b")


def test_the_limit_refuses_on_the_rawnode_and_counts_it(kit):
    c = kit.Cluster([1, 2, 3], max_uncommitted_entries_size=64)
    c.elect(1)
    c.nodes[1].propose(b"a" * 64)
    with pytest.raises(UncommittedSizeLimitError):
        c.nodes[1].propose(b"b")
    assert c.nodes[1].stats.dropped_proposals == 1
    c.stabilize()
    c.nodes[1].propose(b"b")


# -- snapshots --------------------------------------------------------------------------------


def compact_leader(c, i):
    """Snapshot node i at its applied index and drop the log before it."""
    s = c.storage[i]
    applied = c.raft(i).raft_log.applied
    s.create_snapshot(applied, c.conf[i], b"state@%d" % applied)
    s.compact(applied)
    return applied


def test_a_follower_too_far_behind_gets_a_snapshot_installs_it_and_resumes(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for i in range(20):
        c.nodes[1].propose(b"e%d" % i)
        c.stabilize()
    snap_index = compact_leader(c, 1)
    c.heal()
    c.tick(2)
    snaps = [m for m in c.sent if m.type == MT.SNAP and m.to == 3]
    assert len(snaps) == 1
    assert snaps[0].snapshot.metadata.index == snap_index
    assert snaps[0].snapshot.data == b"state@%d" % snap_index
    installed = [rd.snapshot for i, rd in c.readys if i == 3 and rd.snapshot is not None]
    assert [s.metadata.index for s in installed] == [snap_index]
    assert c.storage[3].first_index() == snap_index + 1
    c.nodes[1].propose(b"after")
    c.stabilize()
    assert c.data_applied(3)[-1] == b"after"
    assert c.raft(1).prs.progress[3].state == ProgressState.REPLICATE


def test_a_failed_snapshot_report_makes_the_leader_send_it_again(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for i in range(5):
        c.nodes[1].propose(b"e%d" % i)
    c.stabilize()
    compact_leader(c, 1)
    c.heal()
    c.ignore.add(MT.SNAP)  # the transport loses it...
    c.snapshot_reports = False
    c.tick(2)
    pr = c.raft(1).prs.progress[3]
    assert pr.state == ProgressState.SNAPSHOT
    c.nodes[1].report_snapshot(3, False)  # ...and says so
    assert pr.state == ProgressState.PROBE
    c.ignore.clear()
    c.tick(2)
    assert c.storage[3].snapshot().metadata.index > 0
    assert pr.state == ProgressState.REPLICATE


def test_a_lost_snapshot_nobody_reports_is_resent_after_the_snapshot_timeout(kit):
    c = kit.Cluster([1, 2, 3], snapshot_timeout_tick=15)
    c.elect(1)
    c.isolate(3)
    for i in range(5):
        c.nodes[1].propose(b"e%d" % i)
    c.stabilize()
    compact_leader(c, 1)
    c.heal()
    c.ignore.add(MT.SNAP)
    c.snapshot_reports = False
    c.tick(2)
    pr = c.raft(1).prs.progress[3]
    assert pr.state == ProgressState.SNAPSHOT
    c.ignore.clear()
    c.tick(10)
    assert pr.state == ProgressState.SNAPSHOT  # still waiting
    c.tick(10)
    assert c.storage[3].snapshot().metadata.index > 0
    assert pr.state == ProgressState.REPLICATE


def test_a_snapshot_whose_answer_was_lost_is_confirmed_by_the_heartbeat(kit):
    c = kit.Cluster([1, 2, 3], snapshot_timeout_tick=0)
    c.elect(1)
    c.isolate(3)
    for i in range(5):
        c.nodes[1].propose(b"e%d" % i)
    c.stabilize()
    compact_leader(c, 1)
    c.heal()
    c.snapshot_reports = False
    lost = []

    def lose_the_answer_to_the_snapshot(m):
        installed = c.storage[3].snapshot().metadata.index > 0
        if m.type == MT.APP_RESP and m.frm == 3 and installed and not lost:
            lost.append(m)
            return True
        return False

    c.drop_if = lose_the_answer_to_the_snapshot
    c.tick(1)
    pr = c.raft(1).prs.progress[3]
    assert lost and pr.state == ProgressState.SNAPSHOT
    c.tick(1)  # the heartbeat answer carries 3's commit index, past the snapshot
    assert pr.state == ProgressState.REPLICATE


def test_a_snapshot_older_than_the_commit_index_is_ignored(kit):
    r = kit.new_raft(2, storage=kit.storage_with((1, 2, 3), kit.ents(1, 1, 1)))
    r.become_follower(1, 1)
    r.raft_log.commit_to(3)
    snap = kit.Snapshot(b"old", kit.SnapshotMetadata(2, 1, kit.ConfState(voters=(1, 2, 3))))
    r.step(Message(type=MT.SNAP, frm=1, to=2, term=1, snapshot=snap))
    (resp,) = r.read_messages()
    assert (resp.type, resp.index) == (MT.APP_RESP, 3)
    assert not r.raft_log.has_pending_snapshot()


def test_a_snapshot_that_predates_the_node_is_installed_and_the_node_catches_up(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    for i in range(5):
        c.nodes[1].propose(b"e%d" % i)
    c.stabilize()
    snap_index = compact_leader(c, 1)  # a snapshot whose configuration lacks node 4
    c.add(4, kit.ConfState())
    cc = kit.ConfChange((kit.ConfChangeSingle(kit.ConfChangeType.ADD_LEARNER, 4),))
    c.nodes[1].propose_conf_change(cc)
    c.stabilize()
    c.tick(3)
    assert c.storage[4].snapshot().metadata.index == snap_index
    assert 4 not in c.storage[4].snapshot().metadata.conf_state.learners
    assert c.conf[4].learners == (4,)  # from the conf change after the snapshot
    c.nodes[1].propose(b"new")
    c.stabilize()
    assert c.data_applied(4)[-1] == b"new"


def test_learners_receive_the_log_but_do_not_count_for_commit(kit):
    n = kit.Network(
        kit.new_raft(1, (1, 2), learners=(3,)),
        kit.new_raft(2, (1, 2), learners=(3,)),
        kit.new_raft(3, (1, 2), learners=(3,)),
    )
    n.campaign(1)
    n.propose(1, b"x")
    assert kit.log_of(n.raft(3))[-1][2] == b"x"
    n.cut(1, 2)
    n.propose(1, b"y")
    r1 = n.raft(1)
    assert kit.log_of(n.raft(3))[-1][2] == b"y"
    assert r1.raft_log.committed == 2  # y is on 1 and the learner only
    assert r1.state == StateType.LEADER


def test_proposals_made_together_on_a_follower_are_forwarded_as_one_message(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    for i in range(50):
        c.nodes[2].propose(b"f%d" % i)
    rd = c.nodes[2].ready()
    (prop,) = [m for m in rd.messages if m.type == MT.PROP]
    assert prop.to == 1 and len(prop.entries) == 50
    c.inbox.extend(rd.messages)
    c.nodes[2].advance(rd)
    c.stabilize()
    assert c.data_applied(3)[-50:] == [b"f%d" % i for i in range(50)]


def test_a_batch_is_appended_whole_or_refused_whole(kit):
    c = kit.Cluster([1, 2, 3], max_uncommitted_entries_size=100)
    c.elect(1)
    c.nodes[1].propose_batch([b"a" * 40, b"b" * 40])
    last = c.raft(1).raft_log.last_index()
    with pytest.raises(UncommittedSizeLimitError):
        c.nodes[1].propose_batch([b"c" * 10, b"d" * 20])
    assert c.raft(1).raft_log.last_index() == last


def test_acknowledgements_handled_together_cost_one_append_per_follower(kit):
    r = leader_with_replicating_followers(kit)
    for d in (b"a", b"b", b"c"):
        propose(r, d)
        r.read_messages()  # three appends in flight to each follower
    # All six acknowledgements arrive before the next flush: the new commit index goes out
    # once per follower, not once per acknowledgement.
    for index in (2, 3, 4):
        for frm in (2, 3):
            r.step(Message(type=MT.APP_RESP, frm=frm, to=1, term=1, index=index))
    msgs = r.read_messages()
    assert sorted((m.to, m.commit, len(m.entries)) for m in msgs) == [(2, 4, 0), (3, 4, 0)]
    # With new entries to send, the commit index rides along: no empty append at all.
    propose(r, b"d")
    for frm in (2, 3):
        r.step(Message(type=MT.APP_RESP, frm=frm, to=1, term=1, index=4))
    msgs = r.read_messages()
    assert all(m.entries for m in msgs) and len(msgs) == 2


# -- a follower whose committed log disagrees ------------------------------------------------


def diverged_cluster(kit):
    """Node 2 committed index 3 at term 1 where the others have term 2 (possible only after a
    bug or lost storage); node 1 leads term 3 with node 3's vote."""
    rs = []
    for i, terms in ((1, (1, 1, 2)), (2, (1, 1, 1)), (3, (1, 1, 2))):
        s = kit.storage_with((1, 2, 3), kit.ents(*terms))
        s.set_hard_state(HardState(term=2, commit=3))
        rs.append(kit.new_raft(i, storage=s))
    return rs


def run_until_quiet(kit, rafts, first, limit=10_000):
    """Deliver messages between `rafts` (no clock) until none is left or `limit` went by;
    returns the messages delivered."""
    by_id = {r.id: r for r in rafts}
    queue = list(first)
    delivered = []
    while queue and len(delivered) < limit:
        m = queue.pop(0)
        delivered.append(m)
        to = by_id[m.to]
        to.step(m)
        queue.extend(kit.read_messages(to))
    return delivered


def test_a_diverged_follower_is_reported_once_and_not_replicated_to(kit, caplog):
    rafts = diverged_cluster(kit)
    leader = rafts[0]
    apps_to_2 = 0
    with caplog.at_level(logging.ERROR, logger="ww.raft.core"):
        leader.step(Message(type=MT.HUP, frm=1, to=1))
        sent = run_until_quiet(kit, rafts, kit.read_messages(leader))
        assert leader.state == StateType.LEADER
        for tick in range(30):  # heartbeats go on; appends to node 2 do not start again
            assert len(sent) < 50, f"{len(sent)} messages without the clock moving ({tick})"
            leader.tick()
            sent = run_until_quiet(kit, rafts, kit.read_messages(leader))
            apps_to_2 += sum(1 for m in sent if m.type == MT.APP and m.to == 2)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "node 2" in errors[0].getMessage() and "diverge" in errors[0].getMessage()
    assert leader.prs.progress[2].diverged
    assert apps_to_2 == 0
    # The healthy follower still gets everything.
    kit.persist_leader(leader)
    leader.step(Message(type=MT.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"x"),)))
    run_until_quiet(kit, rafts, kit.read_messages(leader))
    assert rafts[2].raft_log.last_index() == leader.raft_log.last_index()
    assert leader.raft_log.committed == leader.raft_log.last_index()
