"""The records Raft exchanges and persists: entries, messages, hard state, snapshots.

Shaped like etcd's raftpb. Every record is a frozen slotted dataclass; `Message` encodes to
bytes with msgpack for any transport, and decoding rejects anything malformed with
`MessageDecodeError` so a transport can drop it and count it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

NONE = 0
"""The node id that means "no node" (no leader, no vote)."""


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


class MessageType(enum.IntEnum):
    # Local messages: never sent over the network.
    HUP = 0  # start an election
    BEAT = 1  # leader: send heartbeats
    PROP = 2  # propose entries
    SNAP_STATUS = 3  # report a snapshot delivery outcome
    UNREACHABLE = 4  # report a peer unreachable
    CHECK_QUORUM = 5
    # Network messages.
    APP = 10
    APP_RESP = 11
    VOTE = 12
    VOTE_RESP = 13
    PRE_VOTE = 14
    PRE_VOTE_RESP = 15
    SNAP = 16
    HEARTBEAT = 17
    HEARTBEAT_RESP = 18
    TRANSFER_LEADER = 19
    TIMEOUT_NOW = 20
    READ_INDEX = 21
    READ_INDEX_RESP = 22


LOCAL_MESSAGES = frozenset(
    {
        MessageType.HUP,
        MessageType.BEAT,
        MessageType.SNAP_STATUS,
        MessageType.UNREACHABLE,
        MessageType.CHECK_QUORUM,
    }
)


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0
    REMOVE_NODE = 1
    ADD_LEARNER = 2


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    term: int = 0
    vote: int = NONE
    commit: int = 0

    def is_empty(self) -> bool:
        return self == EMPTY_HARD_STATE


EMPTY_HARD_STATE = HardState()


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership at a point in the log: voters, learners, and for a joint
    configuration the outgoing voters (`voters_outgoing`)."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    voters_outgoing: tuple[int, ...] = ()
    learners_next: tuple[int, ...] = ()
    auto_leave: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotMetadata:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    data: bytes = b""
    metadata: SnapshotMetadata = field(default_factory=SnapshotMetadata)

    def is_empty(self) -> bool:
        return self.metadata.index == 0


EMPTY_SNAPSHOT = Snapshot()


@dataclass(frozen=True, slots=True)
class ConfChangeSingle:
    type: ConfChangeType
    node_id: int


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A membership change. One change is applied by simple consensus; several at once go
    through a joint configuration. `transition` is "auto" (leave the joint configuration
    automatically), "implicit" or "explicit" (the application proposes an empty ConfChange to
    leave), as in etcd's ConfChangeV2."""

    changes: tuple[ConfChangeSingle, ...] = ()
    transition: str = "auto"
    context: bytes = b""

    def encode(self) -> bytes:
        wire = [[[int(c.type), c.node_id] for c in self.changes], self.transition, self.context]
        return bytes(msgpack.packb(wire, use_bin_type=True))

    @staticmethod
    def decode(data: bytes) -> ConfChange:
        try:
            changes, transition, context = msgpack.unpackb(data)
            return ConfChange(
                tuple(ConfChangeSingle(ConfChangeType(t), int(n)) for t, n in changes),
                str(transition),
                bytes(context),
            )
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise MessageDecodeError(f"malformed conf change: {e}") from e

    def leave_joint(self) -> bool:
        return not self.changes


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    to: int = NONE
    frm: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    snapshot: Snapshot | None = None
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""

    def encode(self) -> bytes:
        return bytes(msgpack.packb(_message_to_wire(self), use_bin_type=True))

    @staticmethod
    def decode(data: bytes) -> Message:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
            return _message_from_wire(obj)
        except MessageDecodeError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as e:
            raise MessageDecodeError(f"malformed raft message: {e}") from e


class MessageDecodeError(ValueError):
    """Raised for bytes that are not a well-formed message."""


def _conf_state_to_wire(cs: ConfState) -> list[Any]:
    return [
        list(cs.voters),
        list(cs.learners),
        list(cs.voters_outgoing),
        list(cs.learners_next),
        cs.auto_leave,
    ]


def _conf_state_from_wire(obj: Any) -> ConfState:
    voters, learners, outgoing, learners_next, auto_leave = obj
    return ConfState(
        tuple(_uint(v) for v in voters),
        tuple(_uint(v) for v in learners),
        tuple(_uint(v) for v in outgoing),
        tuple(_uint(v) for v in learners_next),
        bool(auto_leave),
    )


def snapshot_to_wire(s: Snapshot) -> list[Any]:
    m = s.metadata
    return [s.data, m.index, m.term, _conf_state_to_wire(m.conf_state)]


def snapshot_from_wire(obj: Any) -> Snapshot:
    data, index, term, cs = obj
    if not isinstance(data, bytes):
        raise MessageDecodeError("snapshot data must be bytes")
    return Snapshot(data, SnapshotMetadata(_uint(index), _uint(term), _conf_state_from_wire(cs)))


def entry_to_wire(e: Entry) -> list[Any]:
    return [e.term, e.index, int(e.type), e.data]


def entry_from_wire(obj: Any) -> Entry:
    term, index, typ, data = obj
    if not isinstance(data, bytes):
        raise MessageDecodeError("entry data must be bytes")
    return Entry(_uint(term), _uint(index), EntryType(typ), data)


def _message_to_wire(m: Message) -> list[Any]:
    return [
        int(m.type),
        m.to,
        m.frm,
        m.term,
        m.log_term,
        m.index,
        [entry_to_wire(e) for e in m.entries],
        m.commit,
        None if m.snapshot is None else snapshot_to_wire(m.snapshot),
        m.reject,
        m.reject_hint,
        m.context,
    ]


def _message_from_wire(obj: Any) -> Message:
    if not isinstance(obj, list) or len(obj) != 12:
        raise MessageDecodeError("a raft message is a list of 12 fields")
    typ, to, frm, term, log_term, index, entries, commit, snap, reject, hint, context = obj
    if not isinstance(context, bytes) or not isinstance(reject, bool):
        raise MessageDecodeError("bad field types in raft message")
    return Message(
        type=MessageType(typ),
        to=_uint(to),
        frm=_uint(frm),
        term=_uint(term),
        log_term=_uint(log_term),
        index=_uint(index),
        entries=tuple(entry_from_wire(e) for e in entries),
        commit=_uint(commit),
        snapshot=None if snap is None else snapshot_from_wire(snap),
        reject=reject,
        reject_hint=_uint(hint),
        context=context,
    )


def _uint(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise MessageDecodeError(f"expected a non-negative integer, got {v!r}")
    return v
