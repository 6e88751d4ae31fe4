"""Quorum arithmetic for majority and joint configurations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.raft.quorum import INFINITE_INDEX, JointConfig, MajorityConfig, VoteResult

W, L, P = VoteResult.WON, VoteResult.LOST, VoteResult.PENDING


@pytest.mark.parametrize(
    ("voters", "acked", "want"),
    [
        ((1,), {1: 5}, 5),
        ((1,), {}, 0),
        ((1, 2), {1: 5, 2: 3}, 3),
        ((1, 2, 3), {1: 5, 2: 3, 3: 1}, 3),
        ((1, 2, 3), {1: 5}, 0),
        ((1, 2, 3), {1: 5, 2: 5}, 5),
        ((1, 2, 3, 4), {1: 9, 2: 8, 3: 7, 4: 6}, 7),
        ((1, 2, 3, 4, 5), {1: 9, 2: 8, 3: 7, 4: 6, 5: 5}, 7),
        ((1, 2, 3), {1: 5, 2: 3, 9: 100}, 3),  # acks of non-voters do not count
    ],
)
def test_the_committed_index_is_the_largest_a_majority_acknowledged(voters, acked, want):
    assert MajorityConfig(voters).committed_index(acked) == want


def test_an_empty_majority_never_limits_a_joint_configuration():
    assert MajorityConfig().committed_index({}) == INFINITE_INDEX
    assert JointConfig((1, 2, 3)).committed_index({1: 4, 2: 4}) == 4


@settings(max_examples=100)
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=7, unique=True),
    st.dictionaries(st.integers(1, 9), st.integers(0, 20)),
)
def test_committed_index_matches_a_brute_force_count(voters, acked):
    c = MajorityConfig(voters)
    want = max(i for i in range(21) if sum(acked.get(v, 0) >= i for v in voters) > len(voters) // 2)
    assert c.committed_index(acked) == want


@settings(max_examples=100)
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=5, unique=True),
    st.lists(st.integers(1, 9), max_size=5, unique=True),
    st.dictionaries(st.integers(1, 9), st.integers(0, 20)),
)
def test_a_joint_configuration_commits_what_both_majorities_commit(incoming, outgoing, acked):
    j = JointConfig(incoming, outgoing)
    want = MajorityConfig(incoming).committed_index(acked)
    if outgoing:
        want = min(want, MajorityConfig(outgoing).committed_index(acked))
    assert j.committed_index(acked) == want


@pytest.mark.parametrize(
    ("voters", "votes", "want"),
    [
        ((), {}, W),
        ((1,), {}, P),
        ((1,), {1: True}, W),
        ((1,), {1: False}, L),
        ((1, 2), {1: True}, P),
        ((1, 2), {1: True, 2: False}, L),
        ((1, 2, 3), {1: True, 2: True}, W),
        ((1, 2, 3), {1: True, 2: False}, P),
        ((1, 2, 3), {1: False, 2: False}, L),
        ((1, 2, 3), {1: True, 4: True}, P),  # non-voters do not count
        ((1, 2, 3, 4), {1: True, 2: True}, P),
        ((1, 2, 3, 4), {1: True, 2: True, 3: False, 4: False}, L),
    ],
)
def test_a_majority_vote(voters, votes, want):
    assert MajorityConfig(voters).vote_result(votes) == want


@pytest.mark.parametrize(
    ("incoming", "outgoing", "votes", "want"),
    [
        ((1, 2, 3), (), {1: True, 2: True}, W),
        ((1, 2, 3), (1, 4, 5), {1: True, 2: True}, P),
        ((1, 2, 3), (1, 4, 5), {1: True, 2: True, 4: True}, W),
        ((1, 2, 3), (1, 4, 5), {1: True, 2: True, 4: False, 5: False}, L),
        ((1, 2, 3), (1, 4, 5), {2: False, 3: False, 4: True, 5: True}, L),
        ((1, 2, 3), (1, 4, 5), {1: True}, P),
    ],
)
def test_a_joint_vote_needs_both_majorities(incoming, outgoing, votes, want):
    assert JointConfig(incoming, outgoing).vote_result(votes) == want
