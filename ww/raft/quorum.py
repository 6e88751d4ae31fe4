"""Quorum arithmetic: the committed index and the result of a vote, for a majority
configuration and for a joint one (two majorities that must both agree), as in etcd's quorum
package."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

INFINITE_INDEX = 2**64 - 1
"""What an empty majority "acknowledges": it never limits a joint configuration."""


class VoteResult(enum.Enum):
    PENDING = "pending"
    LOST = "lost"
    WON = "won"


class MajorityConfig(frozenset[int]):
    """A set of voters; a quorum is any strict majority of it."""

    def committed_index(self, acked: Mapping[int, int]) -> int:
        """The largest index acknowledged by a majority (`acked` maps voter -> index)."""
        n = len(self)
        if n == 0:
            return INFINITE_INDEX
        srt = sorted(acked.get(voter, 0) for voter in self)
        return srt[n - (n // 2 + 1)]

    def vote_result(self, votes: Mapping[int, bool]) -> VoteResult:
        """WON with a majority of yes, LOST once that is impossible, else PENDING.
        An empty configuration wins (so a joint config with no outgoing half works)."""
        if not self:
            return VoteResult.WON
        yes = missing = 0
        for voter in self:
            v = votes.get(voter)
            if v is None:
                missing += 1
            elif v:
                yes += 1
        q = len(self) // 2 + 1
        if yes >= q:
            return VoteResult.WON
        if yes + missing >= q:
            return VoteResult.PENDING
        return VoteResult.LOST

    def __repr__(self) -> str:
        return "(" + " ".join(str(i) for i in sorted(self)) + ")"


class JointConfig:
    """The incoming and the outgoing majority; outside a joint change `outgoing` is empty."""

    __slots__ = ("incoming", "outgoing")

    def __init__(self, incoming: Iterable[int] = (), outgoing: Iterable[int] = ()) -> None:
        self.incoming = MajorityConfig(incoming)
        self.outgoing = MajorityConfig(outgoing)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, JointConfig)
            and self.incoming == other.incoming
            and self.outgoing == other.outgoing
        )

    def __hash__(self) -> int:
        return hash((self.incoming, self.outgoing))

    def __repr__(self) -> str:
        if self.outgoing:
            return f"{self.incoming!r}&&{self.outgoing!r}"
        return repr(self.incoming)

    def ids(self) -> frozenset[int]:
        return self.incoming | self.outgoing

    def is_joint(self) -> bool:
        return bool(self.outgoing)

    def committed_index(self, acked: Mapping[int, int]) -> int:
        return min(self.incoming.committed_index(acked), self.outgoing.committed_index(acked))

    def vote_result(self, votes: Mapping[int, bool]) -> VoteResult:
        r1 = self.incoming.vote_result(votes)
        r2 = self.outgoing.vote_result(votes)
        if r1 == r2:
            return r1
        if VoteResult.LOST in (r1, r2):
            return VoteResult.LOST
        return VoteResult.PENDING
