"""A replica: one protocol core wired to its storage and its state machine, with no I/O of
its own.

`Replica` does the work every Ready asks for, in the order Raft needs it:

1. persist the snapshot, the new entries and the hard state (`LogStorage.save`) —
   before a single message of the Ready leaves;
2. install a snapshot that came from the leader into the state machine;
3. apply the committed entries, conf changes included, then let the state machine make them
   durable in one go (its optional `commit()`), and answer the requests they settle;
4. take a snapshot of the state machine every `snapshot_interval` applied entries (or
   `snapshot_bytes` of them) and compact
   the log behind it.

It knows nothing of clocks or sockets, so the trio driver (`ww.raft.driver`) and the
deterministic simulator in the tests run the very same code.

Requests are identified by a 16-byte request id: the data of every normal entry this module
proposes is the request id followed by the caller's payload (a conf change carries it in front
of its context). An empty entry is a no-op. Every replica applies every entry, so a request
proposed on a follower (which forwards it to the leader) is answered when it is applied
locally. An entry may be applied more than once (a forwarded proposal duplicated by the
transport is appended twice); the first application answers the request, and a state machine
that needs exactly-once effects deduplicates its commands by an id of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ww.raft.errors import ProposalDroppedError, RaftError, UncommittedSizeLimitError
from ww.raft.rawnode import Config, RawNode, Ready
from ww.raft.storage import LogStorage
from ww.raft.types import NONE, ConfChange, ConfState, Entry, EntryType, Message

__all__ = [
    "NotLeaderError",
    "Outcome",
    "RaftError",
    "Replica",
    "RequestDroppedError",
    "StateMachine",
    "batch_commit",
    "durable_applied_index",
]

logger = logging.getLogger(__name__)

REQUEST_ID_SIZE = 16


class StateMachine(Protocol):
    """The application's replicated state."""

    def apply(self, index: int, data: bytes) -> Any:
        """Apply the payload of the committed entry at `index`; the return value answers the
        proposal. Must be deterministic, and should report a bad command in its result rather
        than raise (an exception here stops the replica)."""
        ...

    def snapshot(self) -> bytes:
        """The whole state as of the last applied entry."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's."""
        ...


def batch_commit(state_machine: StateMachine) -> Callable[[], object] | None:
    """The state machine's `commit()` method, or None.

    A state machine that writes its changes to disk may group them: it defines `commit()`,
    and the replica calls it once after applying a Ready's committed entries (and before any
    of their requests is answered or a snapshot is taken), rather than the state machine
    committing every entry. Entries applied but not yet committed when the process dies are
    applied again after a restart, as the durable applied index (`durable_applied_index`)
    is committed with them.
    """
    commit = getattr(state_machine, "commit", None)
    return commit if callable(commit) else None


def durable_applied_index(state_machine: StateMachine) -> int:
    """The index a state machine says it has durably applied, or 0.

    A state machine that keeps its own state on disk (with the index of the last entry it
    applied, written with each change) exposes it as an int attribute `applied_index`. A
    replica restarting then neither restores it from the snapshot when it is already at or
    past the snapshot, nor applies to it again the entries at or below that index.
    """
    index = getattr(state_machine, "applied_index", 0)
    return index if isinstance(index, int) and not isinstance(index, bool) else 0


class NotLeaderError(ProposalDroppedError):
    """No leader is known, so the request cannot be served now; retry later."""

    def __init__(self, leader: int = NONE) -> None:
        self.leader = leader
        hint = f"node {leader} leads" if leader != NONE else "no leader is known"
        super().__init__(f"not the leader ({hint}); retry the request")


class RequestDroppedError(RaftError):
    """The request was lost (the leader changed before it was confirmed); retry it."""


@dataclass(slots=True)
class Outcome:
    """What one Ready produced for the caller to act on."""

    messages: list[Message] = field(default_factory=list)
    """To be sent; the Ready's state is already persisted."""
    results: list[tuple[bytes, Any]] = field(default_factory=list)
    """(request id, result) of this replica's proposals applied now."""
    reads: list[tuple[bytes, int]] = field(default_factory=list)
    """(request id, read index) of reads that may now be served from the state machine."""
    dropped: list[bytes] = field(default_factory=list)
    """Request ids of reads abandoned because the leadership changed."""


@dataclass(slots=True)
class _PendingRead:
    request_id: bytes
    index: int = 0  # 0 until the leader confirmed it


