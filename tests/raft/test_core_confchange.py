"""Membership changes: one voter at a time, joint consensus (auto and explicit leave),
learners, a removed leader, and the configuration arithmetic of `confchange`."""

from __future__ import annotations

import pytest

from ww.raft import confchange
from ww.raft.core import StateType
from ww.raft.errors import ConfChangeError
from ww.raft.tracker import ProgressTracker
from ww.raft.types import (
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    EntryType,
    MessageType,
)

MT = MessageType
ADD, REMOVE, LEARNER = (
    ConfChangeType.ADD_NODE,
    ConfChangeType.REMOVE_NODE,
    ConfChangeType.ADD_LEARNER,
)


def cc(*changes, transition="auto"):
    return ConfChange(tuple(ConfChangeSingle(t, n) for t, n in changes), transition)


def voters(c, i):
    return c.conf[i].voters


def test_a_new_voter_joins_learns_the_membership_from_the_log_and_counts_for_commit(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.nodes[1].propose(b"before")
    c.stabilize()
    c.add(4, ConfState())
    c.nodes[1].propose_conf_change(cc((ADD, 4)))
    c.stabilize()
    for i in (1, 2, 3, 4):
        assert voters(c, i) == (1, 2, 3, 4)
    assert c.data_applied(4) == [b"before"]
    # With 4 voters, 1 and one other are not a quorum any more.
    c.isolate(3)
    c.cut_links |= {(1, 4), (4, 1)}
    c.nodes[1].propose(b"needs three")
    c.stabilize()
    assert b"needs three" not in c.data_applied(1)
    c.heal()
    c.tick(1)
    assert c.data_applied(1)[-1] == b"needs three"


def test_a_removed_voter_no_longer_counts(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.nodes[1].propose_conf_change(cc((REMOVE, 3)))
    c.stabilize()
    assert voters(c, 1) == voters(c, 2) == (1, 2)
    assert 3 not in c.raft(1).prs.progress
    c.down.add(3)
    c.nodes[1].propose(b"two of two")
    c.stabilize()
    assert c.data_applied(2)[-1] == b"two of two"


def test_a_removed_leader_steps_down_and_the_rest_elect_a_new_one(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.nodes[1].propose_conf_change(cc((REMOVE, 1)))
    c.stabilize()
    assert c.raft(1).state == StateType.FOLLOWER
    assert voters(c, 2) == (2, 3)
    c.down.add(1)
    c.tick(40)
    new = c.leader()
    assert new in (2, 3)
    c.nodes[new].propose(b"after removal")
    c.stabilize()
    assert c.data_applied(2)[-1] == c.data_applied(3)[-1] == b"after removal"


def test_only_one_conf_change_may_be_pending(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.nodes[1].propose_conf_change(cc((ADD, 4)))
    with pytest.raises(ConfChangeError, match="not applied yet"):
        c.nodes[1].propose_conf_change(cc((ADD, 5)))
    c.stabilize()
    c.nodes[1].propose_conf_change(cc((ADD, 5)))


def test_several_changes_go_through_a_joint_configuration_and_leave_it_automatically(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.add(4, ConfState())
    c.nodes[1].propose_conf_change(cc((ADD, 4), (REMOVE, 3)))
    c.stabilize()
    seen = _applied_confs(c, 1)
    assert ConfState(voters=(1, 2, 4), voters_outgoing=(1, 2, 3), auto_leave=True) in seen
    for i in (1, 2, 4):
        assert c.conf[i] == ConfState(voters=(1, 2, 4))


def _applied_confs(c, i):
    """Replay node i's applied conf changes on a fresh tracker to list every configuration."""
    tracker = ProgressTracker(16)
    out = []
    for e in c.applied[i]:
        if e.type == EntryType.CONF_CHANGE:
            cfg, prs = confchange.Changer(tracker, 0).apply(ConfChange.decode(e.data))
            tracker.config, tracker.progress = cfg, prs
            out.append(tracker.conf_state())
    return out


def test_an_explicit_joint_change_stays_joint_until_told_to_leave(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.add(4, ConfState())
    c.nodes[1].propose_conf_change(cc((ADD, 4), transition="explicit"))
    c.stabilize()
    joint = ConfState(voters=(1, 2, 3, 4), voters_outgoing=(1, 2, 3))
    assert c.conf[1] == c.conf[4] == joint
    with pytest.raises(ConfChangeError, match="leave the joint configuration first"):
        c.nodes[1].propose_conf_change(cc((ADD, 5)))
    c.nodes[1].propose_conf_change(ConfChange())
    c.stabilize()
    assert c.conf[1] == c.conf[4] == ConfState(voters=(1, 2, 3, 4))


def test_a_joint_configuration_commits_only_with_both_majorities(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    for i in (4, 5):
        c.add(i, ConfState())
    c.nodes[1].propose_conf_change(
        cc((ADD, 4), (ADD, 5), (REMOVE, 2), (REMOVE, 3), transition="explicit")
    )
    c.stabilize()
    assert c.conf[1] == ConfState(voters=(1, 4, 5), voters_outgoing=(1, 2, 3))
    # The incoming majority (1, 4, 5) alone is not enough: the outgoing one must agree too.
    c.down |= {2, 3}
    c.nodes[1].propose(b"joint")
    c.stabilize()
    assert b"joint" not in c.data_applied(1)
    c.down.clear()
    c.tick(1)
    assert c.data_applied(1)[-1] == b"joint"


def test_leaving_a_joint_configuration_that_is_not_joint_is_refused(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    with pytest.raises(ConfChangeError, match="not in a joint configuration"):
        c.nodes[1].propose_conf_change(ConfChange())


def test_removing_every_voter_is_refused_at_proposal(kit):
    c = kit.Cluster([1])
    c.elect(1)
    with pytest.raises(ConfChangeError, match="remove all voters"):
        c.nodes[1].propose_conf_change(cc((REMOVE, 1)))


def test_a_learner_is_added_then_promoted(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.add(4, ConfState())
    c.nodes[1].propose_conf_change(cc((LEARNER, 4)))
    c.stabilize()
    assert c.conf[4] == ConfState(voters=(1, 2, 3), learners=(4,))
    assert c.raft(4).is_learner
    c.nodes[1].propose_conf_change(cc((ADD, 4)))
    c.stabilize()
    assert c.conf[4] == ConfState(voters=(1, 2, 3, 4))
    assert not c.raft(4).is_learner


def test_a_transfer_to_a_removed_node_is_abandoned(kit):
    c = kit.Cluster([1, 2, 3])
    c.elect(1)
    c.down.add(3)
    c.nodes[1].propose_conf_change(cc((REMOVE, 3)))
    c.nodes[1].transfer_leader(3)  # 3 is down: the transfer cannot finish
    assert c.raft(1).lead_transferee == 3
    c.stabilize()  # the removal commits and applies
    assert voters(c, 1) == (1, 2)
    assert c.raft(1).lead_transferee == 0
    assert c.raft(1).state == StateType.LEADER


# -- the arithmetic ---------------------------------------------------------------------------


def changer(cs: ConfState, last_index: int = 10) -> confchange.Changer:
    tracker = ProgressTracker(16)
    confchange.restore(confchange.Changer(tracker, last_index), cs)
    return confchange.Changer(tracker, last_index)


def conf_of(result) -> ConfState:
    tracker = ProgressTracker(16)
    tracker.config, tracker.progress = result
    return tracker.conf_state()


@pytest.mark.parametrize(
    ("start", "change", "want"),
    [
        (ConfState(voters=(1,)), cc((ADD, 2)), ConfState(voters=(1, 2))),
        (ConfState(voters=(1, 2)), cc((REMOVE, 2)), ConfState(voters=(1,))),
        (ConfState(voters=(1, 2)), cc((LEARNER, 2)), ConfState(voters=(1,), learners=(2,))),
        (ConfState(voters=(1,), learners=(2,)), cc((ADD, 2)), ConfState(voters=(1, 2))),
        (ConfState(voters=(1,)), cc((REMOVE, 9)), ConfState(voters=(1,))),
        (ConfState(voters=(1,)), cc((ADD, 1)), ConfState(voters=(1,))),
        (
            ConfState(voters=(1, 2, 3)),
            cc((ADD, 4), (LEARNER, 3)),
            ConfState(
                voters=(1, 2, 4), voters_outgoing=(1, 2, 3), learners_next=(3,), auto_leave=True
            ),
        ),
        (
            ConfState(voters=(1, 2, 4), voters_outgoing=(1, 2, 3), learners_next=(3,)),
            ConfChange(),
            ConfState(voters=(1, 2, 4), learners=(3,)),
        ),
    ],
)
def test_changes_produce_the_expected_configuration(start, change, want):
    assert conf_of(changer(start).apply(change)) == want


@pytest.mark.parametrize(
    ("start", "change", "error"),
    [
        (ConfState(voters=(1,)), cc((REMOVE, 1)), "remove all voters"),
        (ConfState(voters=(1, 2), voters_outgoing=(1,)), cc((ADD, 3)), "joint configuration"),
        (
            ConfState(voters=(1, 2), voters_outgoing=(1,)),
            cc((ADD, 3), (ADD, 4)),
            "already joint",
        ),
        (ConfState(voters=(1, 2)), ConfChange(), "not joint"),
        (ConfState(voters=(1,)), ConfChange((ConfChangeSingle(ADD, 2),), "sideways"), "unknown"),
    ],
)
def test_invalid_changes_are_refused(start, change, error):
    with pytest.raises(ConfChangeError, match=error):
        changer(start).apply(change)


def test_a_simple_change_may_not_change_two_voters():
    with pytest.raises(ConfChangeError, match="more than one voter"):
        changer(ConfState(voters=(1, 2))).simple(cc((ADD, 3), (ADD, 4)).changes)


@pytest.mark.parametrize(
    "cs",
    [
        ConfState(voters=(1, 2, 3)),
        ConfState(voters=(1, 2), learners=(3, 4)),
        ConfState(voters=(1, 2, 4), voters_outgoing=(1, 2, 3), auto_leave=True),
        ConfState(voters=(1, 2, 4), voters_outgoing=(1, 2, 3), learners_next=(3,)),
    ],
)
def test_restore_rebuilds_a_configuration_exactly(cs):
    tracker = ProgressTracker(16)
    confchange.restore(confchange.Changer(tracker, 5), cs)
    assert tracker.conf_state() == cs
