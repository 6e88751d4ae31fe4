"""Linearizable reads on the leader (§6.4 of the Raft thesis), as in etcd's read_only.go.

What each mode promises (a new leader answers no read before it has committed an entry of its
own term, in both):

- `SAFE`: a read records the leader's commit index and is answered once a quorum of voters
  has answered a heartbeat that carries the request's context, sent after the request
  arrived. Linearizable with no assumption about clocks: it rests on messages only.
- `LEASE_BASED`: answered at once, with no message, while the leader's lease holds; otherwise
  exactly as `SAFE`. The lease starts at the tick s at which the leader sent the latest
  heartbeats a quorum of voters (itself counted) answered, and holds while the leader's tick
  count is below s + election_tick - 2 (`LEASE_MARGIN_TICKS`); a leadership transfer ends it.
  A voter that got such a heartbeat refuses votes and pre-votes until election_tick of its
  own ticks have passed, which is more than election_tick - 1 tick periods after s; so the
  lease ends one tick period before anyone else can be elected. A (re)started voter
  configured for lease reads grants no vote during its first election_tick ticks (it cannot
  know which leader it heard last). Linearizable if (1) every voter runs with
  check_quorum=True (enforced), LEASE_BASED and the same election_tick; (2) every clock's
  rate stays within a fraction r of the nominal tick rate and the leader handles a tick at
  most d late, with d + (2*election_tick - 3) * r * tick < tick: with perfect clocks any d
  below one tick; for election_tick=10 and r=1% (a hundred times a quartz clock's drift), d
  up to 0.83 tick.
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
