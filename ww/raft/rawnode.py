"""`RawNode`: the protocol core with etcd's Ready/advance cycle, for a caller that owns the
storage, the transport and the clock.

The loop a driver runs::

    node.tick()                       # every tick interval
    node.step(message)                # for each message from the network
    node.propose(data)                # for each client request
    if node.has_ready():
        rd = node.ready()
        storage.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)  # then send
        send(rd.messages)
        install(rd.snapshot); apply(rd.committed_entries)       # apply_conf_change for conf
        node.advance(rd)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ww.raft.core import Config, Raft, StateType, Stats
from ww.raft.errors import (
    ConfigError,
    ProposalDroppedError,
    RaftError,
    StepLocalMessageError,
    StepPeerNotFoundError,
)
from ww.raft.storage import Storage
from ww.raft.tracker import Progress
from ww.raft.types import (
    EMPTY_HARD_STATE,
    LOCAL_MESSAGES,
    NONE,
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
)

__all__ = ["Config", "RawNode", "ReadState", "Ready", "SoftState", "StateType", "Status"]

_RESPONSES = frozenset(
    {
        MessageType.APP_RESP,
        MessageType.VOTE_RESP,
        MessageType.PRE_VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.SNAP_STATUS,
        MessageType.UNREACHABLE,
    }
)
_TERMLESS = frozenset({MessageType.PROP, MessageType.READ_INDEX})


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth reporting: who leads, and this node's role."""

    lead: int
    raft_state: StateType


@dataclass(frozen=True, slots=True)
class ReadState:
    """A read request (`request_ctx`) may be served once the application has applied up to
    `index`."""

    index: int
    request_ctx: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """What the application must do next, in this order: persist `snapshot`, `entries` and
    `hard_state` (durably if `must_sync`); then send `messages`; then install `snapshot` and
    apply `committed_entries`; then call `advance(ready)`."""

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    read_states: tuple[ReadState, ...] = ()
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    must_sync: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    id: int
    hard_state: HardState
    soft_state: SoftState
    applied: int
    config: ConfState
    lead_transferee: int = NONE
    progress: dict[int, Progress] = field(default_factory=dict)
    """Copies of every member's progress; filled only on the leader."""


