"""One replica of the queue at the anchor this ROM was spawned at (`/<peer id>/raft/v1`), its
state in the volume the host gives it. ww.queue.replica does the work."""

from __future__ import annotations

from typing import Any

from ww.queue.replica import main as run_replica


async def main(host: Any, args: list[str]) -> int:
    return await run_replica(host, args)
