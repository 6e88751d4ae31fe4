"""Applying membership changes to a configuration, as in etcd's confchange package.

`Changer` computes a new (config, progress map) without touching the tracker it reads:
`simple` changes at most one voter; `enter_joint` moves to the joint configuration
C_old,new; `leave_joint` moves on to C_new. `restore` rebuilds a tracker from a ConfState.
"""

from __future__ import annotations

from collections.abc import Sequence

from ww.raft.errors import ConfChangeError
from ww.raft.quorum import JointConfig
from ww.raft.tracker import Progress, ProgressTracker, TrackerConfig
from ww.raft.types import ConfChange, ConfChangeSingle, ConfChangeType, ConfState

ProgressMap = dict[int, Progress]


class Changer:
    """Computes configuration changes against `tracker`; `last_index` seeds new progress."""

    def __init__(self, tracker: ProgressTracker, last_index: int) -> None:
        self.tracker = tracker
        self.last_index = last_index

    def enter_joint(
        self, auto_leave: bool, changes: Sequence[ConfChangeSingle]
    ) -> tuple[TrackerConfig, ProgressMap]:
        cfg, prs = self._check_and_copy()
        if cfg.voters.is_joint():
            raise ConfChangeError("the configuration is already joint")
        if not cfg.voters.incoming:
            raise ConfChangeError("cannot make a zero-voter configuration joint")
        incoming = set(cfg.voters.incoming)
        cfg.voters = JointConfig(incoming, cfg.voters.incoming)
        self._apply(cfg, prs, changes)
        cfg.auto_leave = auto_leave
        return self._check_and_return(cfg, prs)

    def leave_joint(self) -> tuple[TrackerConfig, ProgressMap]:
        cfg, prs = self._check_and_copy()
        if not cfg.voters.is_joint():
            raise ConfChangeError("cannot leave a configuration that is not joint")
        for node in cfg.learners_next:
            cfg.learners.add(node)
            prs[node].is_learner = True
        cfg.learners_next = set()
        for node in cfg.voters.outgoing:
            if node not in cfg.voters.incoming and node not in cfg.learners:
                del prs[node]
        cfg.voters = JointConfig(cfg.voters.incoming)
        cfg.auto_leave = False
        return self._check_and_return(cfg, prs)

    def simple(self, changes: Sequence[ConfChangeSingle]) -> tuple[TrackerConfig, ProgressMap]:
        cfg, prs = self._check_and_copy()
        if cfg.voters.is_joint():
            raise ConfChangeError("cannot apply a simple change to a joint configuration")
        self._apply(cfg, prs, changes)
        changed = len(self.tracker.config.voters.incoming ^ cfg.voters.incoming)
        if changed > 1:
            raise ConfChangeError("more than one voter changed without a joint configuration")
        return self._check_and_return(cfg, prs)

    def apply(self, cc: ConfChange) -> tuple[TrackerConfig, ProgressMap]:
        """Dispatch like etcd's applyConfChange: leave, enter joint, or a simple change."""
        if cc.leave_joint():
            return self.leave_joint()
        auto_leave = enters_joint(cc)
        if auto_leave is not None:
            return self.enter_joint(auto_leave, cc.changes)
        return self.simple(cc.changes)

    # -- internals -----------------------------------------------------------------------------

    def _apply(
        self, cfg: TrackerConfig, prs: ProgressMap, changes: Sequence[ConfChangeSingle]
    ) -> None:
        for cc in changes:
            if cc.node_id == 0:
                continue  # a change the application chose not to make
            if cc.type == ConfChangeType.ADD_NODE:
                self._make_voter(cfg, prs, cc.node_id)
            elif cc.type == ConfChangeType.ADD_LEARNER:
                self._make_learner(cfg, prs, cc.node_id)
            elif cc.type == ConfChangeType.REMOVE_NODE:
                self._remove(cfg, prs, cc.node_id)
            else:  # pragma: no cover - ConfChangeType is closed
                raise ConfChangeError(f"unknown conf change type {cc.type!r}")
        if not cfg.voters.incoming:
            raise ConfChangeError("the change would remove all voters")

    def _init_progress(
        self, cfg: TrackerConfig, prs: ProgressMap, node: int, learner: bool
    ) -> None:
        if learner:
            cfg.learners.add(node)
        else:
            cfg.voters = JointConfig(cfg.voters.incoming | {node}, cfg.voters.outgoing)
        # recent_active: a new member must not make check-quorum fail before it is heard from.
        prs[node] = Progress(
            match=0,
            next=max(self.last_index, 1),
            inflights=self.tracker.new_inflights(),
            is_learner=learner,
            recent_active=True,
        )

    def _make_voter(self, cfg: TrackerConfig, prs: ProgressMap, node: int) -> None:
        pr = prs.get(node)
        if pr is None:
            self._init_progress(cfg, prs, node, learner=False)
            return
        pr.is_learner = False
        cfg.learners.discard(node)
        cfg.learners_next.discard(node)
        cfg.voters = JointConfig(cfg.voters.incoming | {node}, cfg.voters.outgoing)

    def _make_learner(self, cfg: TrackerConfig, prs: ProgressMap, node: int) -> None:
        pr = prs.get(node)
        if pr is None:
            self._init_progress(cfg, prs, node, learner=True)
            return
        if pr.is_learner:
            return
        # Demote: drop it as a voter, keep its progress.
        self._remove(cfg, prs, node)
        prs[node] = pr
        if node in cfg.voters.outgoing:
            # Still a voter of the outgoing config: becomes a learner when the joint ends.
            cfg.learners_next.add(node)
        else:
            pr.is_learner = True
            cfg.learners.add(node)

    def _remove(self, cfg: TrackerConfig, prs: ProgressMap, node: int) -> None:
        if node not in prs:
            return
        cfg.voters = JointConfig(cfg.voters.incoming - {node}, cfg.voters.outgoing)
        cfg.learners.discard(node)
        cfg.learners_next.discard(node)
        if node not in cfg.voters.outgoing:
            del prs[node]

    def _check_and_copy(self) -> tuple[TrackerConfig, ProgressMap]:
        cfg = self.tracker.config.clone()
        prs = {i: pr.clone() for i, pr in self.tracker.progress.items()}
        _check_invariants(cfg, prs)
        return cfg, prs

    def _check_and_return(
        self, cfg: TrackerConfig, prs: ProgressMap
    ) -> tuple[TrackerConfig, ProgressMap]:
        _check_invariants(cfg, prs)
        return cfg, prs


