"""Raft failover: `kill -9` the leader under load and time until writes commit again.

    python benchmarks/raft_failover.py [--repeat 5] [--inflight 32]

Each round starts a fresh 3-process ww.raft cluster (DiskStorage with fsync, default driver
timeouts), drives the leader with `--inflight` concurrent 100-byte proposals for `--load`
seconds, then sends SIGKILL to the leader process. The client notices the broken connection,
polls the surviving nodes' status until one says it leads, and resumes proposing there. The
failover time is from the kill until the first proposal is acknowledged (applied) by the new
leader. Prints each round and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics

import msgpack
import trio
from raft_throughput import (
    ClientConnection,
    Cluster,
    NodeProcess,
    cluster,
    find_leader,
    run_bounded,
)


async def keep_proposing(
    conn: ClientConnection, inflight: int, payload: bytes, acked: list[float]
) -> None:
    """Closed-loop load on one connection until it breaks; appends each ack time."""
    await conn.stream.send_all(
        b"".join(msgpack.packb([conn.next_rid(), "put", payload]) for _ in range(inflight))
    )
    while True:
        replies = await conn.replies()
        now = trio.current_time()
        acked.extend(now for _, code, _ in replies if code == "ok")
        await conn.stream.send_all(
            b"".join(msgpack.packb([conn.next_rid(), "put", payload]) for _ in replies)
        )


async def one_round(args: argparse.Namespace, extra: tuple[str, ...]) -> tuple[float, int, int]:
    """(seconds from the kill to the first write committed by the new leader, old, new)."""
    payload = os.urandom(args.size)
    async with cluster("ww.raft", extra_args=extra) as c:
        leader = await find_leader(c)
        before: list[float] = []
        conn = await ClientConnection.connect(leader.client_address)
        with trio.move_on_after(args.load):
            await keep_proposing(conn, args.inflight, payload, before)
        if not before:
            raise RuntimeError(f"no write committed in {args.load} s before the kill")
        # The load is stopped for the instant of the kill only so that it is one clean point
        # in time; requests already in flight to the old leader stay unanswered.
        killed_at = trio.current_time()
        leader.kill9()
        await leader.proc.wait()
        await conn.aclose()
        new_leader, recovered_at = await _resume(c, args, payload, deadline=killed_at + 30)
        return recovered_at - killed_at, leader.node_id, new_leader.node_id


async def _resume(
    c: Cluster, args: argparse.Namespace, payload: bytes, deadline: float
) -> tuple[NodeProcess, float]:
    """Find the new leader and propose there until a write is acknowledged."""
    with trio.fail_at(deadline):
        while True:
            leader = await find_leader(c, timeout=deadline - trio.current_time(), poll=0.005)
            try:
                conn = await ClientConnection.connect(leader.client_address)
            except OSError:
                continue
            try:
                acked_at = await _first_ack(conn, args.inflight, payload)
            except (OSError, EOFError, trio.BrokenResourceError):
                acked_at = None
            finally:
                await conn.aclose()
            if acked_at is not None:
                return leader, acked_at


async def _first_ack(conn: ClientConnection, inflight: int, payload: bytes) -> float | None:
    """Propose on `conn` until the first ack (its time); None if the node redirects us."""
    await conn.stream.send_all(
        b"".join(msgpack.packb([conn.next_rid(), "put", payload]) for _ in range(inflight))
    )
    while True:
        replies = await conn.replies()
        now = trio.current_time()
        codes = [code for _, code, _ in replies]
        if "ok" in codes:
            return now
        if "redirect" in codes:
            return None
        await trio.sleep(0.005)  # refused ("err"): try again shortly
        await conn.stream.send_all(
            b"".join(msgpack.packb([conn.next_rid(), "put", payload]) for _ in replies)
        )


async def run(args: argparse.Namespace) -> None:
    extra: tuple[str, ...] = ()
    if args.tick_interval:
        extra = ("--tick-interval", str(args.tick_interval))
    print(
        f"3 ww.raft replicas (fsync on), {args.inflight} proposals in flight, kill -9 the "
        f"leader after {args.load:g} s of load, {args.repeat} rounds"
    )
    times = []
    for i in range(args.repeat):
        seconds, old, new = await one_round(args, extra)
        times.append(seconds)
        print(
            f"round {i + 1}: killed node {old}, node {new} took over, "
            f"writes commit again after {seconds * 1e3:.0f} ms",
            flush=True,
        )
    med = statistics.median(times)
    print(
        f"failover median {med * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, "
        f"max {max(times) * 1e3:.0f}) over {len(times)} rounds (target < 1500 ms)"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="rounds (fresh cluster each)")
    p.add_argument("--inflight", type=int, default=32, help="concurrent proposals")
    p.add_argument("--load", type=float, default=2.0, help="seconds of load before the kill")
    p.add_argument("--size", type=int, default=100, help="command size in bytes")
    p.add_argument(
        "--tick-interval", type=float, default=0.0, help="override the driver's tick (seconds)"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    run_bounded(lambda: run(args), args.repeat * (args.load + 60) + 30)


if __name__ == "__main__":
    main()
