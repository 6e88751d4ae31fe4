"""A simulated network: every message is dropped, duplicated, delayed (and so reordered) or cut
by a partition as a seeded random generator decides. Time is the cluster's tick counter."""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass

from ww.raft.types import Message


@dataclass(slots=True)
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    max_delay: int = 0  # ticks; a message is delivered 0..max_delay ticks after it is sent

    @staticmethod
    def reliable() -> Faults:
        return Faults()


class Network:
    def __init__(self, rng: random.Random, faults: Faults | None = None) -> None:
        self.rng = rng
        self.faults = faults or Faults()
        self._queue: list[tuple[int, int, Message]] = []
        self._seq = 0
        self._group: dict[int, int] = {}  # node -> partition group; absent means group 0
        self.sent = 0
        self.dropped = 0
        self.snapshot_reports: list[tuple[Message, bool]] = []
        """Snapshot messages lost (False) or handed over (True), for the sender's
        `report_snapshot`, as a real transport would report them."""

    # -- partitions -------------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Cut the network into `groups`; nodes listed in no group form one more group."""
        self._group = {n: i + 1 for i, g in enumerate(groups) for n in g}

    def isolate(self, node: int) -> None:
        self._group = {**self._group, node: -node}

    def heal(self) -> None:
        self._group = {}

    def connected(self, a: int, b: int) -> bool:
        return self._group.get(a, 0) == self._group.get(b, 0)

    # -- delivery ---------------------------------------------------------------------------

    def send(self, messages: Iterable[Message], now: int) -> None:
        f = self.faults
        for m in messages:
            self.sent += 1
            if not self.connected(m.frm, m.to) or self.rng.random() < f.drop:
                self._lost(m)
                continue
            copies = 2 if self.rng.random() < f.duplicate else 1
            for _ in range(copies):
                self._seq += 1
                at = now + (self.rng.randint(0, f.max_delay) if f.max_delay else 0)
                heapq.heappush(self._queue, (at, self._seq, m))

    def due(self, now: int) -> bool:
        """Whether a message is due by `now`."""
        return bool(self._queue) and self._queue[0][0] <= now

    def deliver(self, now: int) -> list[Message]:
        """The messages due by `now` whose endpoints are still connected, in random order."""
        due: list[Message] = []
        while self._queue and self._queue[0][0] <= now:
            m = heapq.heappop(self._queue)[2]
            if self.connected(m.frm, m.to):
                due.append(m)
            else:
                self._lost(m)
        self.rng.shuffle(due)
        return due

    def _lost(self, m: Message) -> None:
        self.dropped += 1
        if m.snapshot is not None:
            self.snapshot_reports.append((m, False))

    def clear(self) -> None:
        self._queue.clear()
