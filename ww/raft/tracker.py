"""What a leader knows about each follower (`Progress`), the bounded window of appends in
flight to it (`Inflights`), and the configuration with its votes (`ProgressTracker`), as in
etcd's tracker package."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ww.raft.quorum import JointConfig, VoteResult
from ww.raft.types import ConfState


class ProgressState(enum.Enum):
    PROBE = "probe"
    """Send one append at a time and wait: the follower's log position is unknown."""
    REPLICATE = "replicate"
    """Stream appends optimistically, up to the inflight window."""
    SNAPSHOT = "snapshot"
    """A snapshot is on its way; send nothing until it is reported done."""


class Inflights:
    """The appends sent to one follower and not yet acknowledged: at most `size` messages and
    (if `max_bytes`) that many bytes of payload."""

    __slots__ = ("_queue", "bytes", "max_bytes", "size")

    def __init__(self, size: int, max_bytes: int = 0) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._queue: deque[tuple[int, int]] = deque()

    def clone(self) -> Inflights:
        c = Inflights(self.size, self.max_bytes)
        c.bytes = self.bytes
        c._queue = deque(self._queue)
        return c

    def add(self, index: int, nbytes: int) -> None:
        """Record an append whose last entry is `index` (indices must increase)."""
        if self.full():
            raise OverflowError("cannot add to a full inflights window")
        self._queue.append((index, nbytes))
        self.bytes += nbytes

    def free_le(self, to: int) -> None:
        """Forget every append whose last index is <= `to` (acknowledged)."""
        q = self._queue
        while q and q[0][0] <= to:
            self.bytes -= q.popleft()[1]

    def full(self) -> bool:
        return len(self._queue) >= self.size or (0 < self.max_bytes <= self.bytes)

    def count(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        self._queue.clear()
        self.bytes = 0


@dataclass(slots=True)
class Progress:
    """The leader's view of one follower: it has `match`, the next entry to send is `next`."""

    match: int
    next: int
    inflights: Inflights
    is_learner: bool = False
    state: ProgressState = ProgressState.PROBE
    pending_snapshot: int = 0
    """In SNAPSHOT state: the index of the snapshot sent."""
    recent_active: bool = False
    """Heard from within the last election timeout (check-quorum)."""
    msg_app_flow_paused: bool = False
    """PROBE: an append is outstanding. REPLICATE: the inflight window is full."""
    snapshot_ticks: int = 0
    """In SNAPSHOT state: ticks since the snapshot was sent."""
    sent_commit: int = 0
    """The largest commit index sent in an append (the follower may not have it yet)."""
    lease_sent: int = 0
    """The leader's tick at which it sent the latest heartbeat this voter answered (0: none
    in this leadership); dates the leader's lease."""
    diverged: bool = False
    """The follower's committed log contradicts the leader's: nothing is sent to it but
    heartbeats, and its acknowledgements are ignored."""

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.value} match={self.match} next={self.next}"
            f"{' learner' if self.is_learner else ''}"
            f"{f' pending_snap={self.pending_snapshot}' if self.pending_snapshot else ''}"
            f" inflight={self.inflights.count()}{' paused' if self.msg_app_flow_paused else ''}"
            f"{' diverged' if self.diverged else ''})"
        )

    def clone(self) -> Progress:
        return Progress(
            self.match,
            self.next,
            self.inflights.clone(),
            self.is_learner,
            self.state,
            self.pending_snapshot,
            self.recent_active,
            self.msg_app_flow_paused,
            self.snapshot_ticks,
            self.sent_commit,
            self.lease_sent,
            self.diverged,
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.msg_app_flow_paused = False
        self.pending_snapshot = 0
        self.snapshot_ticks = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1
        # Appends past next - 1 may have been lost, with the commit index they carried.
        self.sent_commit = min(self.sent_commit, self.next - 1)

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def sent_entries(self, entries: int, nbytes: int, last_index: int) -> None:
        """An append of `entries` entries ending at `last_index` went out."""
        if self.state == ProgressState.REPLICATE:
            if entries > 0:
                self.next = last_index + 1
                self.inflights.add(last_index, nbytes)
            self.msg_app_flow_paused = self.inflights.full()
        elif self.state == ProgressState.PROBE and entries > 0:
            self.msg_app_flow_paused = True

    def maybe_update(self, n: int) -> bool:
        """The follower acknowledged `n`; returns whether that was news."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.msg_app_flow_paused = False
        self.next = max(self.next, n + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an append at `rejected`, hinting its log matches up to
        `match_hint` at most. Returns False if the rejection is stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            self.sent_commit = min(self.sent_commit, self.next - 1)
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.sent_commit = min(self.sent_commit, self.next - 1)
        self.msg_app_flow_paused = False
        return True

    def can_bump_commit(self, index: int) -> bool:
        """Whether an (empty) append carrying commit `index` could tell the follower
        anything: it was not sent that index yet, nor one that covers all it has."""
        return index > self.sent_commit and self.sent_commit < self.next - 1

    def is_paused(self) -> bool:
        if self.state == ProgressState.SNAPSHOT or self.diverged:
            return True
        return self.msg_app_flow_paused


@dataclass(slots=True)
class TrackerConfig:
    """A configuration: voters (maybe joint), learners, and the learners-to-be of a joint
    change (voters of the outgoing config that become learners when it is left)."""

    voters: JointConfig = field(default_factory=JointConfig)
    learners: set[int] = field(default_factory=set)
    learners_next: set[int] = field(default_factory=set)
    auto_leave: bool = False

    def clone(self) -> TrackerConfig:
        return TrackerConfig(
            JointConfig(self.voters.incoming, self.voters.outgoing),
            set(self.learners),
            set(self.learners_next),
            self.auto_leave,
        )

    def __repr__(self) -> str:
        parts = [f"voters={self.voters!r}"]
        if self.learners:
            parts.append(f"learners={sorted(self.learners)}")
        if self.learners_next:
            parts.append(f"learners_next={sorted(self.learners_next)}")
        if self.auto_leave:
            parts.append("autoleave")
        return " ".join(parts)


class ProgressTracker:
    """The configuration, the progress of every member, and the votes of an election."""

    def __init__(self, max_inflight: int, max_inflight_bytes: int = 0) -> None:
        self.config = TrackerConfig()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes

    def new_inflights(self) -> Inflights:
        return Inflights(self.max_inflight, self.max_inflight_bytes)

    def conf_state(self) -> ConfState:
        c = self.config
        return ConfState(
            voters=tuple(sorted(c.voters.incoming)),
            learners=tuple(sorted(c.learners)),
            voters_outgoing=tuple(sorted(c.voters.outgoing)),
            learners_next=tuple(sorted(c.learners_next)),
            auto_leave=c.auto_leave,
        )

    def is_singleton(self) -> bool:
        v = self.config.voters
        return len(v.incoming) == 1 and not v.outgoing

    def committed(self) -> int:
        acked = {i: pr.match for i, pr in self.progress.items()}
        return self.config.voters.committed_index(acked)

    def visit(self, f: Callable[[int, Progress], None]) -> None:
        for i in sorted(self.progress):
            f(i, self.progress[i])

    def items(self) -> Iterator[tuple[int, Progress]]:
        for i in sorted(self.progress):
            yield i, self.progress[i]

    def quorum_active(self) -> bool:
        """Whether a quorum of voters was recently active (check-quorum)."""
        votes = {i: pr.recent_active for i, pr in self.progress.items() if not pr.is_learner}
        return self.config.voters.vote_result(votes) == VoteResult.WON

    def voter_nodes(self) -> list[int]:
        return sorted(self.config.voters.ids())

    def learner_nodes(self) -> list[int]:
        return sorted(self.config.learners)

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, node: int, granted: bool) -> None:
        self.votes.setdefault(node, granted)

    def tally_votes(self) -> tuple[int, int, VoteResult]:
        granted = rejected = 0
        for i, pr in self.progress.items():
            if pr.is_learner or i not in self.votes:
                continue
            if self.votes[i]:
                granted += 1
            else:
                rejected += 1
        return granted, rejected, self.config.voters.vote_result(self.votes)
