"""The rules of the Raft paper (§5.1 to §5.4), one test per claim, after etcd's
raft_paper_test.go. Each test builds a state, steps messages into the core and checks the
messages and state that come out."""

from __future__ import annotations

import pytest

from ww.raft.core import StateType
from ww.raft.types import NONE, Entry, HardState, Message, MessageType

MT = MessageType


def sorted_msgs(msgs: list[Message]) -> list[Message]:
    return sorted(msgs, key=lambda m: (m.to, m.type))


def commit_noop_entry(r) -> None:
    """Have the new leader's empty entry acknowledged by every follower, and persisted."""
    assert r.state == StateType.LEADER
    r.bcast_append()
    for m in r.read_messages():
        assert m.type == MT.APP and len(m.entries) == 1 and m.entries[0].data == b""
        r.step(accept_and_reply(m))
    r.read_messages()
    stabilize_log(r)


def stabilize_log(r) -> None:
    """Persist r's unstable entries into its MemoryStorage and mark them applied."""
    log = r.raft_log
    log.storage.append(log.unstable_entries())
    log.applied_to(log.committed)
    log.stable_to(log.last_index(), log.last_term())


def accept_and_reply(m: Message) -> Message:
    assert m.type == MT.APP
    return Message(
        type=MT.APP_RESP, frm=m.to, to=m.frm, term=m.term, index=m.index + len(m.entries)
    )


def make_leader(r) -> None:
    r.become_candidate()
    r.become_leader()


# -- §5.1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [StateType.FOLLOWER, StateType.CANDIDATE, StateType.LEADER])
def test_a_server_adopts_a_larger_term_and_reverts_to_follower(kit, state):
    r = kit.new_raft(1)
    if state == StateType.FOLLOWER:
        r.become_follower(1, 2)
    elif state == StateType.CANDIDATE:
        r.become_candidate()
    else:
        make_leader(r)
    r.step(Message(type=MT.APP, frm=2, to=1, term=2))
    assert r.term == 2
    assert r.state == StateType.FOLLOWER
    assert r.lead == 2


def test_a_request_with_a_stale_term_is_ignored(kit):
    s = kit.storage_with((1, 2, 3), term=2)
    r = kit.new_raft(1, storage=s)
    r.step(Message(type=MT.APP, frm=2, to=1, term=1, entries=(Entry(1, 1, data=b"x"),)))
    assert r.term == 2
    assert r.lead == NONE
    assert r.raft_log.last_index() == 0
    assert r.stats.dropped_messages["stale_term"] == 1


def test_a_stale_leader_learns_the_newer_term_from_the_answer_to_its_append(kit):
    # With check-quorum a partitioned leader would never hear the newer term otherwise.
    r = kit.new_raft(1, storage=kit.storage_with((1, 2, 3), term=3), check_quorum=True)
    r.step(Message(type=MT.APP, frm=2, to=1, term=2))
    (resp,) = r.read_messages()
    assert (resp.type, resp.to, resp.term) == (MT.APP_RESP, 2, 3)


# -- §5.2 leader election ---------------------------------------------------------------------


def test_servers_start_as_followers(kit):
    assert kit.new_raft(1).state == StateType.FOLLOWER


def test_the_leader_broadcasts_heartbeats_every_heartbeat_tick(kit):
    r = kit.new_raft(1, heartbeat=2)
    make_leader(r)
    r.read_messages()
    r.tick()
    assert r.read_messages() == []
    r.tick()
    msgs = sorted_msgs(r.read_messages())
    # `index` is the leader's tick count, which the answers echo to date its lease.
    assert [(m.type, m.to, m.term, m.commit, m.index, m.entries) for m in msgs] == [
        (MT.HEARTBEAT, 2, 1, 0, r.clock, ()),
        (MT.HEARTBEAT, 3, 1, 0, r.clock, ()),
    ]


@pytest.mark.parametrize("state", [StateType.FOLLOWER, StateType.CANDIDATE])
def test_a_server_that_hears_nothing_starts_an_election(kit, state):
    r = kit.new_raft(1)
    if state == StateType.FOLLOWER:
        r.become_follower(1, 2)
    else:
        r.become_candidate()
    for _ in range(2 * r.election_timeout):
        r.tick()
    assert r.term == 2
    assert r.state == StateType.CANDIDATE
    assert r.prs.votes[1] is True
    msgs = sorted_msgs(r.read_messages())
    assert [(m.type, m.to, m.term, m.index, m.log_term) for m in msgs] == [
        (MT.VOTE, 2, 2, 0, 0),
        (MT.VOTE, 3, 2, 0, 0),
    ]


