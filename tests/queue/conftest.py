"""Fixtures of the queue tests: a driver feeding commands to a QueueState (`q`), and real ww
hosts (tests/ww/conftest.py) for the replica groups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ww.conftest import HostFactory, HostProcess, host_factory, wait_for
from ww.queue.commands import Command
from ww.queue.state import QueueState

__all__ = ["HostFactory", "HostProcess", "host_factory", "wait_for"]


class Driver:
    """Feeds commands to a QueueState with increasing indexes, at a settable log time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = QueueState(path)
        self.index = 0
        self.time = 1000.0
        self.log: list[tuple[int, bytes]] = []

    def raw(self, data: bytes) -> dict[str, Any]:
        self.index += 1
        self.log.append((self.index, data))
        return self.state.apply(self.index, data)

    def __call__(self, command: Command, **session: Any) -> dict[str, Any]:
        return self.raw(command.encode(time=self.time, **session))

    def ok(self, command: Command, **session: Any) -> dict[str, Any]:
        answer = self(command, **session)
        assert "error" not in answer, answer
        return answer

    def query(self, **request: Any) -> dict[str, Any]:
        return self.state.query(request)

    def stats(self, topic: str) -> dict[str, Any]:
        answer = self.query(op="stats", topic=topic)
        assert "error" not in answer, answer
        return answer

    def claim_ids(self, topic: str, consumer: str = "c", n: int = 10, lease: float = 30.0) -> list:
        return [c["id"] for c in self.ok(Command.claim(topic, consumer, n, lease))["items"]]


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Driver]:
    driver = Driver(tmp_path / "queue.db")
    yield driver
    driver.state.close()
