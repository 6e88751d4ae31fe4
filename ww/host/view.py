"""The cluster view (sans-I/O): heartbeats with a TTL, expiry, and merging of gossip.

Each host sends its own record with age 0 every heartbeat interval, together with the records
it knows, each aged by the time since it last heard of that host. A receiver keeps the freshest
news per host, so a host that joined through one peer soon sees every host, and a host that
stops heartbeating vanishes everywhere once its TTL has passed since its last heartbeat.
Times are plain floats (seconds on a monotonic clock) passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

MAX_RECORDS = 1024
MAX_ADDRS = 16
MAX_META = 64


class GossipError(ValueError):
    """A membership record on the wire is malformed (one line)."""


@dataclass(frozen=True, slots=True)
class HostRecord:
    """What a host says about itself: who it is, where it listens, its metadata and TTL."""

    peer: str
    addrs: tuple[str, ...]
    meta: Mapping[str, str] = field(default_factory=dict)
    ttl: float = 5.0

    def to_wire(self, age: float) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "addrs": list(self.addrs),
            "meta": dict(self.meta),
            "ttl": self.ttl,
            "age": age,
        }

    @staticmethod
    def from_wire(raw: object) -> tuple[HostRecord, float]:
        """Parse one gossiped record; return it with its age. Raises GossipError."""
        if not isinstance(raw, dict):
            raise GossipError("membership record is not a map")
        peer, addrs, meta = raw.get("peer"), raw.get("addrs"), raw.get("meta", {})
        ttl, age = raw.get("ttl"), raw.get("age")
        if not isinstance(peer, str) or not 0 < len(peer) <= 128:
            raise GossipError("membership record has no valid peer id")
        if not isinstance(addrs, list | tuple) or len(addrs) > MAX_ADDRS:
            raise GossipError(f"membership record for {peer} has bad addrs")
        if not all(isinstance(a, str) and len(a) <= 256 for a in addrs):
            raise GossipError(f"membership record for {peer} has bad addrs")
        if not isinstance(meta, dict) or len(meta) > MAX_META:
            raise GossipError(f"membership record for {peer} has bad meta")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise GossipError(f"membership record for {peer} has non-string meta")
        if not _is_number(ttl) or not 0 < ttl <= 3600:
            raise GossipError(f"membership record for {peer} has bad ttl {ttl!r}")
        if not _is_number(age) or age < 0:
            raise GossipError(f"membership record for {peer} has bad age {age!r}")
        return HostRecord(peer, tuple(addrs), dict(meta), float(ttl)), float(age)


@dataclass(frozen=True, slots=True)
class Member:
    """A live host as this host sees it. `last_seen` is on the caller's clock."""

    record: HostRecord
    last_seen: float

    def expired(self, now: float) -> bool:
        return now - self.last_seen >= self.record.ttl


class Membership:
    """The eventually consistent set of live hosts, from this host's point of view."""

    def __init__(self, me: HostRecord) -> None:
        self.me = me
        self._members: dict[str, Member] = {}
        self._left: dict[str, float] = {}  # peer -> when it said it was leaving

    def observe(self, record: HostRecord, age: float, now: float) -> bool:
        """Merge news about `record.peer` heard `age` seconds after its heartbeat.

        Returns True when the host was not in the view before."""
        if record.peer == self.me.peer or age >= record.ttl:
            return False
        last_seen = now - age
        left = self._left.get(record.peer)
        if left is not None and last_seen <= left:
            return False  # news from before it left (a restarted host sends newer)
        known = self._members.get(record.peer)
        if known is not None and known.last_seen >= last_seen:
            return False
        self._members[record.peer] = Member(record, last_seen)
        return known is None

    def merge(self, raw_records: Iterable[object], now: float) -> list[str]:
        """Merge a gossip message (wire records); return peers that are new to the view.

        Raises GossipError on the first malformed record; records before it are kept."""
        new = []
        for count, raw in enumerate(raw_records):
            if count >= MAX_RECORDS:
                raise GossipError(f"gossip carries more than {MAX_RECORDS} records")
            record, age = HostRecord.from_wire(raw)
            if self.observe(record, age, now):
                new.append(record.peer)
        return new

    def leave(self, peer: str, now: float) -> bool:
        """`peer` said it is leaving: drop it now, and ignore news of it from before.
        True when it was in the view."""
        self._left[peer] = now
        return self._members.pop(peer, None) is not None

    def expire(self, now: float) -> list[str]:
        """Drop hosts whose TTL has passed since their last heartbeat; return their ids."""
        gone = [peer for peer, m in self._members.items() if m.expired(now)]
        for peer in gone:
            del self._members[peer]
        # After a TTL no news from before a departure can still arrive.
        ttl = self.me.ttl
        for peer in [p for p, t in self._left.items() if now - t > ttl]:
            del self._left[peer]
        return gone

    def live(self, now: float) -> list[Member]:
        """Live hosts, this one first, then by peer id."""
        others = sorted(
            (m for m in self._members.values() if not m.expired(now)), key=lambda m: m.record.peer
        )
        return [Member(self.me, now), *others]

    def get(self, peer: str, now: float) -> Member | None:
        if peer == self.me.peer:
            return Member(self.me, now)
        member = self._members.get(peer)
        return None if member is None or member.expired(now) else member

    def gossip(self, now: float) -> list[dict[str, Any]]:
        """The records to send in a heartbeat: this host (age 0) and every live host it knows."""
        return [m.record.to_wire(now - m.last_seen) for m in self.live(now)]

    def __contains__(self, peer: object) -> bool:
        return peer == self.me.peer or peer in self._members


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value
