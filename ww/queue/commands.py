"""The queue's commands, queries and answers: plain msgpack maps.

A write command is one msgpack map proposed as one Raft entry:
`{"op", "client", "seq", "ack", "time", ...fields}`. The client builds it with `Command`
(without "time"); the leader replica stamps "time" with `stamp` just before proposing, and the
state machine decodes it with `decode_command`. Queries are plain maps built with `Query`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "GROUP",
    "MAX_BATCH",
    "MAX_INT",
    "MAX_TIME",
    "OPS",
    "QUERIES",
    "Claimed",
    "Command",
    "CommandError",
    "Item",
    "Query",
    "claimed_from_answer",
    "decode",
    "decode_command",
    "encode",
    "item_fields",
    "item_from_map",
    "item_to_map",
    "stamp",
]

GROUP = "raft/v1"
"""Where a host serves the queue's replica: /<peer id>/GROUP."""

OPS = frozenset(
    {"create", "put", "claim", "complete", "release", "limit", "append", "cursor", "trim", "tick"}
)
QUERIES = frozenset({"read", "cursor_get", "stats", "topics"})

MAX_INT = 2**53  # integers in commands (seq, ack, ids, offsets) stay below this
MAX_TIME = 1e11  # times and durations in seconds stay below this (year 5138)
MAX_BATCH = 100_000  # items, ids or records in one command
MAX_NAME = 1_000  # characters in a topic, consumer, client, key or partition name
MAX_KEY = 8_192  # characters in an item's unique key


class CommandError(ValueError):
    """A command or query that is malformed or refused; its message is one line."""


@dataclass(slots=True, frozen=True)
class Item:
    """What put() takes."""

    payload: bytes
    key: str | None = None  # unique key: an item whose key was ever put in the topic is dropped
    partition: str | None = None  # partition key: the unit of partition limits (e.g. a host)
    not_before: float | None = None  # log-clock time before which the item is not claimable


@dataclass(slots=True, frozen=True)
class Claimed:
    """What claim() returns."""

    id: int
    payload: bytes
    key: str | None
    partition: str | None
    attempts: int  # including this claim


