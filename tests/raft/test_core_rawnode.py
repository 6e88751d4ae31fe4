"""RawNode: the Ready/advance contract, bootstrap and restart, and the promise that a
message from the network never raises."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ww.raft.core import Config, StateType
from ww.raft.errors import (
    ConfigError,
    ProposalDroppedError,
    StepLocalMessageError,
    StepPeerNotFoundError,
)
from ww.raft.memory import MemoryStorage
from ww.raft.rawnode import RawNode, SoftState
from ww.raft.types import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

MT = MessageType


def node(i=1, voters=(1, 2, 3), storage=None, **kw):
    storage = storage if storage is not None else MemoryStorage(ConfState(voters=voters))
    return RawNode(Config(i, storage=storage, rng=random.Random(i), **kw))


def persist(n: RawNode, s: MemoryStorage):
    rd = n.ready()
    s.save(rd.hard_state, rd.entries, rd.snapshot)
    for e in rd.committed_entries:
        if e.type == EntryType.CONF_CHANGE:
            n.apply_conf_change(ConfChange.decode(e.data))
    n.advance(rd)
    return rd


# -- bootstrap and the Ready cycle ------------------------------------------------------------


def test_a_fresh_node_writes_the_initial_membership_into_the_log():
    s = MemoryStorage(ConfState(voters=(1, 2, 3)))
    n = node(storage=s)
    assert n.has_ready()
    rd = persist(n, s)
    assert rd.hard_state == HardState(term=1, vote=0, commit=3)
    assert [e.index for e in rd.entries] == [1, 2, 3]
    assert all(e.type == EntryType.CONF_CHANGE and e.term == 1 for e in rd.entries)
    assert rd.committed_entries == rd.entries
    assert rd.must_sync
    assert not n.has_ready()
    assert s.last_index() == 3 and n.raft.raft_log.applied == 3


def test_a_joining_node_starts_empty_and_does_not_bootstrap():
    n = node(4, voters=())
    assert not n.has_ready()
    assert n.raft.raft_log.last_index() == 0


def test_a_single_node_elects_itself_and_commits_its_proposals():
    s = MemoryStorage(ConfState(voters=(1,)))
    n = node(voters=(1,), storage=s)
    persist(n, s)
    n.campaign()
    rd = persist(n, s)
    assert rd.soft_state == SoftState(1, StateType.LEADER)
    persist(n, s)  # its empty entry commits once written
    n.propose(b"hello")
    rd = persist(n, s)
    assert rd.entries[-1].data == b"hello"
    assert not rd.committed_entries  # its own write acknowledges it: in the next Ready
    rd = persist(n, s)
    assert [e.data for e in rd.committed_entries] == [b"hello"]
    assert rd.hard_state is not None and rd.hard_state.commit == 3  # bootstrap, empty, hello


def test_ready_reports_only_what_changed():
    s = MemoryStorage(ConfState(voters=(1, 2, 3)))
    n = node(storage=s)
    persist(n, s)
    n.step(Message(type=MT.HEARTBEAT, frm=2, to=1, term=1, commit=3))
    rd = persist(n, s)
    assert rd.soft_state == SoftState(2, StateType.FOLLOWER)
    assert rd.hard_state is None  # term, vote, commit unchanged
    assert not rd.must_sync
    assert [m.type for m in rd.messages] == [MT.HEARTBEAT_RESP]
    n.step(
        Message(
            type=MT.APP,
            frm=2,
            to=1,
            term=1,
            index=3,
            log_term=1,
            commit=3,
            entries=(Entry(1, 4, data=b"x"),),
        )
    )
    rd = persist(n, s)
    assert rd.soft_state is None
    assert rd.entries == (Entry(1, 4, data=b"x"),)
    assert rd.must_sync
    n.step(Message(type=MT.HEARTBEAT, frm=2, to=1, term=1, commit=4))
    rd = persist(n, s)
    assert rd.hard_state == HardState(1, 0, 4)
    assert not rd.must_sync  # a commit index alone need not be synced
    assert rd.committed_entries == (Entry(1, 4, data=b"x"),)


def test_a_restarted_node_resumes_from_its_storage():
    s = MemoryStorage(ConfState(voters=(1,)))
    n = node(voters=(1,), storage=s)
    persist(n, s)
    n.campaign()
    persist(n, s)
    for d in (b"a", b"b"):
        n.propose(d)
    while n.has_ready():
        persist(n, s)
    again = node(voters=(1,), storage=s, applied=3)
    r = again.raft
    assert (r.term, r.vote, r.raft_log.committed, r.raft_log.applied) == (2, 1, 4, 3)
    rd = again.ready()
    assert [e.data for e in rd.committed_entries] == [b"b"]
    assert rd.entries == ()


def test_status_shows_progress_on_the_leader_only():
    s = MemoryStorage(ConfState(voters=(1,)))
    n = node(voters=(1,), storage=s)
    persist(n, s)
    assert n.status().progress == {}
    n.campaign()
    persist(n, s)
    st_ = n.status()
    assert st_.soft_state == SoftState(1, StateType.LEADER)
    assert set(st_.progress) == {1}
    assert st_.config == ConfState(voters=(1,))


def test_proposals_without_a_leader_raise_and_are_counted():
    n = node()
    with pytest.raises(ProposalDroppedError, match="no leader"):
        n.propose(b"x")
    assert n.stats.dropped_proposals == 1


def test_forwarding_can_be_disabled():
    s = MemoryStorage(ConfState(voters=(1, 2, 3)))
    n = node(storage=s, disable_proposal_forwarding=True)
    n.step(Message(type=MT.HEARTBEAT, frm=2, to=1, term=1))
    with pytest.raises(ProposalDroppedError, match="forwarding"):
        n.propose(b"x")


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"election_tick": 1, "heartbeat_tick": 1}, "election_tick"),
        ({"heartbeat_tick": 0}, "heartbeat_tick"),
        ({"max_inflight_msgs": 0}, "max_inflight_msgs"),
        ({"max_size_per_msg": -1}, "max_size_per_msg"),
        ({"applied": 7}, "applied"),
    ],
)
def test_an_invalid_config_is_refused_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        node(**kw)


def test_node_id_zero_is_refused():
    with pytest.raises(ConfigError, match="id"):
        node(0)


# -- bad input from the network ---------------------------------------------------------------


def ready_follower():
    s = MemoryStorage(ConfState(voters=(1, 2, 3)))
    n = node(storage=s)
    persist(n, s)
    n.step(Message(type=MT.HEARTBEAT, frm=2, to=1, term=1, commit=3))
    persist(n, s)
    return n


SNAP = Snapshot(b"s", SnapshotMetadata(9, 1, ConfState(voters=(1, 2, 3))))


@pytest.mark.parametrize(
    ("m", "reason"),
    [
        (Message(type=MT.HUP, frm=2, to=1, term=1), "local_message"),
        (Message(type=MT.BEAT, frm=2, to=1, term=1), "local_message"),
        (Message(type=MT.APP_RESP, frm=9, to=1, term=1), "unknown_peer"),
        (Message(type=MT.APP, frm=0, to=1, term=1), "no_sender"),
        (Message(type=MT.APP, frm=1, to=1, term=1), "from_self"),
        (Message(type=MT.APP, frm=2, to=5, term=1), "wrong_recipient"),
        (Message(type=MT.APP, frm=2, to=1, term=0), "no_term"),
        (Message(type=MT.PROP, frm=2, to=1), "empty_proposal"),
        (Message(type=MT.READ_INDEX, frm=2, to=1), "bad_read_index"),
        (Message(type=MT.SNAP, frm=2, to=1, term=1), "empty_snapshot"),
        (
            Message(type=MT.APP, frm=2, to=1, term=1, index=3, entries=(Entry(1, 7),)),
            "bad_append_entries",
        ),
        (
            Message(type=MT.APP, frm=2, to=1, term=1, index=3, log_term=1, entries=(Entry(2, 4),)),
            "bad_append_entries",
        ),
        (
            Message(type=MT.READ_INDEX_RESP, frm=2, to=1, term=1, entries=(Entry(0, 0),) * 2),
            "bad_read_index",
        ),
    ],
)
def test_a_malformed_message_is_dropped_and_counted(m, reason):
    n = ready_follower()
    before = n.raft.raft_log.all_entries()
    n.step(m)
    assert n.stats.dropped_messages[reason] == 1
    assert n.raft.raft_log.all_entries() == before


def test_an_append_below_the_commit_index_cannot_overwrite_committed_entries():
    n = ready_follower()
    before = n.raft.raft_log.all_entries()
    n.step(Message(type=MT.APP, frm=2, to=1, term=1, index=0, entries=(Entry(1, 1, data=b"!"),)))
    assert n.raft.raft_log.all_entries() == before
    (resp,) = n.ready().messages
    assert (resp.type, resp.index, resp.reject) == (MT.APP_RESP, 3, False)


def test_a_snapshot_message_is_installed_through_ready():
    n = ready_follower()
    n.step(Message(type=MT.SNAP, frm=2, to=1, term=1, snapshot=SNAP))
    rd = n.ready()
    assert rd.snapshot == SNAP
    assert rd.must_sync
    assert rd.hard_state is not None and rd.hard_state.commit == 9
    assert [(m.type, m.index) for m in rd.messages] == [(MT.APP_RESP, 9)]


def messages(max_id=4, max_term=4, max_index=8):
    small = st.integers(0, max_index)
    entry = st.builds(
        Entry,
        term=st.integers(0, max_term),
        index=small,
        type=st.sampled_from(EntryType),
        data=st.binary(max_size=4),
    )
    snapshot = st.builds(
        Snapshot,
        data=st.binary(max_size=4),
        metadata=st.builds(
            SnapshotMetadata,
            index=small,
            term=st.integers(0, max_term),
            conf_state=st.builds(
                ConfState,
                voters=st.lists(st.integers(1, max_id), max_size=3).map(tuple),
                learners=st.lists(st.integers(1, max_id), max_size=2).map(tuple),
            ),
        ),
    )
    return st.builds(
        Message,
        type=st.sampled_from(MT),
        to=st.sampled_from([1, 1, 1, 1, 0, max_id]),  # mostly well addressed
        frm=st.integers(0, max_id),
        term=st.integers(0, max_term),
        log_term=st.integers(0, max_term),
        index=small,
        entries=st.lists(entry, max_size=3).map(tuple),
        commit=small,
        snapshot=st.none() | snapshot,
        reject=st.booleans(),
        reject_hint=small,
        context=st.binary(max_size=3),
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from(["follower", "candidate", "leader"]),
    msgs=st.lists(messages(), max_size=12),
)
def test_no_well_typed_message_makes_step_raise(role, msgs):
    s = MemoryStorage(ConfState(voters=(1, 2, 3)))
    n = node(storage=s)
    persist(n, s)
    if role != "follower":
        n.campaign()
    if role == "leader":
        for frm in (2, 3):
            n.step(Message(type=MT.PRE_VOTE_RESP, frm=frm, to=1, term=2))
        for frm in (2, 3):
            n.step(Message(type=MT.VOTE_RESP, frm=frm, to=1, term=2))
        assert n.raft.state == StateType.LEADER
    for m in msgs:
        n.step(m)
        n.tick()
        if n.has_ready():
            persist(n, s)


@pytest.mark.parametrize(("limit", "want"), [(100, [1, 1, 1, 1, 1]), (120, [2, 2, 1]), (0, [5])])
def test_committed_entries_are_handed_out_within_max_committed_size_per_ready(limit, want):
    s = MemoryStorage(ConfState(voters=(1,)))
    n = node(voters=(1,), storage=s, max_committed_size_per_ready=limit)
    persist(n, s)
    n.campaign()
    while n.has_ready():
        persist(n, s)
    n.propose_batch([b"x" * 40] * 5)  # 56 bytes each, counted
    sizes = []
    while n.has_ready():
        rd = persist(n, s)
        if rd.committed_entries:
            sizes.append(len([e for e in rd.committed_entries if e.data]))
    assert sizes == want


def test_step_checked_raises_what_step_counts():
    n = ready_follower()
    with pytest.raises(StepLocalMessageError):
        n.step_checked(Message(type=MT.BEAT, frm=2, to=1, term=1))
    with pytest.raises(StepPeerNotFoundError):
        n.step_checked(Message(type=MT.HEARTBEAT_RESP, frm=9, to=1, term=1))
