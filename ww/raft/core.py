"""The Raft state machine: no I/O, no clock. Shaped like etcd's raft.go.

`Raft.step(m)` handles one message; what it wants sent accumulates in `msgs` and leaves through
`read_messages()` (or a `Ready`). Each role has its own step function (`_step_leader`,
`_step_candidate`, `_step_follower`) and tick function; `step` itself handles what is common to
all roles: term changes, stale messages and votes.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace

from ww.raft import confchange
from ww.raft.errors import (
    ConfChangeError,
    ConfigError,
    InvalidMessageError,
    ProposalDroppedError,
    UncommittedSizeLimitError,
)
from ww.raft.log import RaftLog, payload_size
from ww.raft.quorum import VoteResult
from ww.raft.read_only import ReadOnly, ReadOnlyOption, request_ctx
from ww.raft.storage import CompactedError, Storage, UnavailableError
from ww.raft.tracker import Progress, ProgressState, ProgressTracker, TrackerConfig
from ww.raft.types import (
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageDecodeError,
    Snapshot,
)
from ww.raft.types import MessageType as MT

logger = logging.getLogger(__name__)

LEASE_MARGIN_TICKS = 2
"""A lease read is served at most `election_tick - LEASE_MARGIN_TICKS` ticks after the
heartbeat a quorum acknowledged was sent (see `Raft.lease_valid` and docs/raft.md)."""

CAMPAIGN_TRANSFER = b"CampaignTransfer"
"""Context of the votes of an election forced by a leadership transfer: they bypass the
leader lease."""


class StateType(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"
    PRE_CANDIDATE = "pre_candidate"


class CampaignType(enum.Enum):
    PRE_ELECTION = "pre_election"
    ELECTION = "election"
    TRANSFER = "transfer"


@dataclass(frozen=True, slots=True)
class Config:
    """How a node runs. Times are in ticks; sizes in bytes of entry data."""

    id: int
    _: KW_ONLY
    storage: Storage
    election_tick: int = 10
    """A follower that hears nothing for a random time in [election_tick, 2*election_tick)
    ticks starts an election."""
    heartbeat_tick: int = 1
    applied: int = 0
    """The last index the application applied (on restart)."""
    max_size_per_msg: int = 1 << 20
    max_committed_size_per_ready: int = 0
    """Bound on the committed entries of one Ready (at least one entry); 0 = no limit."""
    max_inflight_msgs: int = 256
    max_inflight_bytes: int = 0
    """0 = no byte bound on the inflight window."""
    max_uncommitted_entries_size: int = 1 << 26
    """0 = no limit."""
    check_quorum: bool = True
    pre_vote: bool = True
    read_only_option: ReadOnlyOption = ReadOnlyOption.SAFE
    disable_proposal_forwarding: bool = False
    snapshot_timeout_tick: int | None = None
    """A leader that hears nothing of a snapshot it sent (no `report_snapshot`, no answer
    showing it installed) for this many ticks sends a fresh one. None: 3 * election_tick;
    0: never (rely on report_snapshot)."""
    rng: random.Random | None = field(default=None, compare=False)
    """Source of the randomized election timeout; seed it for a deterministic run."""

    def validate(self) -> None:
        if self.id == NONE:
            raise ConfigError("config: id must not be 0 (0 means no node)")
        if self.heartbeat_tick <= 0:
            raise ConfigError(f"config: heartbeat_tick must be > 0, got {self.heartbeat_tick}")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError(
                f"config: election_tick ({self.election_tick}) must be greater than "
                f"heartbeat_tick ({self.heartbeat_tick})"
            )
        if self.snapshot_timeout_tick is not None and self.snapshot_timeout_tick < 0:
            raise ConfigError("config: snapshot_timeout_tick must be >= 0 or None")
        if self.max_inflight_msgs <= 0:
            raise ConfigError(
                f"config: max_inflight_msgs must be > 0, got {self.max_inflight_msgs}"
            )
        for name in (
            "max_size_per_msg",
            "max_uncommitted_entries_size",
            "max_committed_size_per_ready",
            "max_inflight_bytes",
            "applied",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"config: {name} must be >= 0")
        if self.read_only_option == ReadOnlyOption.LEASE_BASED and not self.check_quorum:
            raise ConfigError(
                "config: read_only_option=LEASE_BASED requires check_quorum=True "
                "(the lease is only valid while the leader checks its quorum)"
            )


@dataclass(slots=True)
class Stats:
    """Counters of what the node dropped, by reason (e.g. "stale_term", "unknown_peer")."""

    dropped_messages: Counter[str] = field(default_factory=Counter)
    dropped_proposals: int = 0

    def drop(self, reason: str) -> None:
        self.dropped_messages[reason] += 1


_VOTE_TYPES = frozenset({MT.VOTE, MT.VOTE_RESP, MT.PRE_VOTE, MT.PRE_VOTE_RESP})
_TERMLESS_TYPES = frozenset({MT.PROP, MT.READ_INDEX})


def _with_sender(m: Message, frm: int, term: int) -> Message:
    """`m` from `frm` at `term` (dataclasses.replace, without its cost on the hot path)."""
    return Message(
        m.type,
        m.to,
        frm,
        term,
        m.log_term,
        m.index,
        m.entries,
        m.commit,
        m.snapshot,
        m.reject,
        m.reject_hint,
        m.context,
    )


def _vote_resp_type(t: MT) -> MT:
    return MT.VOTE_RESP if t == MT.VOTE else MT.PRE_VOTE_RESP


class Raft:
    """One node's protocol state. Drive it with `tick()` and `step()`; take its output with
    `read_messages()` and from its log. `RawNode` wraps it with the Ready/advance cycle."""

    def __init__(self, c: Config) -> None:
        c.validate()
        self.id = c.id
        self.stats = Stats()
        self.raft_log = RaftLog(c.storage, c.max_committed_size_per_ready or None)
        hs, cs = c.storage.initial_state()
        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.state = StateType.FOLLOWER
        self.is_learner = False
        self.msgs: list[Message] = []
        self.read_states: list[tuple[int, bytes]] = []
        self.max_msg_size = c.max_size_per_msg
        self.max_uncommitted_size = c.max_uncommitted_entries_size
        self.prs = ProgressTracker(c.max_inflight_msgs, c.max_inflight_bytes)
        self.lead_transferee = NONE
        self.pending_conf_index = 0
        self.uncommitted_size = 0
        self.read_only_option = c.read_only_option
        self.read_only = ReadOnly(c.read_only_option)
        self.pending_read_index_messages: list[Message] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.clock = 1
        """Ticks since this node started, plus one (0 stands for "never" in lease bookkeeping).
        Heartbeats carry it and their answers echo it back (`_lease_start`)."""
        self.lease_ticks = c.election_tick - LEASE_MARGIN_TICKS
        # A node that (re)starts forgets which leader it heard last: with lease reads on, it
        # grants no vote during its first election timeout, as if it had just heard one.
        self._startup_hold = (
            c.election_tick if c.read_only_option == ReadOnlyOption.LEASE_BASED else 0
        )
        self._lease_revoked = False
        self.check_quorum = c.check_quorum
        self.pre_vote = c.pre_vote
        self.heartbeat_timeout = c.heartbeat_tick
        self.election_timeout = c.election_tick
        self.randomized_election_timeout = c.election_tick
        self.disable_proposal_forwarding = c.disable_proposal_forwarding
        self.snapshot_timeout = (
            3 * c.election_tick if c.snapshot_timeout_tick is None else c.snapshot_timeout_tick
        )
        self.rng = c.rng if c.rng is not None else random.Random()
        self._append_pending = False
        self._forward_buffer: list[Entry] = []
        self._step: Callable[[Message], None] = self._step_follower
        self._tick: Callable[[], None] = self._tick_election

        cfg, prs = confchange.restore(confchange.Changer(self.prs, self.raft_log.last_index()), cs)
        restored = self._switch_to_config(cfg, prs)
        if restored != _normalized(cs):
            raise ConfigError(f"storage conf state {cs} does not restore cleanly ({restored})")
        if not hs.is_empty():
            self._load_state(hs)
        if c.applied > 0:
            if not self.raft_log.applied <= c.applied <= self.raft_log.committed:
                raise ConfigError(
                    f"config: applied ({c.applied}) must be between the snapshot index "
                    f"({self.raft_log.applied}) and the committed index "
                    f"({self.raft_log.committed})"
                )
            self.raft_log.applied_to(c.applied)
        self.become_follower(self.term, NONE)
        logger.debug(
            "node %d: starting at term %d, commit %d, applied %d, last %d/%d, config %r",
            self.id,
            self.term,
            self.raft_log.committed,
            self.raft_log.applied,
            self.raft_log.last_index(),
            self.raft_log.last_term(),
            self.prs.config,
        )

    def __repr__(self) -> str:
        return (
            f"Raft(id={self.id}, {self.state.value}, term={self.term}, vote={self.vote}, "
            f"lead={self.lead}, commit={self.raft_log.committed}, "
            f"last={self.raft_log.last_index()})"
        )

    # -- state ---------------------------------------------------------------------------------

    def hard_state(self) -> HardState:
        return HardState(term=self.term, vote=self.vote, commit=self.raft_log.committed)

    def _load_state(self, hs: HardState) -> None:
        if not (self.raft_log.committed <= hs.commit <= self.raft_log.last_index()):
            raise ConfigError(
                f"hard state commit {hs.commit} is out of range "
                f"[{self.raft_log.committed}, {self.raft_log.last_index()}]"
            )
        self.raft_log.committed = hs.commit
        self.term = hs.term
        self.vote = hs.vote

    def promotable(self) -> bool:
        """Whether this node may become leader: a voter with no snapshot to install."""
        pr = self.prs.progress.get(self.id)
        return pr is not None and not pr.is_learner and not self.raft_log.has_pending_snapshot()

    def read_messages(self) -> list[Message]:
        """Take the messages to send (flushing the appends batched from proposals)."""
        self.flush_appends()
        msgs, self.msgs = self.msgs, []
        return msgs

    def has_pending_appends(self) -> bool:
        return self._append_pending or bool(self._forward_buffer)

    def flush_appends(self) -> None:
        """Send what proposals produced since the last flush: on a leader, the new entries
        as one append per follower (more only past max_size_per_msg); on a follower, the
        proposals to forward as one message to the leader."""
        if self._append_pending:
            self._append_pending = False
            if self.state == StateType.LEADER:
                self._send_pending_appends()
        if self._forward_buffer:
            ents, self._forward_buffer = self._forward_buffer, []
            if self.state == StateType.FOLLOWER and self.lead != NONE:
                self.send(Message(type=MT.PROP, to=self.lead, entries=tuple(ents)))
            else:
                self.stats.drop("forwarded_proposals_lost")

    # -- sending -------------------------------------------------------------------------------

    def send(self, m: Message) -> None:
        frm = m.frm if m.frm != NONE else self.id
        if m.type in _VOTE_TYPES:
            assert m.term != 0, f"term should be set when sending {m.type.name}"
            term = m.term
        elif m.type in _TERMLESS_TYPES:
            term = 0  # forwarded to the leader: no term, like a local message
        else:
            term = self.term
        if frm != m.frm or term != m.term:
            m = _with_sender(m, frm, term)
        self.msgs.append(m)

    def send_append(self, to: int) -> None:
        self.maybe_send_append(to, send_if_empty=True)

    def maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        """Send `to` an append with the entries it lacks (or a snapshot if they are
        compacted). Returns whether a message was sent."""
        pr = self.prs.progress[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        try:
            prev_term = self.raft_log.term(prev_index)
            ents: list[Entry] = []
            if pr.state != ProgressState.REPLICATE or not pr.inflights.full():
                ents = self.raft_log.entries(pr.next, self.max_msg_size)
        except CompactedError:
            return self._maybe_send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        self.send(
            Message(
                type=MT.APP,
                to=to,
                index=prev_index,
                log_term=prev_term,
                entries=tuple(ents),
                commit=self.raft_log.committed,
            )
        )
        last = ents[-1].index if ents else prev_index
        pr.sent_entries(len(ents), payload_size(ents), last)
        pr.sent_commit = self.raft_log.committed
        return True

    def _maybe_send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            logger.debug("node %d: not sending a snapshot to inactive %d", self.id, to)
            return False
        snapshot = self.raft_log.snapshot()
        if snapshot.is_empty():
            logger.warning("node %d: log of %d is compacted but no snapshot exists", self.id, to)
            return False
        pr.become_snapshot(snapshot.metadata.index)
        logger.debug(
            "node %d: sending snapshot at %d/%d to %d",
            self.id,
            snapshot.metadata.index,
            snapshot.metadata.term,
            to,
        )
        self.send(Message(type=MT.SNAP, to=to, snapshot=snapshot))
        return True

    def send_heartbeat(self, to: int, ctx: bytes) -> None:
        # Never tell a follower to commit past what it is known to have.
        commit = min(self.prs.progress[to].match, self.raft_log.committed)
        # `index` is the tick it leaves at; the answer echoes it, which dates the lease.
        self.send(Message(type=MT.HEARTBEAT, to=to, commit=commit, context=ctx, index=self.clock))

    def bcast_append(self) -> None:
        for i, pr in self.prs.items():
            if i == self.id:
                continue
            self.send_append(i)
            # In REPLICATE, keep streaming up to the inflight window.
            while pr.state == ProgressState.REPLICATE and self.maybe_send_append(i, False):
                pass

    def _send_pending_appends(self) -> None:
        """Send every follower the entries it lacks (streaming up to the inflight window),
        or an empty append if only the commit index it knows is behind."""
        committed = self.raft_log.committed
        for i, pr in self.prs.items():
            if i == self.id:
                continue
            sent = False
            while self.maybe_send_append(i, False):
                sent = True
                if pr.state != ProgressState.REPLICATE:
                    break
            if not sent and pr.can_bump_commit(committed):
                self.maybe_send_append(i, True)

    def bcast_heartbeat(self) -> None:
        self._bcast_heartbeat_with_ctx(self.read_only.last_pending_request_ctx())

    def _bcast_heartbeat_with_ctx(self, ctx: bytes) -> None:
        for i in sorted(self.prs.progress):
            if i != self.id:
                self.send_heartbeat(i, ctx)

    # -- commit and append ---------------------------------------------------------------------

    def maybe_commit(self) -> bool:
        return self.raft_log.maybe_commit(self.prs.committed(), self.term)

    def append_entry(self, entries: Sequence[Entry]) -> None:
        """Append entries (their term and index are assigned here) to the leader's log."""
        li = self.raft_log.last_index()
        term = self.term
        ents = [Entry(term, li + 1 + i, e.type, e.data) for i, e in enumerate(entries)]
        size = payload_size(ents)
        if (
            self.max_uncommitted_size > 0
            and self.uncommitted_size > 0
            and size > 0
            and self.uncommitted_size + size > self.max_uncommitted_size
        ):
            raise UncommittedSizeLimitError(
                "proposal refused: uncommitted entries would exceed "
                f"max_uncommitted_entries_size={self.max_uncommitted_size} bytes "
                f"({self.uncommitted_size} uncommitted + {size} proposed)"
            )
        self.uncommitted_size += size
        # The leader's own acknowledgement of these entries comes from `advance`, once they
        # are saved: until then they count toward no commit, even for a single voter.
        self.raft_log.append(ents)

    def reduce_uncommitted_size(self, entries: Sequence[Entry]) -> None:
        self.uncommitted_size = max(0, self.uncommitted_size - payload_size(entries))

    def advance(
        self,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        committed_entries: Sequence[Entry],
    ) -> None:
        """The application persisted `entries` and `snapshot` and applied
        `committed_entries` (or installed `snapshot`)."""
        self.reduce_uncommitted_size(committed_entries)
        applied = 0
        if committed_entries:
            applied = committed_entries[-1].index
        elif snapshot is not None:
            applied = snapshot.metadata.index
        if applied > 0:
            old = self.raft_log.applied
            self.raft_log.applied_to(applied)
            if (
                self.prs.config.auto_leave
                and old <= self.pending_conf_index <= applied
                and self.state == StateType.LEADER
            ):
                # The joint configuration is applied: leave it (an empty conf change).
                leave = Entry(0, 0, type=EntryType.CONF_CHANGE, data=ConfChange().encode())
                self.append_entry([leave])
                self.pending_conf_index = self.raft_log.last_index()
                self._append_pending = True
        if entries:
            self.raft_log.stable_to(entries[-1].index, entries[-1].term)
            self._ack_own_entries(entries[-1].index, entries[-1].term)
        if snapshot is not None:
            self.raft_log.stable_snap_to(snapshot.metadata.index)

    def _ack_own_entries(self, index: int, term: int) -> None:
        """The leader's entries up to `index` are on its disk: acknowledge them (etcd's
        self-addressed MsgAppResp after the storage write). This may commit, and the new
        commit index goes out with the next appends."""
        pr = self.prs.progress.get(self.id)
        if (
            self.state != StateType.LEADER
            or pr is None
            or not self.raft_log.match_term(index, term)
            or not pr.maybe_update(index)
        ):
            return
        if self.maybe_commit():
            self._release_pending_read_index_messages()
            self._append_pending = True

    # -- ticks ---------------------------------------------------------------------------------

    def tick(self) -> None:
        self.clock += 1
        self._tick()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.past_election_timeout():
            self.election_elapsed = 0
            self.step(Message(type=MT.HUP, frm=self.id))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            if self.check_quorum:
                self.step(Message(type=MT.CHECK_QUORUM, frm=self.id))
            if self.state == StateType.LEADER and self.lead_transferee != NONE:
                # The transfer did not finish within an election timeout: give up on it.
                self.abort_leader_transfer()
        if self.state != StateType.LEADER:
            return
        if self.snapshot_timeout > 0:
            self._expire_snapshots()
        if self.heartbeat_elapsed >= self.heartbeat_timeout:
            self.heartbeat_elapsed = 0
            self.step(Message(type=MT.BEAT, frm=self.id))

    def _expire_snapshots(self) -> None:
        for i, pr in self.prs.items():
            if pr.state != ProgressState.SNAPSHOT:
                continue
            pr.snapshot_ticks += 1
            if pr.snapshot_ticks >= self.snapshot_timeout:
                # Presumed lost: probe again, which sends a fresh snapshot if still needed.
                logger.info("node %d: snapshot to %d timed out; retrying", self.id, i)
                pr.pending_snapshot = 0
                pr.become_probe()

    def past_election_timeout(self) -> bool:
        return self.election_elapsed >= self.randomized_election_timeout

    def reset_randomized_election_timeout(self) -> None:
        self.randomized_election_timeout = self.election_timeout + self.rng.randrange(
            self.election_timeout
        )

    # -- role changes --------------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.reset_randomized_election_timeout()
        self.abort_leader_transfer()
        self.prs.reset_votes()
        last = self.raft_log.last_index()
        stable = self.raft_log.last_stable_index()
        for i, pr in self.prs.progress.items():
            pr.match = stable if i == self.id else 0
            pr.next = last + 1
            pr.inflights = self.prs.new_inflights()
            pr.state = ProgressState.PROBE
            pr.pending_snapshot = 0
            pr.msg_app_flow_paused = False
            pr.recent_active = False
            pr.sent_commit = 0
            pr.diverged = False
            pr.lease_sent = 0
        self.pending_conf_index = 0
        self.uncommitted_size = 0
        self._append_pending = False
        if self._forward_buffer:
            # The leader we meant to forward to is gone (as a forwarded message may be lost).
            self.stats.drop("forwarded_proposals_lost")
            self._forward_buffer = []
        self.read_only = ReadOnly(self.read_only_option)
        self.pending_read_index_messages = []
        self._lease_revoked = False

    def become_follower(self, term: int, lead: int) -> None:
        self._step = self._step_follower
        self._reset(term)
        self._tick = self._tick_election
        self.lead = lead
        self.state = StateType.FOLLOWER
        logger.debug("node %d became follower at term %d (leader %d)", self.id, term, lead)

    def become_candidate(self) -> None:
        if self.state == StateType.LEADER:
            raise AssertionError("invalid transition [leader -> candidate]")
        self._step = self._step_candidate
        self._reset(self.term + 1)
        self._tick = self._tick_election
        self.vote = self.id
        self.state = StateType.CANDIDATE
        logger.debug("node %d became candidate at term %d", self.id, self.term)

    def become_pre_candidate(self) -> None:
        if self.state == StateType.LEADER:
            raise AssertionError("invalid transition [leader -> pre-candidate]")
        # Neither the term nor the vote changes: a pre-candidate disturbs nobody.
        self._step = self._step_candidate
        self.prs.reset_votes()
        self._tick = self._tick_election
        self.lead = NONE
        self.state = StateType.PRE_CANDIDATE
        logger.debug("node %d became pre-candidate at term %d", self.id, self.term)

    def become_leader(self) -> None:
        if self.state == StateType.FOLLOWER:
            raise AssertionError("invalid transition [follower -> leader]")
        self._step = self._step_leader
        self._reset(self.term)
        self._tick = self._tick_heartbeat
        self.lead = self.id
        self.state = StateType.LEADER
        pr = self.prs.progress[self.id]
        pr.become_replicate()
        pr.recent_active = True
        # Conservatively treat every entry up to here as a possible unapplied conf change.
        self.pending_conf_index = self.raft_log.last_index()
        # An empty entry of the new term: once it commits, so has everything before it (§5.4.2).
        # It carries no payload, so the uncommitted-size limit cannot refuse it.
        self.append_entry([Entry(term=0, index=0)])
        logger.info("node %d became leader at term %d", self.id, self.term)

    def hup(self, t: CampaignType) -> None:
        if self.state == StateType.LEADER:
            logger.debug("node %d ignoring HUP: already leader", self.id)
            return
        if not self.promotable():
            logger.debug("node %d is not promotable and cannot campaign", self.id)
            self.stats.drop("hup_not_promotable")
            return
        if self._has_unapplied_conf_changes():
            logger.warning("node %d cannot campaign: conf changes are pending apply", self.id)
            self.stats.drop("hup_pending_conf_change")
            return
        self.campaign(t)

    def _has_unapplied_conf_changes(self) -> bool:
        log = self.raft_log
        if log.applied >= log.committed:
            return False
        try:
            ents = log.slice(max(log.applied + 1, log.first_index()), log.committed + 1)
        except (CompactedError, UnavailableError):
            return False
        return any(e.type == EntryType.CONF_CHANGE for e in ents)

    def campaign(self, t: CampaignType) -> None:
        if not self.promotable():
            logger.warning("node %d is not promotable; refusing to campaign", self.id)
            return
        if t == CampaignType.PRE_ELECTION:
            self.become_pre_candidate()
            vote_msg = MT.PRE_VOTE
            term = self.term + 1  # the term we would campaign at; not adopted yet
        else:
            self.become_candidate()
            vote_msg = MT.VOTE
            term = self.term
        if self._poll(self.id, _vote_resp_type(vote_msg), True) == VoteResult.WON:
            # A single-voter configuration wins at once.
            if t == CampaignType.PRE_ELECTION:
                self.campaign(CampaignType.ELECTION)
            else:
                self.become_leader()
            return
        ctx = CAMPAIGN_TRANSFER if t == CampaignType.TRANSFER else b""
        for i in self.prs.voter_nodes():
            if i == self.id:
                continue
            self.send(
                Message(
                    type=vote_msg,
                    to=i,
                    term=term,
                    index=self.raft_log.last_index(),
                    log_term=self.raft_log.last_term(),
                    context=ctx,
                )
            )

    def _poll(self, node: int, t: MT, granted: bool) -> VoteResult:
        logger.debug(
            "node %d received %s %s from %d at term %d",
            self.id,
            t.name,
            "grant" if granted else "rejection",
            node,
            self.term,
        )
        self.prs.record_vote(node, granted)
        return self.prs.tally_votes()[2]

    # -- step ----------------------------------------------------------------------------------

    def step(self, m: Message) -> None:
        """Handle one message. Raises a RaftError (without side effects) for a proposal that
        cannot be accepted or a message that contradicts the log."""
        if m.term == 0:
            pass  # local message (or a forwarded proposal / read)
        elif m.term > self.term:
            if m.type in (MT.VOTE, MT.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = self.check_quorum and (
                    (self.lead != NONE and self.election_elapsed < self.election_timeout)
                    or self.clock <= self._startup_hold
                )
                if not force and in_lease:
                    # We heard from a live leader within the election timeout: its lease holds,
                    # so neither update the term nor grant the vote.
                    logger.debug(
                        "node %d ignoring %s from %d at term %d: lease of leader %d",
                        self.id,
                        m.type.name,
                        m.frm,
                        m.term,
                        self.lead,
                    )
                    self.stats.drop("vote_in_lease")
                    return
            if m.type == MT.PRE_VOTE:
                pass  # never change our term in response to a pre-vote
            elif m.type == MT.PRE_VOTE_RESP and not m.reject:
                pass  # the term is adopted when the pre-vote wins
            else:
                if m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
                    self.become_follower(m.term, m.frm)
                else:
                    self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and m.type in (MT.HEARTBEAT, MT.APP):
                # A leader cut off by a partition: tell it about the newer term so it steps
                # down (with check-quorum/pre-vote, our term would never reach it otherwise).
                self.send(Message(type=MT.APP_RESP, to=m.frm))
            elif m.type == MT.PRE_VOTE:
                # Reject so the pre-candidate learns our term and gives up.
                self.send(Message(type=MT.PRE_VOTE_RESP, to=m.frm, term=self.term, reject=True))
            else:
                self.stats.drop("stale_term")
            return

        if m.type == MT.HUP:
            self.hup(CampaignType.PRE_ELECTION if self.pre_vote else CampaignType.ELECTION)
        elif m.type in (MT.VOTE, MT.PRE_VOTE):
            # We can vote for whom we voted for already, or anyone if we have no vote and no
            # leader in this term, or (pre-vote) for any future term.
            can_vote = (
                self.vote == m.frm
                or (self.vote == NONE and self.lead == NONE)
                or (m.type == MT.PRE_VOTE and m.term > self.term)
            )
            if can_vote and self.raft_log.is_up_to_date(m.index, m.log_term):
                # For a pre-vote answer with the candidate's term, so it can tell the answer
                # apart from stale ones.
                self.send(Message(type=_vote_resp_type(m.type), to=m.frm, term=m.term))
                if m.type == MT.VOTE:
                    self.election_elapsed = 0
                    self.vote = m.frm
            else:
                self.send(
                    Message(type=_vote_resp_type(m.type), to=m.frm, term=self.term, reject=True)
                )
        else:
            self._step(m)

    # -- leader --------------------------------------------------------------------------------

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MT.BEAT:
            self.bcast_heartbeat()
            return
        if t == MT.CHECK_QUORUM:
            if not self.prs.quorum_active():
                logger.warning("node %d stepped down: no quorum active", self.id)
                self.become_follower(self.term, NONE)
            for i, other in self.prs.progress.items():
                if i != self.id:
                    other.recent_active = False
            return
        if t == MT.PROP:
            self._leader_propose(m)
            return
        if t == MT.READ_INDEX:
            if self.prs.is_singleton():
                resp = self._response_to_read_index_req(m, self.raft_log.committed)
                if resp is not None:
                    self.send(resp)
            elif not self._committed_entry_in_current_term():
                # A new leader must not answer before it knows the commit index (§6.4):
                # postpone until its empty entry commits.
                self.pending_read_index_messages.append(m)
            else:
                self._send_read_index_response(m)
            return

        pr = self.prs.progress.get(m.frm)
        if pr is None:
            self.stats.drop("unknown_peer")
            return
        if t == MT.APP_RESP:
            self._handle_append_response(m, pr)
        elif t == MT.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.msg_app_flow_paused = False
            if pr.lease_sent < m.index <= self.clock:
                pr.lease_sent = m.index
            if pr.state == ProgressState.SNAPSHOT and m.commit >= pr.pending_snapshot > 0:
                # The follower's commit index shows it installed the snapshot, though its
                # answer to the snapshot was lost: resume without waiting for report_snapshot.
                pr.maybe_update(min(m.commit, self.raft_log.last_index()))
                pr.become_probe()
            if pr.match < self.raft_log.last_index() or pr.state == ProgressState.PROBE:
                self.send_append(m.frm)
            if not m.context:
                return
            acks = self.read_only.recv_ack(m.frm, m.context)
            if acks is None or self.prs.config.voters.vote_result(acks) != VoteResult.WON:
                return
            for rs in self.read_only.advance(m.context):
                resp = self._response_to_read_index_req(rs.req, rs.index)
                if resp is not None:
                    self.send(resp)
        elif t == MT.SNAP_STATUS:
            if pr.state != ProgressState.SNAPSHOT:
                return
            if m.reject:
                # The snapshot did not arrive: forget it, probe (a later send retries it).
                pr.pending_snapshot = 0
            pr.become_probe()
            # Wait for the follower's answer to a heartbeat before probing.
            pr.msg_app_flow_paused = True
        elif t == MT.UNREACHABLE:
            # Appends in flight were probably lost.
            if pr.state == ProgressState.REPLICATE:
                pr.become_probe()
        elif t == MT.TRANSFER_LEADER:
            self._handle_transfer_leader(m, pr)
        else:
            self.stats.drop(f"leader_ignores_{t.name.lower()}")

    def _leader_propose(self, m: Message) -> None:
        if not m.entries:
            raise InvalidMessageError("proposal without entries")
        if self.id not in self.prs.progress:
            # Removed from the configuration: cannot accept proposals.
            raise ProposalDroppedError("proposal dropped: this node is not a member")
        if self.lead_transferee != NONE:
            raise ProposalDroppedError(
                f"proposal dropped: leadership is being transferred to {self.lead_transferee}"
            )
        li = self.raft_log.last_index()
        pending_conf_index = self.pending_conf_index
        for i, e in enumerate(m.entries):
            if e.type != EntryType.CONF_CHANGE:
                continue
            self._check_conf_change(e, pending_conf_index)
            pending_conf_index = li + i + 1
        self.append_entry(m.entries)
        self.pending_conf_index = pending_conf_index
        # Sent on flush, so proposals that arrive together travel together.
        self._append_pending = True

    def _check_conf_change(self, e: Entry, pending_conf_index: int) -> None:
        """Refuse a conf change unless it can apply to the configuration it will meet: the
        previous one is applied, and it leaves a joint configuration iff we are in one."""
        try:
            cc = ConfChange.decode(e.data)
        except MessageDecodeError as err:
            raise ConfChangeError(f"conf change refused: {err}") from err
        joint = self.prs.config.voters.is_joint()
        if pending_conf_index > self.raft_log.applied:
            raise ConfChangeError(
                f"conf change refused: the change at index {pending_conf_index} "
                f"is not applied yet (applied {self.raft_log.applied})"
            )
        if joint and not cc.leave_joint():
            raise ConfChangeError("conf change refused: leave the joint configuration first")
        if not joint and cc.leave_joint():
            raise ConfChangeError("conf change refused: not in a joint configuration")
        try:
            confchange.Changer(self.prs, self.raft_log.last_index()).apply(cc)
        except ConfChangeError as err:
            raise ConfChangeError(f"conf change refused: {err}") from err

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        if pr.diverged:
            self.stats.drop("diverged_follower")
            return
        if m.index > self.raft_log.last_index():
            self.stats.drop("app_resp_past_last_index")
            return
        if m.reject:
            # Skip straight to the last index where the follower's log may match.
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.raft_log.find_conflict_by_term(m.reject_hint, m.log_term)
            if m.index < m.commit or next_probe < m.commit:
                # While the follower's committed prefix agrees with our log, it rejects only
                # above its commit index and our probe never goes below it (see docs/raft.md).
                self._follower_diverged(m, pr, next_probe)
                return
            if pr.maybe_decr_to(m.index, next_probe):
                logger.debug("node %d: %d rejected %d, now %r", self.id, m.frm, m.index, pr)
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self.send_append(m.frm)
            return
        if not (
            pr.maybe_update(m.index) or (pr.match == m.index and pr.state == ProgressState.PROBE)
        ):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and (
            pr.match >= pr.pending_snapshot or pr.match + 1 >= self.raft_log.first_index()
        ):
            # The follower installed the snapshot (or caught up past it without one): replicate
            # again, from a newer snapshot if the log was compacted meanwhile. No
            # report_snapshot is needed for this.
            pr.become_probe()
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self.maybe_commit():
            self._release_pending_read_index_messages()
        # What this follower now lacks, and any new commit index for everyone, go out at the
        # next flush: the acknowledgements handled together cost one append per follower.
        self._append_pending = True
        if m.frm == self.lead_transferee and pr.match == self.raft_log.last_index():
            logger.info("node %d: %d caught up; sending TimeoutNow", self.id, m.frm)
            self._lease_revoked = True
            self.send(Message(type=MT.TIMEOUT_NOW, to=m.frm))

    def _follower_diverged(self, m: Message, pr: Progress, next_probe: int) -> None:
        """The follower's committed log contradicts ours, which only a bug or lost storage
        can cause, and no append can repair: say so once and stop replicating to it (it
        would otherwise reject and be probed again without end)."""
        logger.error(
            "node %d: node %d diverges from the leader's log below its commit index %d "
            "(it rejected the append at %d; our logs can match only up to %d); not "
            "replicating to it any more: restore its data or replace it",
            self.id,
            m.frm,
            m.commit,
            m.index,
            next_probe,
        )
        self.stats.drop("diverged_follower")
        pr.diverged = True
        pr.match = 0  # what it acknowledged cannot be trusted: it counts toward no commit
        pr.become_probe()

    def _handle_transfer_leader(self, m: Message, pr: Progress) -> None:
        if pr.is_learner:
            self.stats.drop("transfer_to_learner")
            return
        transferee = m.frm
        if self.lead_transferee != NONE:
            if self.lead_transferee == transferee:
                return  # already under way
            self.abort_leader_transfer()
        if transferee == self.id:
            return  # already the leader
        logger.info("node %d: transferring leadership to %d", self.id, transferee)
        # The transfer must finish within an election timeout or it is aborted.
        self.election_elapsed = 0
        self.lead_transferee = transferee
        if pr.match == self.raft_log.last_index():
            self._lease_revoked = True
            self.send(Message(type=MT.TIMEOUT_NOW, to=transferee))
        else:
            self.send_append(transferee)

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE

    def _committed_entry_in_current_term(self) -> bool:
        return self.raft_log.zero_term_on_out_of_bounds(self.raft_log.committed) == self.term

    def _release_pending_read_index_messages(self) -> None:
        if not self.pending_read_index_messages or not self._committed_entry_in_current_term():
            return
        msgs, self.pending_read_index_messages = self.pending_read_index_messages, []
        for m in msgs:
            self._send_read_index_response(m)

    def _send_read_index_response(self, m: Message) -> None:
        if self.read_only_option == ReadOnlyOption.LEASE_BASED and self.lease_valid():
            resp = self._response_to_read_index_req(m, self.raft_log.committed)
            if resp is not None:
                self.send(resp)
            return
        # SAFE, or a lease that does not hold now: confirm leadership with a quorum.
        ctx = request_ctx(m)
        self.read_only.add_request(self.raft_log.committed, m)
        self.read_only.recv_ack(self.id, ctx)
        self._bcast_heartbeat_with_ctx(ctx)

    def _lease_start(self) -> int:
        """The latest tick at which this leader sent heartbeats that a quorum of voters
        (itself included, at the current tick) has acknowledged; 0 if none."""
        sent = {i: pr.lease_sent for i, pr in self.prs.progress.items()}
        sent[self.id] = self.clock
        return self.prs.config.voters.committed_index(sent)

    def lease_valid(self) -> bool:
        """Whether no other node can have been elected yet, so that this leader may answer
        a read from its own state. A voter that acknowledged a heartbeat sent at tick s
        refuses every vote until `election_tick` of its own ticks have passed since it got
        it (check-quorum), i.e. for more than `election_tick - 1` tick periods after s; the
        lease ends `LEASE_MARGIN_TICKS` ticks before that, at s + lease_ticks, leaving one
        tick period for clock drift and tick-processing delay. Revoked once this leader
        hands leadership on (TimeoutNow makes its target campaign at once)."""
        if self.state != StateType.LEADER or self._lease_revoked or self.lead_transferee:
            return False
        start = self._lease_start()
        return start > 0 and self.clock - start < self.lease_ticks

    def _response_to_read_index_req(self, req: Message, read_index: int) -> Message | None:
        if req.frm in (NONE, self.id):
            self.read_states.append((read_index, request_ctx(req)))
            return None
        return Message(type=MT.READ_INDEX_RESP, to=req.frm, index=read_index, entries=req.entries)

    # -- candidate -----------------------------------------------------------------------------

    def _step_candidate(self, m: Message) -> None:
        # Only answers to our own kind of vote count; the others are stale.
        my_resp = MT.PRE_VOTE_RESP if self.state == StateType.PRE_CANDIDATE else MT.VOTE_RESP
        t = m.type
        if t == MT.PROP:
            raise ProposalDroppedError("proposal dropped: no leader (election in progress)")
        if t == MT.APP:
            self.become_follower(m.term, m.frm)  # always m.term == self.term
            self._handle_append_entries(m)
        elif t == MT.HEARTBEAT:
            self.become_follower(m.term, m.frm)
            self._handle_heartbeat(m)
        elif t == MT.SNAP:
            self.become_follower(m.term, m.frm)
            self._handle_snapshot(m)
        elif t == my_resp:
            result = self._poll(m.frm, t, not m.reject)
            if result == VoteResult.WON:
                if self.state == StateType.PRE_CANDIDATE:
                    self.campaign(CampaignType.ELECTION)
                else:
                    self.become_leader()
                    self.bcast_append()
            elif result == VoteResult.LOST:
                # A pre-vote rejection with a higher term was handled by step(); this keeps
                # our term for pre-vote and the new one for a real vote.
                self.become_follower(self.term, NONE)
        elif t == MT.READ_INDEX:
            self.stats.drop("read_index_no_leader")
        else:
            self.stats.drop(f"candidate_ignores_{t.name.lower()}")

    # -- follower ------------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MT.PROP:
            if self.lead == NONE:
                raise ProposalDroppedError("proposal dropped: no leader is known")
            if self.disable_proposal_forwarding:
                raise ProposalDroppedError(
                    f"proposal dropped: forwarding to leader {self.lead} is disabled"
                )
            # Held until the next flush: proposals made together are forwarded together.
            self._forward_buffer.extend(m.entries)
        elif t == MT.APP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append_entries(m)
        elif t == MT.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif t == MT.SNAP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif t == MT.TRANSFER_LEADER:
            if self.lead == NONE:
                self.stats.drop("transfer_no_leader")
                return
            self.send(replace(m, to=self.lead))
        elif t == MT.TIMEOUT_NOW:
            # The leader chose us: campaign at once, bypassing pre-vote and leases.
            logger.info("node %d: TimeoutNow from %d; campaigning", self.id, m.frm)
            self.hup(CampaignType.TRANSFER)
        elif t == MT.READ_INDEX:
            if self.lead == NONE:
                self.stats.drop("read_index_no_leader")
                return
            self.send(replace(m, to=self.lead))
        elif t == MT.READ_INDEX_RESP:
            self.read_states.append((m.index, request_ctx(m)))
        else:
            self.stats.drop(f"follower_ignores_{t.name.lower()}")

    def _handle_append_entries(self, m: Message) -> None:
        if m.index < self.raft_log.committed:
            self.send(Message(type=MT.APP_RESP, to=m.frm, index=self.raft_log.committed))
            return
        last = self.raft_log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last is not None:
            self.send(Message(type=MT.APP_RESP, to=m.frm, index=last))
            return
        # Reject, with a hint: our last index at or below m.index whose term is <= m.log_term.
        # The leader can skip every index in between (etcd's findConflictByTerm).
        hint_index = min(m.index, self.raft_log.last_index())
        hint_index, hint_term = self.raft_log.find_conflict_by_term(hint_index, m.log_term)
        logger.debug(
            "node %d rejected append at %d/%d from %d (hint %d/%d)",
            self.id,
            m.index,
            m.log_term,
            m.frm,
            hint_index,
            hint_term,
        )
        self.send(
            Message(
                type=MT.APP_RESP,
                to=m.frm,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
                # Lets the leader notice a committed prefix that disagrees with its log.
                commit=self.raft_log.committed,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self.raft_log.commit_to(min(m.commit, self.raft_log.last_index()))
        # Our commit index tells a leader waiting on a snapshot that it arrived.
        self.send(
            Message(
                type=MT.HEARTBEAT_RESP,
                to=m.frm,
                context=m.context,
                commit=self.raft_log.committed,
                index=m.index,  # the leader's send tick, for its lease
            )
        )

    def _handle_snapshot(self, m: Message) -> None:
        assert m.snapshot is not None
        s = m.snapshot
        if self.restore(s):
            logger.info(
                "node %d restored snapshot %d/%d", self.id, s.metadata.index, s.metadata.term
            )
            self.send(Message(type=MT.APP_RESP, to=m.frm, index=self.raft_log.last_index()))
        else:
            self.send(Message(type=MT.APP_RESP, to=m.frm, index=self.raft_log.committed))

    def restore(self, s: Snapshot) -> bool:
        """Install snapshot `s` if it is news; returns whether it was installed."""
        meta = s.metadata
        if meta.index <= self.raft_log.committed:
            return False
        if self.state != StateType.FOLLOWER:
            # Only a follower installs snapshots (a leader never gets one in its own term).
            logger.warning("node %d: snapshot while %s; stepping down", self.id, self.state)
            self.become_follower(self.term + 1, NONE)
            return False
        cs = meta.conf_state
        # A snapshot whose configuration lacks us (one taken before we were added) is still
        # committed state from the current leader: install it. We stay a non-voting follower
        # until we apply the entry that adds us. (etcd refuses it and relies on the server
        # to send a fresher snapshot.)
        if self.raft_log.match_term(meta.index, meta.term):
            # We have the snapshot's last entry: just fast-forward the commit index.
            self.raft_log.commit_to(meta.index)
            return False
        self.raft_log.restore(s)
        self.prs = ProgressTracker(self.prs.max_inflight, self.prs.max_inflight_bytes)
        cfg, prs = confchange.restore(confchange.Changer(self.prs, self.raft_log.last_index()), cs)
        self._switch_to_config(cfg, prs)
        pr = self.prs.progress.get(self.id)
        if pr is not None:
            pr.maybe_update(pr.next - 1)
        return True

    # -- membership ----------------------------------------------------------------------------

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        cfg, prs = confchange.Changer(self.prs, self.raft_log.last_index()).apply(cc)
        return self._switch_to_config(cfg, prs)

    def _switch_to_config(self, cfg: TrackerConfig, prs: dict[int, Progress]) -> ConfState:
        self.prs.config = cfg
        self.prs.progress = prs
        cs = self.prs.conf_state()
        pr = prs.get(self.id)
        self.is_learner = pr is not None and pr.is_learner
        if (pr is None or self.is_learner) and self.state == StateType.LEADER:
            # Removed (or demoted): step down; the others elect a leader among themselves.
            logger.info("node %d: removed from the configuration; stepping down", self.id)
            self.become_follower(self.term, NONE)
            return cs
        if self.state != StateType.LEADER or not cs.voters:
            return cs
        # The quorum may have changed: maybe commit, and tell the (new) followers.
        if self.maybe_commit():
            self._release_pending_read_index_messages()
        self._append_pending = True
        if (
            self.lead_transferee != NONE
            and self.lead_transferee not in self.prs.config.voters.ids()
        ):
            self.abort_leader_transfer()
        return cs


def _normalized(cs: ConfState) -> ConfState:
    return ConfState(
        voters=tuple(sorted(cs.voters)),
        learners=tuple(sorted(cs.learners)),
        voters_outgoing=tuple(sorted(cs.voters_outgoing)),
        learners_next=tuple(sorted(cs.learners_next)),
        auto_leave=cs.auto_leave,
    )
