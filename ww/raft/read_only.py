"""Linearizable reads on the leader (§6.4 of the Raft thesis), as in etcd's read_only.go.

With `ReadOnlyOption.SAFE` a read request records the commit index and is confirmed by a
quorum answering a heartbeat that carries the request's context. With `LEASE_BASED` the leader
answers at once, trusting its lease (check-quorum keeps it honest, barring clock drift).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ww.raft.types import Message


class ReadOnlyOption(enum.Enum):
    SAFE = "safe"
    LEASE_BASED = "lease_based"


@dataclass(slots=True)
class ReadIndexStatus:
    req: Message
    index: int
    acks: dict[int, bool] = field(default_factory=dict)


def request_ctx(m: Message) -> bytes:
    """The read request's context, carried as the data of its single entry."""
    return m.entries[0].data


class ReadOnly:
    """Read requests waiting for a quorum's heartbeat acknowledgement, in arrival order."""

    def __init__(self, option: ReadOnlyOption) -> None:
        self.option = option
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []

    def add_request(self, index: int, m: Message) -> None:
        ctx = request_ctx(m)
        if ctx in self.pending:
            return
        self.pending[ctx] = ReadIndexStatus(m, index)
        self.queue.append(ctx)

    def recv_ack(self, node: int, ctx: bytes) -> dict[int, bool] | None:
        """Record `node`'s heartbeat ack for `ctx`; the acks so far, or None if unknown."""
        rs = self.pending.get(ctx)
        if rs is None:
            return None
        rs.acks[node] = True
        return rs.acks

    def advance(self, ctx: bytes) -> list[ReadIndexStatus]:
        """Release every request up to and including the one with `ctx` (a quorum confirmed
        it, and so everything queued before it)."""
        if ctx not in self.pending:
            return []
        i = self.queue.index(ctx) + 1
        released, self.queue = self.queue[:i], self.queue[i:]
        return [self.pending.pop(c) for c in released]

    def last_pending_request_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""