def enters_joint(cc: ConfChange) -> bool | None:
    """None if `cc` is applied by simple consensus; else whether to leave the joint
    configuration automatically."""
    if cc.transition != "auto" or len(cc.changes) > 1:
        if cc.transition not in ("auto", "implicit", "explicit"):
            raise ConfChangeError(f"unknown conf change transition {cc.transition!r}")
        return cc.transition in ("auto", "implicit")
    return None


def _check_invariants(cfg: TrackerConfig, prs: ProgressMap) -> None:
    for ids in (cfg.voters.ids(), cfg.learners, cfg.learners_next):
        for node in ids:
            if node not in prs:
                raise ConfChangeError(f"no progress for member {node}")
    for node in cfg.learners_next:
        if node not in cfg.voters.outgoing:
            raise ConfChangeError(f"{node} is in learners_next but not an outgoing voter")
        if prs[node].is_learner:
            raise ConfChangeError(f"{node} is in learners_next but already a learner")
    for node in cfg.learners:
        if node in cfg.voters.ids():
            raise ConfChangeError(f"{node} is both a learner and a voter")
        if not prs[node].is_learner:
            raise ConfChangeError(f"{node} is a learner whose progress is not")
    if not cfg.voters.is_joint():
        if cfg.learners_next:
            raise ConfChangeError("learners_next outside a joint configuration")
        if cfg.auto_leave:
            raise ConfChangeError("auto_leave outside a joint configuration")


def restore(changer: Changer, cs: ConfState) -> tuple[TrackerConfig, ProgressMap]:
    """Build the configuration `cs` describes from the (empty) tracker of `changer`, by
    replaying it as a sequence of changes as etcd's confchange.Restore does."""
    add, rm, learner = (
        ConfChangeType.ADD_NODE,
        ConfChangeType.REMOVE_NODE,
        ConfChangeType.ADD_LEARNER,
    )
    outgoing = [ConfChangeSingle(add, n) for n in cs.voters_outgoing]
    incoming = [ConfChangeSingle(rm, n) for n in cs.voters_outgoing]
    incoming += [ConfChangeSingle(add, n) for n in cs.voters]
    incoming += [ConfChangeSingle(learner, n) for n in cs.learners]
    incoming += [ConfChangeSingle(learner, n) for n in cs.learners_next]
    tracker = changer.tracker
    cfg, prs = tracker.config, tracker.progress

    def step(c: tuple[TrackerConfig, ProgressMap]) -> None:
        nonlocal cfg, prs
        cfg, prs = c
        tracker.config, tracker.progress = cfg, prs

    if not outgoing:
        for cc in incoming:
            step(changer.simple([cc]))
    else:
        for cc in outgoing:
            step(changer.simple([cc]))
        step(changer.enter_joint(cs.auto_leave, incoming))
    return cfg, prs