@pytest.mark.parametrize(
    ("size", "votes", "state"),
    [
        (1, {}, StateType.LEADER),
        (3, {2: True, 3: True}, StateType.LEADER),
        (3, {2: True}, StateType.LEADER),
        (5, {2: True, 3: True, 4: True, 5: True}, StateType.LEADER),
        (5, {2: True, 3: True}, StateType.LEADER),
        (3, {2: False, 3: False}, StateType.FOLLOWER),
        (5, {2: False, 3: False, 4: False, 5: False}, StateType.FOLLOWER),
        (5, {2: True, 3: False, 4: False, 5: False}, StateType.FOLLOWER),
        (3, {}, StateType.CANDIDATE),
        (5, {2: True}, StateType.CANDIDATE),
        (5, {2: False, 3: False}, StateType.CANDIDATE),
    ],
)
def test_one_round_of_votes_wins_loses_or_stays_undecided(kit, size, votes, state):
    r = kit.new_raft(1, range(1, size + 1))
    r.step(Message(type=MT.HUP, frm=1, to=1))
    for frm, granted in votes.items():
        r.step(Message(type=MT.VOTE_RESP, frm=frm, to=1, term=r.term, reject=not granted))
    assert r.state == state
    assert r.term == 1


@pytest.mark.parametrize(
    ("vote", "candidate", "reject"),
    [(NONE, 2, False), (NONE, 3, False), (2, 2, False), (3, 3, False), (2, 3, True), (3, 2, True)],
)
def test_a_follower_votes_at_most_once_per_term_first_come_first_served(
    kit, vote, candidate, reject
):
    s = kit.storage_with((1, 2, 3))
    s.set_hard_state(HardState(term=1, vote=vote))
    r = kit.new_raft(1, storage=s)
    r.step(Message(type=MT.VOTE, frm=candidate, to=1, term=1))
    (m,) = r.read_messages()
    assert (m.type, m.to, m.term, m.reject) == (MT.VOTE_RESP, candidate, 1, reject)


@pytest.mark.parametrize("term", [1, 2])
def test_a_candidate_that_hears_from_a_legitimate_leader_becomes_its_follower(kit, term):
    r = kit.new_raft(1)
    r.step(Message(type=MT.HUP, frm=1, to=1))
    assert r.state == StateType.CANDIDATE
    r.step(Message(type=MT.APP, frm=2, to=1, term=term))
    assert r.state == StateType.FOLLOWER
    assert r.term == term
    assert r.lead == 2


@pytest.mark.parametrize("state", [StateType.FOLLOWER, StateType.CANDIDATE])
def test_election_timeouts_are_spread_over_one_to_two_timeouts(kit, state):
    et = 10
    r = kit.new_raft(1, election=et, seed=7)
    seen = set()
    for _ in range(50 * et):
        if state == StateType.FOLLOWER:
            r.become_follower(r.term + 1, 2)
        else:
            r.become_candidate()
        ticks = 0
        while not r.read_messages():
            r.tick()
            ticks += 1
        seen.add(ticks)
    assert seen == set(range(et, 2 * et))


def test_the_election_timeout_is_drawn_from_the_configured_rng(kit):
    a = [kit.new_raft(1, seed=42) for _ in range(2)]
    for r in a:
        for _ in range(20):
            r.become_follower(r.term + 1, NONE)
    assert a[0].randomized_election_timeout == a[1].randomized_election_timeout
    timeouts = set()
    for seed in range(20):
        r = kit.new_raft(1, seed=seed)
        timeouts.add(r.randomized_election_timeout)
    assert len(timeouts) > 1


@pytest.mark.parametrize("state", [StateType.FOLLOWER, StateType.CANDIDATE])
def test_usually_only_one_server_times_out_first(kit, state):
    ids = range(1, 6)
    rs = [kit.new_raft(i, ids) for i in ids]
    conflicts = 0
    rounds = 300
    for _ in range(rounds):
        for r in rs:
            if state == StateType.FOLLOWER:
                r.become_follower(r.term + 1, NONE)
            else:
                r.become_candidate()
        timed_out = 0
        while timed_out == 0:
            for r in rs:
                r.tick()
                if r.read_messages():
                    timed_out += 1
        conflicts += timed_out > 1
    assert conflicts / rounds <= 0.3


# -- §5.3 log replication ---------------------------------------------------------------------


