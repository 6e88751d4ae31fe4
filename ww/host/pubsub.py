"""Publish/subscribe routing (sans-I/O).

Local subscribers get bounded queues: a subscriber that falls behind loses messages (counted
in `dropped`), it never slows the publisher or the cluster. Messages travel between hosts as
`Envelope`s. Each envelope carries `reached`, the hosts that already have it or are being sent
it; a host forwards only to linked hosts outside that set, so in a full mesh the publisher's
host sends once to each host and nobody forwards, and in a partial mesh the message floods
without loops. A bounded set of seen message ids drops any duplicate that still arrives.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import trio

MAX_TOPIC_LENGTH = 256
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
DEFAULT_QUEUE = 256


class PubSubError(ValueError):
    """A topic name, message or envelope is malformed (one line)."""


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not topic:
        raise PubSubError("topic must be a non-empty string")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise PubSubError(f"topic is {len(topic)} characters long; at most {MAX_TOPIC_LENGTH}")
    if not topic.isprintable():
        raise PubSubError(f"topic {topic!r} has unprintable characters")
    return topic


def check_data(data: object) -> bytes:
    if not isinstance(data, bytes):
        raise PubSubError(f"a message must be bytes, not {type(data).__name__}")
    if len(data) > MAX_MESSAGE_SIZE:
        raise PubSubError(f"message is {len(data)} bytes; at most {MAX_MESSAGE_SIZE}")
    return data


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message on its way between hosts."""

    topic: str
    origin: str
    epoch: int
    seq: int
    data: bytes
    reached: tuple[str, ...]

    @property
    def msg_id(self) -> tuple[str, int, int]:
        return (self.origin, self.epoch, self.seq)

    def to_wire(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "origin": self.origin,
            "epoch": self.epoch,
            "seq": self.seq,
            "data": self.data,
            "reached": list(self.reached),
        }

    @staticmethod
    def from_wire(raw: object) -> Envelope:
        if not isinstance(raw, dict):
            raise PubSubError("envelope is not a map")
        origin, epoch, seq, reached = (raw.get(k) for k in ("origin", "epoch", "seq", "reached"))
        if not isinstance(origin, str) or not origin:
            raise PubSubError("envelope has no origin")
        if not isinstance(epoch, int) or not isinstance(seq, int):
            raise PubSubError("envelope has no message id")
        if not isinstance(reached, list | tuple) or not all(isinstance(p, str) for p in reached):
            raise PubSubError("envelope has a bad reached list")
        topic = check_topic(raw.get("topic"))
        return Envelope(topic, origin, epoch, seq, check_data(raw.get("data")), tuple(reached))


class Subscription:
    """One local subscriber's bounded queue of messages."""

    def __init__(self, topic: str, capacity: int = DEFAULT_QUEUE) -> None:
        self.topic = topic
        self.dropped = 0
        self._send, self.receive = trio.open_memory_channel[bytes](capacity)

    def offer(self, data: bytes) -> None:
        try:
            self._send.send_nowait(data)
        except trio.WouldBlock:
            self.dropped += 1
        except trio.BrokenResourceError:
            pass  # the subscriber stopped reading; it is being unsubscribed

    def close(self) -> None:
        self._send.close()


class Router:
    """Topics, local subscribers and the fan-out decisions for one host."""

    def __init__(self, me: str, *, seen_limit: int = 65536, epoch: int | None = None) -> None:
        self.me = me
        self.epoch = secrets.randbits(63) if epoch is None else epoch
        self._seq = 0
        self._subs: dict[str, set[Subscription]] = {}
        self._seen: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._seen_limit = seen_limit

    def subscribe(self, topic: str, capacity: int = DEFAULT_QUEUE) -> Subscription:
        sub = Subscription(check_topic(topic), capacity)
        self._subs.setdefault(topic, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.topic]
        sub.close()

    def subscribers(self, topic: str | None = None) -> int:
        """Local subscribers of `topic` (of every topic when None)."""
        if topic is None:
            return sum(len(subs) for subs in self._subs.values())
        return len(self._subs.get(topic, ()))

    def publish(
        self, topic: str, data: bytes, links: Collection[str]
    ) -> list[tuple[str, Envelope]]:
        """Deliver a locally published message; return (peer, envelope) pairs to send."""
        self._seq += 1
        env = Envelope(check_topic(topic), self.me, self.epoch, self._seq, check_data(data), ())
        self._remember(env.msg_id)
        self._deliver(env)
        return self._fan_out(env, links)

    def receive(self, env: Envelope, links: Collection[str]) -> list[tuple[str, Envelope]]:
        """Handle a message from another host; return (peer, envelope) pairs to forward."""
        if env.msg_id in self._seen or env.origin == self.me:
            return []
        self._remember(env.msg_id)
        self._deliver(env)
        return self._fan_out(env, links)

    def _fan_out(self, env: Envelope, links: Collection[str]) -> list[tuple[str, Envelope]]:
        reached = set(env.reached) | {self.me, env.origin}
        targets = sorted(set(links) - reached)
        if not targets:
            return []
        onward = Envelope(
            env.topic,
            env.origin,
            env.epoch,
            env.seq,
            env.data,
            tuple(sorted(reached | set(targets))),
        )
        return [(peer, onward) for peer in targets]

    def _deliver(self, env: Envelope) -> None:
        for sub in list(self._subs.get(env.topic, ())):
            sub.offer(env.data)

    def _remember(self, msg_id: tuple[str, int, int]) -> None:
        self._seen[msg_id] = None
        while len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)