class Replica:
    """A RawNode with its storage and state machine.

    On construction the state machine is restored from the storage's snapshot and the core
    resumes from there; the committed entries after the snapshot are applied again through
    Readys. A state machine with a durable `applied_index` (see `durable_applied_index`) at or
    past the snapshot is not restored, and is handed only the entries after its index (the
    replica still applies the conf changes among the others to itself).

    `snapshot_interval` applied entries trigger a snapshot; the log keeps
    `compaction_margin` entries behind it so a slightly lagging follower needs no snapshot.
    With `snapshot_bytes`, entries holding between three quarters of that and that many bytes
    of data (drawn at random each time, so that replicas do not all copy their state at
    once) trigger one too, and the entries kept behind it hold at most a quarter of
    `snapshot_bytes`: the log held in memory stays bounded in bytes whatever the size of
    the entries.
    """

    def __init__(
        self,
        config: Config,
        storage: LogStorage,
        state_machine: StateMachine,
        *,
        snapshot_interval: int = 10_000,
        compaction_margin: int = 1_000,
        snapshot_bytes: int | None = None,
        on_conf_change: Callable[[ConfChange, ConfState], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if snapshot_interval < 1 or compaction_margin < 0:
            raise ValueError("snapshot_interval must be >= 1 and compaction_margin >= 0")
        self.id: int = config.id
        self.storage = storage
        self.state_machine = state_machine
        self.snapshot_interval = snapshot_interval
        self.compaction_margin = compaction_margin
        if snapshot_bytes is not None and snapshot_bytes < 1:
            raise ValueError("snapshot_bytes must be >= 1 (or None)")
        self.snapshot_bytes = snapshot_bytes
        self._applied_bytes = 0  # data of the entries applied since the last snapshot
        self._on_conf_change = on_conf_change
        self._commit = batch_commit(state_machine)
        self._uncommitted = False  # entries applied since the last commit()
        self._rng = rng if rng is not None else random.Random()
        self._bytes_due = self._next_bytes_due()
        self._nonce = self._rng.getrandbits(64).to_bytes(8, "big")
        self._next_request = 0

        snap = storage.snapshot()
        _, self.conf_state = storage.initial_state()
        self.applied = 0
        self._durable = durable_applied_index(state_machine)
        if not snap.is_empty():
            if self._durable < snap.metadata.index:
                state_machine.restore(snap.data)
            self.applied = snap.metadata.index
            self.conf_state = snap.metadata.conf_state
        self._snapshot_index = self.applied
        self.node = RawNode(dataclasses.replace(config, storage=storage, applied=self.applied))
        self.leader = NONE
        self.term = storage.initial_state()[0].term
        self._proposals: set[bytes] = set()
        self._reads: list[_PendingRead] = []

    # -- requests ---------------------------------------------------------------------------

    def new_request_id(self) -> bytes:
        """A request id unique to this replica's incarnation."""
        self._next_request += 1
        return self._nonce + self._next_request.to_bytes(8, "big")

    @contextlib.contextmanager
    def _not_leader_when_leaderless(self) -> Iterator[None]:
        """Turn a proposal dropped for want of a leader into NotLeaderError; other refusals
        (the uncommitted-size limit among them) pass through unchanged."""
        try:
            yield
        except UncommittedSizeLimitError:
            raise
        except ProposalDroppedError as e:
            if self.leader == NONE:
                raise NotLeaderError() from e
            raise

    def propose(self, data: bytes) -> bytes:
        """Propose `data` for the state machine; returns the request id its result will be
        reported under (in `Outcome.results`) once the entry is applied here."""
        request_id = self.new_request_id()
        with self._not_leader_when_leaderless():
            self.node.propose(request_id + data)
        self._proposals.add(request_id)
        return request_id

    def propose_batch(self, datas: Sequence[bytes]) -> list[bytes]:
        """Propose several payloads in one step: all are accepted or none is (raising as
        `propose` does). Returns their request ids, in order."""
        request_ids = [self.new_request_id() for _ in datas]
        with self._not_leader_when_leaderless():
            self.node.propose_batch(
                [rid + data for rid, data in zip(request_ids, datas, strict=True)]
            )
        self._proposals.update(request_ids)
        return request_ids

    def propose_conf_change(self, cc: ConfChange) -> bytes:
        """Propose a membership change; its result is the ConfState after it is applied."""
        request_id = self.new_request_id()
        with self._not_leader_when_leaderless():
            self.node.propose_conf_change(dataclasses.replace(cc, context=request_id + cc.context))
        self._proposals.add(request_id)
        return request_id

    def read_index(self) -> bytes:
        """Ask for a linearizable read; `Outcome.reads` reports the request id once the state
        machine has applied everything the read must see."""
        if self.leader == NONE:
            raise NotLeaderError()
        request_id = self.new_request_id()
        self.node.read_index(request_id)
        self._reads.append(_PendingRead(request_id))
        return request_id

    def forget(self, request_id: bytes) -> None:
        """Stop tracking a request the caller gave up on."""
        self._proposals.discard(request_id)
        self._reads = [r for r in self._reads if r.request_id != request_id]

    # -- the core's inputs ------------------------------------------------------------------

    def tick(self) -> None:
        self.node.tick()

    def step(self, message: Message) -> None:
        self.node.step(message)

    def has_ready(self) -> bool:
        return self.node.has_ready()

    # -- Ready processing -------------------------------------------------------------------

    def handle_ready(self) -> Outcome:
        """Take one Ready and do all its work (persist, install, apply, snapshot)."""
        ready = self.node.ready()
        self.persist(ready)
        return self.finish(ready)

    def persist(self, ready: Ready) -> None:
        """Write what `ready` requires to stable storage. Touches only the storage, so a
        driver may run it in a worker thread."""
        snapshot = ready.snapshot
        if snapshot is not None and snapshot.is_empty():
            snapshot = None
        hard_state = ready.hard_state
        if hard_state is not None and hard_state.is_empty():
            hard_state = None
        if snapshot is not None or ready.entries or hard_state is not None:
            self.storage.save(hard_state, ready.entries, snapshot, sync=ready.must_sync)

    def finish(self, ready: Ready) -> Outcome:
        """The rest of a persisted Ready: install, apply, snapshot, advance."""
        out = Outcome(messages=list(ready.messages))
        new_leader = ready.soft_state is not None and ready.soft_state.lead != self.leader
        new_term = ready.hard_state is not None and ready.hard_state.term != self.term
        if ready.soft_state is not None:
            self.leader = ready.soft_state.lead
        if ready.hard_state is not None:
            self.term = ready.hard_state.term
        if new_leader or new_term:
            # Reads not yet confirmed may have been lost with the old leadership.
            out.dropped = [r.request_id for r in self._reads if r.index == 0]
            self._reads = [r for r in self._reads if r.index != 0]
        snapshot = ready.snapshot
        if snapshot is not None and not snapshot.is_empty():
            self._install(snapshot.data, snapshot.metadata.index, snapshot.metadata.conf_state)
        for rs in ready.read_states:
            for r in self._reads:
                if r.request_id == rs.request_ctx:
                    r.index = rs.index
        for entry in ready.committed_entries:
            self._apply(entry, out)
        if self._uncommitted and self._commit is not None:
            self._commit()
        self._uncommitted = False
        self._release_reads(out)
        self._maybe_snapshot()
        self.node.advance(ready)
        return out

    def _install(self, data: bytes, index: int, conf_state: ConfState) -> None:
        logger.info("node %d: installing snapshot at index %d", self.id, index)
        self.state_machine.restore(data)
        # The state machine is now at the snapshot, or past it if the snapshot's copy of it
        # was made later (it then says so through its durable applied index).
        self._durable = durable_applied_index(self.state_machine)
        self.applied = index
        self._snapshot_index = index
        self.conf_state = conf_state

    def _apply(self, entry: Entry, out: Outcome) -> None:
        if entry.index <= self.applied:
            return  # covered by an installed snapshot
        if entry.index != self.applied + 1:
            raise AssertionError(f"applying entry {entry.index} after {self.applied}")
        request_id = b""
        result: Any = None
        self._applied_bytes += len(entry.data)
        if entry.type == EntryType.CONF_CHANGE:
            cc = ConfChange.decode(entry.data)
            if len(cc.context) >= REQUEST_ID_SIZE:
                request_id = cc.context[:REQUEST_ID_SIZE]
                cc = dataclasses.replace(cc, context=cc.context[REQUEST_ID_SIZE:])
            self.conf_state = self.node.apply_conf_change(cc)
            result = self.conf_state
            if self._on_conf_change is not None:
                self._on_conf_change(cc, self.conf_state)
        elif entry.data and entry.index > self._durable:
            request_id = entry.data[:REQUEST_ID_SIZE]
            result = self.state_machine.apply(entry.index, entry.data[REQUEST_ID_SIZE:])
            self._uncommitted = True
        self.applied = entry.index
        if request_id in self._proposals:
            self._proposals.discard(request_id)
            out.results.append((request_id, result))

    def _release_reads(self, out: Outcome) -> None:
        ready = [r for r in self._reads if 0 < r.index <= self.applied]
        if ready:
            self._reads = [r for r in self._reads if not 0 < r.index <= self.applied]
            out.reads.extend((r.request_id, r.index) for r in ready)

    def _maybe_snapshot(self) -> None:
        by_bytes = self._applied_bytes >= self._bytes_due
        if self.applied - self._snapshot_index < self.snapshot_interval and not by_bytes:
            return
        if self.applied == self._snapshot_index:
            return  # nothing applied since (the bytes were of an installed snapshot's range)
        data = self.state_machine.snapshot()
        self.storage.create_snapshot(self.applied, self.conf_state, data)
        self._snapshot_index = self.applied
        self._applied_bytes = 0
        self._bytes_due = self._next_bytes_due()
        compact_to = self.applied - self.compaction_margin
        if self.snapshot_bytes is not None:
            compact_to = max(compact_to, self._keep_bytes(self.snapshot_bytes // 4))
        if compact_to >= self.storage.first_index():
            self.storage.compact(compact_to)

    def _next_bytes_due(self) -> float:
        if self.snapshot_bytes is None:
            return math.inf
        return self.snapshot_bytes * (0.75 + 0.25 * self._rng.random())

    def _keep_bytes(self, limit: int) -> int:
        """The index to compact to so that the entries kept after it hold at most `limit`
        bytes of data (looking back no further than `compaction_margin` entries)."""
        lo = max(self.storage.first_index(), self.applied - self.compaction_margin + 1)
        if lo > self.applied:
            return self.applied
        kept = 0
        for entry in reversed(self.storage.entries(lo, self.applied + 1)):
            kept += len(entry.data)
            if kept > limit:
                return entry.index
        return lo - 1