def test_the_leader_appends_a_proposal_and_sends_it_with_the_preceding_index_and_term(kit):
    r = kit.new_raft(1)
    make_leader(r)
    commit_noop_entry(r)
    li = r.raft_log.last_index()
    r.step(Message(type=MT.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"some data"),)))
    assert r.raft_log.last_index() == li + 1
    assert r.raft_log.committed == li
    want = (Entry(1, li + 1, data=b"some data"),)
    msgs = sorted_msgs(r.read_messages())
    assert [(m.type, m.to, m.term, m.index, m.log_term, m.entries, m.commit) for m in msgs] == [
        (MT.APP, 2, 1, li, 1, want, li),
        (MT.APP, 3, 1, li, 1, want, li),
    ]
    assert r.raft_log.unstable_entries() == list(want)


def test_a_replicated_entry_is_committed_applied_and_the_commit_index_announced(kit):
    r = kit.new_raft(1)
    make_leader(r)
    commit_noop_entry(r)
    li = r.raft_log.last_index()
    r.step(Message(type=MT.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"some data"),)))
    for m in r.read_messages():
        r.step(accept_and_reply(m))
    assert r.raft_log.committed == li + 1
    assert r.raft_log.next_committed_ents() == [Entry(1, li + 1, data=b"some data")]
    msgs = sorted_msgs(r.read_messages())
    assert [(m.to, m.type, m.commit) for m in msgs] == [(2, MT.APP, li + 1), (3, MT.APP, li + 1)]


@pytest.mark.parametrize(
    ("size", "acceptors", "committed"),
    [
        (1, set(), True),
        (3, set(), False),
        (3, {2}, True),
        (3, {2, 3}, True),
        (5, set(), False),
        (5, {2}, False),
        (5, {2, 3}, True),
        (5, {2, 3, 4}, True),
        (5, {2, 3, 4, 5}, True),
    ],
)
def test_an_entry_commits_once_a_majority_has_it(kit, size, acceptors, committed):
    r = kit.new_raft(1, range(1, size + 1))
    make_leader(r)
    commit_noop_entry(r)
    li = r.raft_log.last_index()
    r.step(Message(type=MT.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"some data"),)))
    for m in kit.read_messages(r):
        if m.to in acceptors:
            r.step(accept_and_reply(m))
    assert (r.raft_log.committed > li) == committed


@pytest.mark.parametrize("terms", [(), (2,), (1, 2), (1,)])
def test_committing_an_entry_commits_the_entries_of_earlier_leaders_before_it(kit, terms):
    s = kit.storage_with((1, 2, 3), kit.ents(*terms), term=2)
    r = kit.new_raft(1, storage=s)
    make_leader(r)
    r.step(Message(type=MT.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"some data"),)))
    for m in kit.read_messages(r):
        r.step(accept_and_reply(m))
    li = len(terms)
    assert r.raft_log.next_committed_ents() == [
        *kit.ents(*terms),
        Entry(3, li + 1),
        Entry(3, li + 2, data=b"some data"),
    ]


@pytest.mark.parametrize(
    ("datas", "commit"),
    [([b"a"], 1), ([b"a", b"b"], 2), ([b"b", b"a"], 2), ([b"a", b"b"], 1)],
)
def test_a_follower_applies_what_the_leader_says_is_committed(kit, datas, commit):
    r = kit.new_raft(1)
    r.become_follower(1, 2)
    entries = tuple(Entry(1, i + 1, data=d) for i, d in enumerate(datas))
    r.step(Message(type=MT.APP, frm=2, to=1, term=1, entries=entries, commit=commit))
    assert r.raft_log.committed == commit
    assert r.raft_log.next_committed_ents() == list(entries[:commit])


@pytest.mark.parametrize(
    ("log_term", "index", "want_index", "reject", "hint", "hint_term"),
    [
        (0, 0, 1, False, 0, 0),  # matches the committed prefix
        (1, 1, 1, False, 0, 0),
        (2, 2, 2, False, 0, 0),  # matches an uncommitted entry
        (1, 2, 2, True, 1, 1),  # the entry at 2 has another term
        (3, 3, 3, True, 2, 2),  # no entry at 3
    ],
)
def test_a_follower_refuses_entries_unless_its_log_matches_the_preceding_entry(
    kit, log_term, index, want_index, reject, hint, hint_term
):
    s = kit.storage_with((1, 2, 3), kit.ents(1, 2))
    s.set_hard_state(HardState(commit=1))
    r = kit.new_raft(1, storage=s)
    r.become_follower(2, 2)
    r.step(Message(type=MT.APP, frm=2, to=1, term=2, log_term=log_term, index=index))
    (m,) = r.read_messages()
    assert (m.type, m.to, m.term, m.index, m.reject, m.reject_hint, m.log_term) == (
        MT.APP_RESP,
        2,
        2,
        want_index,
        reject,
        hint,
        hint_term,
    )