def encode(obj: Mapping[str, Any]) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def decode(data: bytes) -> dict[str, Any]:
    """A msgpack map with string keys, or CommandError."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise CommandError(f"not a msgpack map: {one_line(exc)}") from None
    if not isinstance(obj, dict):
        raise CommandError(f"expected a msgpack map, got {type(obj).__name__}")
    return obj


def one_line(exc: BaseException | str) -> str:
    text = str(exc) if isinstance(exc, BaseException) else exc
    text = " ".join(text.split())
    return text[:300] if text else type(exc).__name__


def item_to_map(item: Item) -> dict[str, Any]:
    out: dict[str, Any] = {"payload": item.payload}
    if item.key is not None:
        out["key"] = item.key
    if item.partition is not None:
        out["partition"] = item.partition
    if item.not_before is not None:
        out["not_before"] = item.not_before
    return out


ITEM_FIELDS = frozenset({"payload", "key", "partition", "not_before"})
ItemFields = tuple[bytes, str | None, str | None, float | None]


def item_from_map(obj: Any) -> Item:
    """Validate one item map; CommandError says what is wrong."""
    return Item(*item_fields(obj))


def item_fields(obj: Any) -> ItemFields:
    """(payload, key, partition, not_before) of a valid item map; else CommandError."""
    if type(obj) is not dict:
        raise CommandError(f"an item must be a map, got {type(obj).__name__}")
    if not obj.keys() <= ITEM_FIELDS:
        extra = sorted(str(k) for k in obj.keys() - ITEM_FIELDS)
        raise CommandError(f"unknown item field {extra[0]!r}")
    payload = obj.get("payload")
    if type(payload) is not bytes:
        raise CommandError("item payload must be bytes")
    key = obj.get("key")
    if key is not None and (type(key) is not str or len(key) > MAX_KEY):
        key = as_str(key, "key", MAX_KEY, empty=True)
    partition = obj.get("partition")
    if partition is not None and (type(partition) is not str or len(partition) > MAX_NAME):
        partition = as_str(partition, "partition", MAX_NAME, empty=True)
    not_before = obj.get("not_before")
    if not_before is not None:
        not_before = as_time(not_before, "not_before")
    return payload, key, partition, not_before


def claimed_from_answer(answer: Mapping[str, Any]) -> list[Claimed]:
    """The items of a claim answer."""
    return [
        Claimed(m["id"], m["payload"], m.get("key"), m.get("partition"), m["attempts"])
        for m in answer["items"]
    ]


# -- validation helpers (shared with the state machine) ----------------------------------------


def as_int(value: Any, name: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandError(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise CommandError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def as_time(value: Any, name: str, lo: float = -MAX_TIME) -> float:
    """A finite number of seconds in [lo, MAX_TIME]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError(f"{name} must be a number, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or not lo <= seconds <= MAX_TIME:
        raise CommandError(f"{name} must be a finite number between {lo:g} and {MAX_TIME:g}")
    return seconds


def as_str(value: Any, name: str, limit: int = MAX_NAME, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{name} must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise CommandError(f"{name} must not be empty")
    if len(value) > limit:
        raise CommandError(f"{name} is longer than {limit} characters")
    return value


def opt_str(obj: Mapping[str, Any], name: str, limit: int = MAX_NAME) -> str | None:
    value = obj.get(name)
    return None if value is None else as_str(value, name, limit, empty=True)


def as_list(value: Any, name: str, limit: int = MAX_BATCH) -> list[Any]:
    if not isinstance(value, list):
        raise CommandError(f"{name} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise CommandError(f"{name} has more than {limit} entries")
    return value


def field(cmd: Mapping[str, Any], name: str) -> Any:
    try:
        return cmd[name]
    except KeyError:
        raise CommandError(f"{cmd.get('op', 'command')}: missing field {name!r}") from None


# -- commands ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Command:
    """One write command, before its session fields and time are added.

    `Command.put("urls", [Item(b"...")]).encode(client=cid, seq=7, ack=5)` is what a client
    sends; the leader adds "time" with `stamp` before proposing it.
    """

    op: str
    fields: Mapping[str, Any]

    def encode(
        self, *, client: str = "", seq: int = 0, ack: int = 0, time: float | None = None
    ) -> bytes:
        body: dict[str, Any] = {"op": self.op, "client": client, "seq": seq, "ack": ack}
        if time is not None:
            body["time"] = time
        body.update(self.fields)
        return encode(body)

    @staticmethod
    def create(
        topic: str, kind: str = "work", max_attempts: int = 5, dead_letter: str | None = None
    ) -> Command:
        fields = {"topic": topic, "kind": kind, "max_attempts": max_attempts}
        return Command("create", fields | {"dead_letter": dead_letter})

    @staticmethod
    def put(topic: str, items: Sequence[Item]) -> Command:
        return Command("put", {"topic": topic, "items": [item_to_map(i) for i in items]})

    @staticmethod
    def claim(topic: str, consumer: str, max_items: int, lease: float) -> Command:
        fields = {"topic": topic, "consumer": consumer, "max_items": max_items, "lease": lease}
        return Command("claim", fields)

    @staticmethod
    def complete(
        consumer: str,
        ids: Sequence[int],
        append: Mapping[str, Sequence[bytes]] | None = None,
        put: Mapping[str, Sequence[Item]] | None = None,
    ) -> Command:
        fields: dict[str, Any] = {"consumer": consumer, "ids": list(ids)}
        fields["append"] = {t: list(r) for t, r in (append or {}).items()}
        fields["put"] = {t: [item_to_map(i) for i in items] for t, items in (put or {}).items()}
        return Command("complete", fields)

    @staticmethod
    def release(consumer: str, ids: Sequence[int], delay: float = 0.0) -> Command:
        return Command("release", {"consumer": consumer, "ids": list(ids), "delay": delay})

    @staticmethod
    def limit(
        topic: str, partition: str | None, max_leased: int | None, min_interval: float = 0.0
    ) -> Command:
        fields = {"topic": topic, "partition": partition, "max_leased": max_leased}
        return Command("limit", fields | {"min_interval": min_interval})

    @staticmethod
    def append(topic: str, records: Sequence[bytes]) -> Command:
        return Command("append", {"topic": topic, "records": list(records)})

    @staticmethod
    def cursor(topic: str, consumer: str, offset: int) -> Command:
        return Command("cursor", {"topic": topic, "consumer": consumer, "offset": offset})

    @staticmethod
    def trim(topic: str, offset: int) -> Command:
        return Command("trim", {"topic": topic, "offset": offset})

    @staticmethod
    def tick() -> Command:
        return Command("tick", {})


def stamp(data: bytes, time: float) -> bytes:
    """The command `data` with its "time" set: the leader's clock, just before proposing.

    Raises CommandError for data that is not a command map (the leader can refuse it at once).
    """
    cmd = decode(data)
    cmd["time"] = as_time(time, "time")
    return encode(cmd)


def decode_command(data: bytes) -> dict[str, Any]:
    """A command map whose header (op, client, seq, ack, time) is valid; the op's own fields
    are checked by the state machine. CommandError says what is wrong."""
    cmd = decode(data)
    op = field(cmd, "op")
    if not isinstance(op, str) or op not in OPS:
        raise CommandError(f"unknown op {op!r}; expected one of {', '.join(sorted(OPS))}")
    client = as_str(cmd.get("client", ""), "client", empty=True)
    seq = as_int(cmd.get("seq", 0), "seq")
    ack = as_int(cmd.get("ack", 0), "ack")
    time = as_time(field(cmd, "time"), "time", 0.0)
    if client and seq < 1:
        raise CommandError("seq must be >= 1 for a command with a client id")
    cmd.update(client=client, seq=seq, ack=ack, time=time)
    return cmd


class Query:
    """Builders for read-only queries (answered by `QueueState.query`)."""

    @staticmethod
    def read(topic: str, offset: int, n: int) -> dict[str, Any]:
        return {"op": "read", "topic": topic, "offset": offset, "n": n}

    @staticmethod
    def cursor_get(topic: str, consumer: str) -> dict[str, Any]:
        return {"op": "cursor_get", "topic": topic, "consumer": consumer}

    @staticmethod
    def stats(topic: str) -> dict[str, Any]:
        return {"op": "stats", "topic": topic}

    @staticmethod
    def topics() -> dict[str, Any]:
        return {"op": "topics"}
