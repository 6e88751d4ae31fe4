"""The replica's commit policy: one SQLite commit at the end of a Ready, at most every
`commit_interval` seconds; what is not committed yet is applied again after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from ww.queue import replica as replica_module
from ww.queue.commands import Command, Item
from ww.queue.replica import AppliedState
from ww.queue.state import QueueState


def put(applied: AppliedState, index: int, key: str) -> None:
    data = Command.put("t", [Item(b"x", key=key)]).encode(time=1.0, client="c", seq=index)
    assert "error" not in applied.apply(index, data)


def committed_index(path: Path) -> int:
    other = QueueState(path, check=False)
    try:
        return other.applied_index
    finally:
        other.close()


def test_readies_within_the_interval_share_one_commit(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    state = QueueState(path, autocommit=False)
    applied = AppliedState(state, None, commit_interval=3600.0)
    put(applied, 1, "a")
    applied.commit()  # the first Ready commits
    put(applied, 2, "b")
    applied.commit()  # within the interval: not yet
    assert committed_index(path) == 1
    # A crash now loses entry 2 from the database; the log applies it again, once.
    state._conn.close()
    again = QueueState(path, autocommit=False)
    assert again.applied_index == 1
    assert "error" in again.apply(1, b"")  # refused: already applied
    put(AppliedState(again, None), 2, "b")
    assert again.query({"op": "stats", "topic": "t"})["seen"] == 2
    again.close()


def test_an_interval_of_zero_commits_every_ready(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    applied = AppliedState(QueueState(path, autocommit=False), None, commit_interval=0.0)
    for index in (1, 2, 3):
        put(applied, index, str(index))
        applied.commit()
        assert committed_index(path) == index


def test_the_wal_is_checkpointed_in_a_thread_not_by_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "queue.db"
    state = QueueState(path, autocommit=False, autocheckpoint=False)
    applied = AppliedState(state, None, commit_interval=0.0)
    monkeypatch.setattr(replica_module, "CHECKPOINT_INTERVAL", 1e9)
    for index in range(1, 30):
        put(applied, index, str(index))
        applied.commit()
    size_before = path.stat().st_size
    assert Path(f"{path}-wal").stat().st_size > 0  # the commits copied nothing into the file
    monkeypatch.setattr(replica_module, "CHECKPOINT_INTERVAL", 0.0)
    put(applied, 30, "30")
    applied.commit()
    applied.join()
    assert path.stat().st_size > size_before  # the checkpoint copied the WAL's pages
    reopened = QueueState(path, check=False)
    assert reopened.query({"op": "stats", "topic": "t"})["seen"] == 30
    reopened.close()