@pytest.mark.parametrize(
    ("index", "term", "entries", "want_log", "want_unstable"),
    [
        (2, 2, [(3, 3)], [1, 2, 3], [3]),
        (1, 1, [(2, 3), (3, 4)], [1, 3, 4], [3, 4]),
        (0, 0, [(1, 1)], [1, 2], []),
        (0, 0, [(1, 3)], [3], [3]),
    ],
)
def test_a_follower_drops_conflicting_entries_and_appends_the_new_ones(
    kit, index, term, entries, want_log, want_unstable
):
    r = kit.new_raft(1, storage=kit.storage_with((1, 2, 3), kit.ents(1, 2)))
    r.become_follower(2, 2)
    ents = tuple(Entry(t, i) for i, t in entries)
    r.step(Message(type=MT.APP, frm=2, to=1, term=2, log_term=term, index=index, entries=ents))
    assert [e.term for e in r.raft_log.all_entries()] == want_log
    assert [e.term for e in r.raft_log.unstable_entries()] == want_unstable


FIGURE_7_LEADER = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)


@pytest.mark.parametrize(
    "follower",
    [
        pytest.param((1, 1, 1, 4, 4, 5, 5, 6, 6), id="a-missing-one"),
        pytest.param((1, 1, 1, 4), id="b-missing-many"),
        pytest.param((1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6), id="c-extra-uncommitted"),
        pytest.param((1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7), id="d-extra-later-term"),
        pytest.param((1, 1, 1, 4, 4, 4, 4), id="e-missing-and-extra"),
        pytest.param((1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3), id="f-other-terms"),
    ],
)
def test_the_leader_brings_every_follower_log_of_figure_7_in_line_with_its_own(kit, follower):
    term = 8
    lead_storage = kit.storage_with((1, 2, 3), kit.ents(*FIGURE_7_LEADER))
    lead_storage.set_hard_state(HardState(term=term, commit=len(FIGURE_7_LEADER)))
    lead = kit.new_raft(1, storage=lead_storage)
    fol_storage = kit.storage_with((1, 2, 3), kit.ents(*follower))
    fol_storage.set_hard_state(HardState(term=term - 1))
    fol = kit.new_raft(2, storage=fol_storage)
    # A third node that only votes: the follower's log may be more up to date than the leader's.
    n = kit.Network(lead, fol, None)
    n.campaign(1)
    n.send(Message(type=MT.VOTE_RESP, frm=3, to=1, term=term + 1))
    assert lead.state == StateType.LEADER
    n.propose(1, b"")
    assert kit.log_of(fol) == kit.log_of(lead)
    assert lead.raft_log.committed == fol.raft_log.committed == len(FIGURE_7_LEADER) + 2


def test_fast_backtracking_needs_one_round_trip_per_conflicting_term(kit):
    # Follower (f) of Figure 7: its terms 2 and 3 conflict with the leader's 4..6.
    lead_storage = kit.storage_with((1, 2, 3), kit.ents(*FIGURE_7_LEADER))
    lead_storage.set_hard_state(HardState(term=8, commit=len(FIGURE_7_LEADER)))
    lead = kit.new_raft(1, storage=lead_storage)
    fol = kit.new_raft(
        2, storage=kit.storage_with((1, 2, 3), kit.ents(1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3))
    )
    n = kit.Network(lead, fol, None)
    n.campaign(1)
    n.send(Message(type=MT.VOTE_RESP, frm=3, to=1, term=9))
    rejections = [m for m in n.delivered if m.type == MT.APP_RESP and m.reject]
    # One rejection finds the follower's term-3 run; the leader's log has no term 3, so the
    # next probe lands below the follower's term-2 run: at most two rejections, not eight.
    assert 1 <= len(rejections) <= 2
    assert kit.log_of(fol) == kit.log_of(lead)


# -- §5.4 safety ------------------------------------------------------------------------------


@pytest.mark.parametrize(("terms", "wterm"), [((1,), 2), ((1, 2), 3)])
def test_a_vote_request_carries_the_candidates_last_index_and_term(kit, terms, wterm):
    r = kit.new_raft(1)
    r.step(Message(type=MT.APP, frm=2, to=1, term=wterm - 1, entries=tuple(kit.ents(*terms))))
    r.read_messages()
    for _ in range(2 * r.election_timeout):
        r.tick()
    msgs = sorted_msgs(r.read_messages())
    assert [(m.type, m.to, m.term, m.index, m.log_term) for m in msgs] == [
        (MT.VOTE, i, wterm, len(terms), terms[-1]) for i in (2, 3)
    ]