class RawNode:
    """A Raft node without I/O. Not thread-safe: call it from one task."""

    def __init__(self, config: Config) -> None:
        self.raft = Raft(config)
        self._prev_soft = self._soft_state()
        self._prev_hard = self.raft.hard_state()
        if _is_fresh(config.storage):
            self._bootstrap()

    def _bootstrap(self) -> None:
        """Write the initial membership (the fresh storage's ConfState) into the log as
        committed conf change entries at term 1, like etcd's Bootstrap: a node that joins
        later replays the log from index 1 and so learns the whole membership history.
        The first Ready persists them and hands them to the application to apply."""
        r = self.raft
        cs = r.prs.conf_state()
        if cs.voters_outgoing:
            raise ConfigError("cannot bootstrap from a joint configuration")
        changes = [ConfChangeSingle(ConfChangeType.ADD_NODE, v) for v in cs.voters]
        changes += [ConfChangeSingle(ConfChangeType.ADD_LEARNER, v) for v in cs.learners]
        ents = [
            Entry(1, i + 1, EntryType.CONF_CHANGE, ConfChange((cc,)).encode())
            for i, cc in enumerate(changes)
        ]
        r.become_follower(1, NONE)
        r.raft_log.append(ents)
        r.raft_log.committed = len(ents)
        self._prev_hard = EMPTY_HARD_STATE

    @property
    def stats(self) -> Stats:
        return self.raft.stats

    # -- inputs --------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance the logical clock by one tick."""
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (with pre-vote if configured)."""
        self.raft.step(Message(type=MessageType.HUP, frm=self.raft.id))

    def propose(self, data: bytes) -> None:
        """Propose `data` to be appended to the log. Raises ProposalDroppedError (or its
        UncommittedSizeLimitError) if it cannot be accepted now."""
        self._propose(Entry(term=0, index=0, data=data))

    def propose_batch(self, datas: Sequence[bytes]) -> None:
        """Propose several entries at once: all are appended, or none (the uncommitted-size
        limit counts them together)."""
        if datas:
            self._propose(*(Entry(term=0, index=0, data=d) for d in datas))

    def propose_conf_change(self, cc: ConfChange) -> None:
        """Propose a membership change. Raises ConfChangeError on the leader if it cannot
        apply (another is pending, or it would not leave / enter a joint config correctly)."""
        self._propose(Entry(term=0, index=0, type=EntryType.CONF_CHANGE, data=cc.encode()))

    def _propose(self, *entries: Entry) -> None:
        try:
            self.raft.step(Message(type=MessageType.PROP, frm=self.raft.id, entries=entries))
        except ProposalDroppedError:
            self.raft.stats.dropped_proposals += 1
            raise

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed conf change entry's change; returns the new configuration."""
        return self.raft.apply_conf_change(cc)

    def read_index(self, ctx: bytes) -> None:
        """Request a linearizable read. Its ReadState (with `ctx`) appears in a later Ready;
        a read that finds no leader is dropped (and counted)."""
        self.raft.step(Message(type=MessageType.READ_INDEX, entries=(Entry(0, 0, data=ctx),)))

    def transfer_leader(self, transferee: int) -> None:
        """Ask the leader to hand leadership to `transferee`."""
        self.raft.step(Message(type=MessageType.TRANSFER_LEADER, frm=transferee))

    def report_unreachable(self, node: int) -> None:
        """The transport failed to reach `node`: probe it instead of streaming."""
        self.raft.step(Message(type=MessageType.UNREACHABLE, frm=node))

    def report_snapshot(self, node: int, ok: bool) -> None:
        """The snapshot sent to `node` was delivered (`ok`) or failed."""
        self.raft.step(Message(type=MessageType.SNAP_STATUS, frm=node, reject=not ok))

    def step(self, m: Message) -> None:
        """Handle a message from the network. Never raises: a message that is local-only,
        from an unknown node, malformed for its type, or refused is dropped and counted in
        `stats.dropped_messages`."""
        reason = _invalid(m, self.raft.id)
        if reason is not None:
            self.raft.stats.drop(reason)
            return
        if m.type in _TERMLESS and m.term != 0:
            m = replace(m, term=0)
        try:
            self.step_checked(m)
        except StepLocalMessageError:
            self.raft.stats.drop("local_message")
        except StepPeerNotFoundError:
            self.raft.stats.drop("unknown_peer")
        except ProposalDroppedError:
            self.raft.stats.drop("proposal_dropped")
            self.raft.stats.dropped_proposals += 1
        except RaftError as e:
            self.raft.stats.drop(type(e).__name__)

    def step_checked(self, m: Message) -> None:
        """`step` that raises instead of counting (etcd's RawNode.Step)."""
        if m.type in LOCAL_MESSAGES:
            raise StepLocalMessageError(f"{m.type.name} is local; it cannot come from {m.frm}")
        if m.type in _RESPONSES and m.frm not in self.raft.prs.progress:
            raise StepPeerNotFoundError(f"{m.type.name} from {m.frm}, which is not a member")
        self.raft.step(m)

    # -- outputs -------------------------------------------------------------------------------

    def _soft_state(self) -> SoftState:
        return SoftState(self.raft.lead, self.raft.state)

    def has_ready(self) -> bool:
        r = self.raft
        prev_soft, prev_hard = self._prev_soft, self._prev_hard
        if r.lead != prev_soft.lead or r.state != prev_soft.raft_state:
            return True
        if (r.term, r.vote, r.raft_log.committed) != (
            prev_hard.term,
            prev_hard.vote,
            prev_hard.commit,
        ) and not r.hard_state().is_empty():
            return True
        return bool(
            r.raft_log.has_pending_snapshot()
            or r.msgs
            or r.has_pending_appends()
            or r.raft_log.unstable.entries
            or r.raft_log.has_next_committed_ents()
            or r.read_states
        )

    def ready(self) -> Ready:
        """What to persist, send and apply now. Call `advance` once it is done."""
        r = self.raft
        msgs = r.read_messages()
        soft = self._soft_state()
        hs = r.hard_state()
        entries = tuple(r.raft_log.unstable_entries())
        snapshot = r.raft_log.unstable.snapshot if r.raft_log.has_pending_snapshot() else None
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hs if hs != self._prev_hard else None,
            read_states=tuple(ReadState(i, c) for i, c in r.read_states),
            entries=entries,
            snapshot=snapshot,
            committed_entries=tuple(r.raft_log.next_committed_ents()),
            messages=tuple(msgs),
            # Entries, a vote and a term must survive a crash before anyone hears of them;
            # so must a snapshot we are about to acknowledge. A commit index alone need not.
            must_sync=bool(entries)
            or snapshot is not None
            or hs.term != self._prev_hard.term
            or hs.vote != self._prev_hard.vote,
        )
        self._prev_soft = soft
        r.read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The Ready `rd` is persisted and applied."""
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        self.raft.advance(rd.entries, rd.snapshot, rd.committed_entries)

    def status(self) -> Status:
        r = self.raft
        progress = {}
        if r.state == StateType.LEADER:
            progress = {i: pr.clone() for i, pr in r.prs.progress.items()}
        return Status(
            id=r.id,
            hard_state=r.hard_state(),
            soft_state=self._soft_state(),
            applied=r.raft_log.applied,
            config=r.prs.conf_state(),
            lead_transferee=r.lead_transferee,
            progress=progress,
        )


def _is_fresh(storage: Storage) -> bool:
    """A storage that holds nothing but the initial membership of a new cluster."""
    hs, cs = storage.initial_state()
    return (
        storage.last_index() == 0
        and storage.snapshot().metadata.index == 0
        and hs.is_empty()
        and bool(cs.voters or cs.learners)
    )


def _invalid(m: Message, self_id: int) -> str | None:
    """Why a message from the network is malformed for its type, or None."""
    if m.type in LOCAL_MESSAGES:
        return "local_message"
    if m.frm == NONE:
        return "no_sender"
    if m.frm == self_id:
        return "from_self"
    if m.to not in (NONE, self_id):
        return "wrong_recipient"
    if m.term == 0 and m.type not in _TERMLESS:
        return "no_term"
    t = m.type
    if t == MessageType.PROP and not m.entries:
        return "empty_proposal"
    if t in (MessageType.READ_INDEX, MessageType.READ_INDEX_RESP) and len(m.entries) != 1:
        return "bad_read_index"
    if t == MessageType.SNAP and (m.snapshot is None or m.snapshot.is_empty()):
        return "empty_snapshot"
    if t == MessageType.APP:
        prev_index, prev_term = m.index, m.log_term
        for e in m.entries:
            if e.index != prev_index + 1 or e.term < prev_term or e.term > m.term:
                return "bad_append_entries"
            prev_index, prev_term = e.index, e.term
        if m.log_term > m.term:
            return "bad_append_entries"
    return None
