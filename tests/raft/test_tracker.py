"""Progress states, the inflight window and the tracker's tallies."""

from __future__ import annotations

import pytest

from ww.raft.quorum import JointConfig, VoteResult
from ww.raft.tracker import Inflights, Progress, ProgressState, ProgressTracker


def progress(match=0, next_=1, state=ProgressState.PROBE, size=4):
    p = Progress(match=match, next=next_, inflights=Inflights(size))
    p.state = state
    return p


def test_inflights_fill_up_and_free_in_order():
    f = Inflights(3)
    for i in (5, 7, 9):
        assert not f.full()
        f.add(i, 10)
    assert f.full()
    with pytest.raises(OverflowError):
        f.add(11, 1)
    f.free_le(6)
    assert f.count() == 2 and not f.full()
    f.free_le(100)
    assert f.count() == 0 and f.bytes == 0


def test_inflights_are_also_bounded_by_bytes():
    f = Inflights(100, max_bytes=50)
    f.add(1, 30)
    assert not f.full()
    f.add(2, 20)
    assert f.full()
    f.free_le(1)
    assert f.bytes == 20 and not f.full()


def test_probe_sends_one_append_then_waits():
    p = progress(match=3, next_=4)
    assert not p.is_paused()
    p.sent_entries(2, 20, last_index=5)
    assert p.is_paused()
    assert p.next == 4  # probing does not advance next optimistically
    assert p.maybe_update(5)
    assert not p.is_paused()
    assert (p.match, p.next) == (5, 6)


def test_replicate_advances_next_optimistically_until_the_window_is_full():
    p = progress(match=3, next_=4, size=2)
    p.become_replicate()
    p.sent_entries(2, 20, last_index=5)
    assert p.next == 6 and not p.is_paused()
    p.sent_entries(1, 10, last_index=6)
    assert p.next == 7 and p.is_paused()
    p.maybe_update(5)
    p.inflights.free_le(5)
    assert p.inflights.count() == 1


def test_a_rejection_in_replicate_falls_back_to_just_after_match():
    p = progress(match=3, next_=10)
    p.become_replicate()
    p.next = 10
    assert not p.maybe_decr_to(rejected=2, match_hint=2)  # stale: below match
    assert p.maybe_decr_to(rejected=7, match_hint=5)
    assert p.next == 4


def test_a_rejection_in_probe_uses_the_hint_but_not_below_match():
    p = progress(match=2, next_=10)
    assert not p.maybe_decr_to(rejected=8, match_hint=4)  # not the probe we sent
    assert p.maybe_decr_to(rejected=9, match_hint=4)
    assert p.next == 5
    p.next = 10
    assert p.maybe_decr_to(rejected=9, match_hint=0)
    assert p.next == 3  # never below match + 1


def test_leaving_snapshot_state_resumes_after_the_snapshot():
    p = progress(match=3, next_=4)
    p.become_snapshot(20)
    assert p.is_paused() and p.pending_snapshot == 20
    p.become_probe()
    assert p.state == ProgressState.PROBE
    assert p.next == 21 and p.pending_snapshot == 0


def test_an_update_that_is_no_news_reports_false():
    p = progress(match=5, next_=6)
    assert not p.maybe_update(4)
    assert not p.maybe_update(5)
    assert p.match == 5


def tracker(voters, outgoing=(), learners=()):
    t = ProgressTracker(4)
    t.config.voters = JointConfig(voters, outgoing)
    t.config.learners = set(learners)
    for i in {*voters, *outgoing, *learners}:
        t.progress[i] = Progress(
            match=0, next=1, inflights=t.new_inflights(), is_learner=i in learners
        )
    return t


def test_the_tracker_commits_by_the_voters_matches_only():
    t = tracker((1, 2, 3), learners=(4,))
    for i, m in {1: 9, 2: 5, 3: 1, 4: 100}.items():
        t.progress[i].match = m
    assert t.committed() == 5


def test_the_tracker_tallies_votes_ignoring_learners_and_repeated_votes():
    t = tracker((1, 2, 3), learners=(4,))
    t.record_vote(1, True)
    t.record_vote(4, True)
    assert t.tally_votes() == (1, 0, VoteResult.PENDING)
    t.record_vote(2, False)
    t.record_vote(2, True)  # the first answer stands
    assert t.tally_votes() == (1, 1, VoteResult.PENDING)
    t.record_vote(3, True)
    assert t.tally_votes() == (2, 1, VoteResult.WON)


def test_quorum_activity_counts_recently_active_voters():
    t = tracker((1, 2, 3), outgoing=(1, 4, 5))
    for i in (1, 2, 3):
        t.progress[i].recent_active = True
    assert not t.quorum_active()  # the outgoing majority is missing
    t.progress[4].recent_active = True
    assert t.quorum_active()


def test_a_commit_index_is_worth_an_empty_append_only_once_and_only_if_news():
    p = progress(match=5, next_=6)
    p.become_replicate()
    assert p.can_bump_commit(3)
    p.sent_commit = 3
    assert not p.can_bump_commit(3)
    assert p.can_bump_commit(4)
    p.sent_commit = 5  # covers everything the follower has
    assert not p.can_bump_commit(9)
    p.next = 10  # entries 6..9 sent since
    assert p.can_bump_commit(9)
    p.sent_commit = 9
    p.maybe_decr_to(rejected=9, match_hint=5)  # they were lost: so was that commit index
    assert p.sent_commit == 5