@pytest.mark.parametrize(
    ("terms", "log_term", "index", "reject"),
    [
        ((1,), 1, 1, False),
        ((1,), 1, 2, False),
        ((1, 1), 1, 1, True),
        ((1,), 2, 1, False),
        ((1,), 2, 2, False),
        ((1, 1), 2, 1, False),
        ((2,), 1, 1, True),
        ((2,), 1, 2, True),
        ((2, 2), 1, 1, True),
        ((1, 1), 1, 1, True),
    ],
)
def test_a_voter_refuses_a_candidate_whose_log_is_less_up_to_date(
    kit, terms, log_term, index, reject
):
    r = kit.new_raft(1, (1, 2), storage=kit.storage_with((1, 2), kit.ents(*terms)))
    r.step(Message(type=MT.VOTE, frm=2, to=1, term=3, log_term=log_term, index=index))
    (m,) = r.read_messages()
    assert (m.type, m.reject) == (MT.VOTE_RESP, reject)


@pytest.mark.parametrize(("acked", "commit"), [(1, 0), (2, 0), (3, 3)])
def test_only_entries_of_the_leaders_term_commit_by_counting_replicas(kit, acked, commit):
    s = kit.storage_with((1, 2), kit.ents(1, 2), term=2)
    r = kit.new_raft(1, (1, 2), storage=s)
    make_leader(r)  # term 3, empty entry at 3
    kit.read_messages(r)
    r.step(Message(type=MT.APP_RESP, frm=2, to=1, term=r.term, index=acked))
    assert r.raft_log.committed == commit


class TestFigure8:
    """Figure 8: an entry of an old term stored on a majority is not committed, and may be
    overwritten, until an entry of the leader's own term is replicated on a majority.

    Index 1 (term 1) is on everyone. S1 led term 2 and put index 2 on S1, S2; S5 led term 3
    and put its own index 2 on S5 only. Now S1 leads term 4 and copies its index 2 to S3."""

    def cluster(self, kit):
        logs = {1: (1, 2), 2: (1, 2), 3: (1,), 4: (1,), 5: (1, 3)}
        rs = []
        for i, terms in logs.items():
            s = kit.storage_with(range(1, 6), kit.ents(*terms))
            s.set_hard_state(HardState(term=3, commit=1))
            rs.append(kit.new_raft(i, range(1, 6), storage=s))
        n = kit.Network(*rs)
        n.ignore(MT.APP)  # the new leader's appends are held back until the test says
        n.campaign(1)  # term 4: S2, S3, S4 vote for S1; S5's log is more up to date
        n.recover()
        s1 = n.raft(1)
        assert s1.state == StateType.LEADER and s1.term == 4
        return n

    def test_c_an_old_entry_on_a_majority_is_not_committed(self, kit):
        n = self.cluster(kit)
        s1 = n.raft(1)
        # S1 learns that S2 and S3 hold index 2 (term 2): a majority, but of an old term.
        for frm in (2, 3):
            s1.step(Message(type=MT.APP_RESP, frm=frm, to=1, term=4, index=2))
        assert s1.raft_log.term(2) == 2
        assert s1.raft_log.committed == 1

    def test_d_so_a_later_leader_may_overwrite_it(self, kit):
        n = self.cluster(kit)
        # Only S3 gets S1's index 2 (term 2) before S1 crashes; its term-4 entry is lost.
        n.raft(3).raft_log.append([Entry(2, 2)])
        n.isolate(1)
        n.campaign(5)  # term 5: S2, S3, S4 vote for S5, whose last term 3 beats their 2
        s5 = n.raft(5)
        assert s5.state == StateType.LEADER
        for i in (2, 3, 4):
            assert n.raft(i).raft_log.term(2) == 3

    def test_e_once_an_entry_of_its_term_is_on_a_majority_it_is_safe(self, kit):
        n = self.cluster(kit)
        n.cut(1, 4)
        n.cut(1, 5)
        n.send(Message(type=MT.BEAT, frm=1, to=1))  # resumes the held-back replication
        n.propose(1, b"term-4 entry")  # reaches S2 and S3 only
        s1 = n.raft(1)
        committed = s1.raft_log.committed
        assert s1.raft_log.term(committed) == 4
        n.isolate(1)
        n.campaign(5)
        assert n.raft(5).state != StateType.LEADER
        for i in (2, 3):
            assert n.raft(i).raft_log.term(2) == 2
            assert n.raft(i).raft_log.last_term() == 4
