"""QueueState against a plain in-memory model (tests/queue/model.py), driven by hypothesis."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ww.queue.commands import Command, Item
from ww.queue.state import QueueState

from .model import Model

TOPICS = ["a", "b"]
CONSUMERS = ["c1", "c2"]
PARTITIONS = ["h1", "h2", "h3", None]
item_tuples = st.lists(
    st.tuples(
        st.sampled_from([b"x", b"y", b"z"]),
        st.sampled_from([None, "k1", "k2", "k3", "k4", "k5", "k6"]),
        st.sampled_from(PARTITIONS),
        st.sampled_from([None, -1.0, 0.5, 2.0]),
    ),
    max_size=6,
)


def as_item(payload: bytes, key: str | None, partition: str | None, nb: float | None) -> Item:
    return Item(payload, key, partition, nb)


class QueueAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="queue-model-"))
        self.state = QueueState(self.dir / "q.db")
        self.model = Model()
        self.index = 0
        self.time = 100.0
        self.log: list[tuple[int, bytes]] = []

    def run(self, command: Command, op: str, **args: Any) -> tuple[dict, dict]:
        self.index += 1
        data = command.encode(time=self.time)
        self.log.append((self.index, data))
        got = self.state.apply(self.index, data)
        want = self.model.apply(self.time, op, **args)
        if "error" in want:
            assert "error" in got, (op, args, got)
            assert got.get("lost") == want.get("lost"), (got, want)
        else:
            assert got == want, (op, args, got, want)
        return got, want

    def abs_items(self, items: list[tuple]) -> list[tuple]:
        # not_before offsets become log times, relative to the clock
        return [(p, k, pk, None if nb is None else self.model.clock + nb) for p, k, pk, nb in items]

    @initialize()
    def create(self) -> None:
        self.run(
            Command.create("a", max_attempts=2), "create", topic="a", kind="work", max_attempts=2
        )
        self.run(
            Command.create("log", kind="log"), "create", topic="log", kind="log", max_attempts=5
        )

    @rule(topic=st.sampled_from(TOPICS), items=item_tuples)
    def put(self, topic: str, items: list[tuple]) -> None:
        items = self.abs_items(items)
        self.run(Command.put(topic, [as_item(*i) for i in items]), "put", topic=topic, items=items)

    @rule(
        topic=st.sampled_from([*TOPICS, "log", "a.dead"]),
        consumer=st.sampled_from(CONSUMERS),
        n=st.integers(1, 5),
        lease=st.sampled_from([0.5, 1.0, 4.0]),
    )
    def claim(self, topic: str, consumer: str, n: int, lease: float) -> None:
        self.run(
            Command.claim(topic, consumer, n, lease),
            "claim",
            topic=topic,
            consumer=consumer,
            max_items=n,
            lease=lease,
        )

    def some_ids(self, data: st.DataObject) -> list[int]:
        known = list(range(1, self.model.next_id + 1))
        return data.draw(st.lists(st.sampled_from(known), max_size=3, unique=True))

    @rule(
        data=st.data(),
        consumer=st.sampled_from(CONSUMERS),
        append=st.sampled_from(
            [{}, {"log": [b"r1"]}, {"log": [b"r1", b"r2"], "fresh": [b"f"]}, {"a": [b"bad"]}]
        ),
        put_topic=st.sampled_from([None, "a", "b", "log"]),
        items=item_tuples,
    )
    def complete(self, data, consumer, append, put_topic, items) -> None:
        ids = self.some_ids(data)
        items = self.abs_items(items)
        put = {} if put_topic is None else {put_topic: items}
        command = Command.complete(
            consumer, ids, append=append, put={t: [as_item(*i) for i in v] for t, v in put.items()}
        )
        self.run(command, "complete", consumer=consumer, ids=ids, append=append, put=put)

    @rule(
        data=st.data(), consumer=st.sampled_from(CONSUMERS), delay=st.sampled_from([0.0, 1.0, 3.0])
    )
    def release(self, data, consumer: str, delay: float) -> None:
        ids = self.some_ids(data)
        self.run(
            Command.release(consumer, ids, delay),
            "release",
            consumer=consumer,
            ids=ids,
            delay=delay,
        )

    @rule(
        topic=st.sampled_from(TOPICS),
        partition=st.sampled_from(PARTITIONS),
        k=st.sampled_from([None, 1, 2]),
        d=st.sampled_from([0.0, 0.5, 2.0]),
    )
    def limit(self, topic, partition, k, d) -> None:
        self.run(
            Command.limit(topic, partition, k, d),
            "limit",
            topic=topic,
            partition=partition,
            max_leased=k,
            min_interval=d,
        )

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 3.0]), back=st.booleans())
    def advance(self, dt: float, back: bool) -> None:
        # sometimes a leader with a slower clock: the log clock must not go back
        self.time += -dt if back else dt
        self.run(Command.tick(), "tick")

    @invariant()
    def stats_agree(self) -> None:
        names = sorted(self.model.topics)
        assert self.state.query({"op": "topics"}) == {"topics": names}
        for name in names:
            assert self.state.query({"op": "stats", "topic": name}) == self.model.stats(name), name

    def teardown(self) -> None:
        try:
            replay = QueueState(self.dir / "replay.db")
            for index, data in self.log:
                replay.apply(index, data)
            assert replay.digest() == self.state.digest()
            assert replay.snapshot() == self.state.snapshot()
            replay.close()
            self.state.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


QueueAgainstModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueAgainstModel = QueueAgainstModel.TestCase
