"""A plain in-memory model of the queue's work and log topics, for checking QueueState.

It follows the contract directly (dicts and lists, no indexes): the clock is the largest
stamped time; every entry first makes due delayed items ready and expires due leases; claim
runs rounds in which every eligible key offers its oldest ready item (an item without a
partition key is a key of its own) and the oldest offers win.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MItem:
    id: int
    topic: str
    partition: str | None
    payload: bytes
    key: str | None
    state: str = "ready"  # ready | leased | delayed
    not_before: float | None = None
    attempts: int = 0
    consumer: str | None = None
    deadline: float = 0.0


@dataclass
class MTopic:
    kind: str
    max_attempts: int = 5
    dead_letter: str = ""
    default: tuple[int | None, float] = (None, 0.0)
    own: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    last_claim: dict[str, float] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    done: int = 0
    dead: int = 0
    log: list[bytes] = field(default_factory=list)


class Refused(Exception):
    def __init__(self, lost: list[int] | None = None) -> None:
        self.lost = lost


class Model:
    def __init__(self) -> None:
        self.clock = 0.0
        self.topics: dict[str, MTopic] = {}
        self.items: dict[int, MItem] = {}
        self.next_id = 1

    # -- the entry's frame ---------------------------------------------------------------------

    def apply(self, time: float, op: str, **args: Any) -> dict[str, Any]:
        self.clock = max(self.clock, time)
        self._housekeeping()
        saved = copy.deepcopy((self.topics, self.items, self.next_id))
        try:
            return getattr(self, "op_" + op)(**args)
        except Refused as exc:
            self.topics, self.items, self.next_id = saved
            return {"error": True} if exc.lost is None else {"error": True, "lost": exc.lost}

    def _topic(self, name: str, kind: str) -> MTopic:
        if name not in self.topics:
            self.topics[name] = MTopic(kind, dead_letter=f"{name}.dead")
        return self.topics[name]

    def _housekeeping(self) -> None:
        for item in sorted(self.items.values(), key=lambda i: i.id):
            if item.state == "delayed" and item.not_before <= self.clock:
                item.state = "ready"
        for item in sorted(self.items.values(), key=lambda i: i.id):
            if item.state == "leased" and item.deadline <= self.clock:
                topic = self.topics[item.topic]
                item.state = "ready"
                if item.attempts >= topic.max_attempts:
                    topic.dead += 1
                    self._topic(topic.dead_letter, "work")
                    item.topic = topic.dead_letter
                    item.attempts = 0
                    item.consumer = None
                    item.not_before = None

    def limits(self, topic: MTopic, partition: str | None) -> tuple[int | None, float]:
        if partition is None:
            return None, 0.0
        return topic.own.get(partition, topic.default)

    # -- ops -----------------------------------------------------------------------------------

    def op_create(self, topic: str, kind: str, max_attempts: int) -> dict[str, Any]:
        if topic in self.topics:
            if self.topics[topic].kind != kind:
                raise Refused()
            return {"created": False}
        self.topics[topic] = MTopic(kind, max_attempts, f"{topic}.dead")
        return {"created": True}

    def op_put(self, topic: str, items: list[tuple[bytes, str | None, str | None, float | None]]):
        t = self._topic(topic, "work")
        if t.kind != "work":
            raise Refused()
        added = dups = 0
        for payload, key, partition, not_before in items:
            if key is not None:
                if key in t.seen:
                    dups += 1
                    continue
                t.seen.add(key)
            delayed = not_before is not None and not_before > self.clock
            self.items[self.next_id] = MItem(
                self.next_id,
                topic,
                partition,
                payload,
                key,
                "delayed" if delayed else "ready",
                not_before,
            )
            self.next_id += 1
            added += 1
        return {"added": added, "duplicates": dups}

    def _eligible_key(self, t: MTopic, topic: str, partition: str) -> bool:
        k, d = self.limits(t, partition)
        leased = sum(
            1
            for i in self.items.values()
            if i.topic == topic and i.partition == partition and i.state == "leased"
        )
        last = t.last_claim.get(partition)
        return (k is None or leased < k) and (last is None or last + d <= self.clock)

    def op_claim(self, topic: str, consumer: str, max_items: int, lease: float):
        t = self.topics.get(topic)
        if t is None:
            return {"items": []}
        if t.kind != "work":
            raise Refused()
        out: list[dict[str, Any]] = []
        while len(out) < max_items:
            ready = sorted(
                (i for i in self.items.values() if i.topic == topic and i.state == "ready"),
                key=lambda i: i.id,
            )
            offers: list[MItem] = []
            keys_seen: set[str] = set()
            for item in ready:
                if item.partition is None:
                    offers.append(item)
                elif item.partition not in keys_seen:
                    keys_seen.add(item.partition)
                    if self._eligible_key(t, topic, item.partition):
                        offers.append(item)
            offers = offers[: max_items - len(out)]
            if not offers:
                break
            for item in offers:
                item.state = "leased"
                item.attempts += 1
                item.consumer = consumer
                item.deadline = self.clock + lease
                if item.partition is not None:
                    t.last_claim[item.partition] = self.clock
                out.append(
                    {
                        "id": item.id,
                        "payload": item.payload,
                        "key": item.key,
                        "partition": item.partition,
                        "attempts": item.attempts,
                    }
                )
        return {"items": out}

    def _owned(self, consumer: str, ids: list[int]) -> list[MItem]:
        lost = [
            i
            for i in ids
            if i not in self.items
            or self.items[i].state == "delayed"
            or self.items[i].consumer != consumer
        ]
        if lost:
            raise Refused(lost)
        return [self.items[i] for i in ids]

    def op_complete(self, consumer: str, ids: list[int], append: dict, put: dict):
        for item in self._owned(consumer, ids):
            self.topics[item.topic].done += 1
            del self.items[item.id]
        appended = {}
        for name in sorted(append):
            t = self._topic(name, "log")
            if t.kind != "log":
                raise Refused()
            appended[name] = len(t.log)
            t.log.extend(append[name])
        added = dups = 0
        for name in sorted(put):
            answer = self.op_put(name, put[name])
            added += answer["added"]
            dups += answer["duplicates"]
        return {"done": len(ids), "appended": appended, "added": added, "duplicates": dups}

    def op_release(self, consumer: str, ids: list[int], delay: float):
        for item in self._owned(consumer, ids):
            item.consumer = None
            if delay > 0:
                item.state, item.not_before = "delayed", self.clock + delay
            else:
                item.state, item.not_before = "ready", None
        return {"released": len(ids)}

    def op_limit(self, topic: str, partition: str | None, max_leased, min_interval):
        t = self._topic(topic, "work")
        if t.kind != "work":
            raise Refused()
        if partition is None:
            t.default = (max_leased, min_interval)
        else:
            t.own[partition] = (max_leased, min_interval)
        return {}

    def op_tick(self) -> dict[str, Any]:
        return {}

    # -- queries -------------------------------------------------------------------------------

    def stats(self, topic: str) -> dict[str, Any]:
        t = self.topics[topic]
        mine = [i for i in self.items.values() if i.topic == topic]
        count = {s: sum(1 for i in mine if i.state == s) for s in ("ready", "leased", "delayed")}
        parts: dict[str, list[int]] = {}
        for i in mine:
            if i.partition is not None and i.state != "delayed":
                parts.setdefault(i.partition, [0, 0])[0 if i.state == "ready" else 1] += 1
        busiest = sorted(parts.items(), key=lambda kv: (-(kv[1][0] + kv[1][1]), kv[0]))[:10]
        rows = []
        for pkey, (ready, leased) in busiest:
            last = t.last_claim.get(pkey)
            rows.append(
                [pkey, ready, leased, 0.0 if last is None else last + self.limits(t, pkey)[1]]
            )
        return {
            "kind": t.kind,
            **count,
            "done": t.done,
            "dead": t.dead,
            "seen": len(t.seen),
            "appended": len(t.log),
            "first": 0,
            "partitions": rows,
        }
