"""What the hosts spend carrying a queue client's requests: dialed against relayed.

    PYTHONPATH=$PWD python benchmarks/queue_hops.py [--rounds 3] [--calls 400]

Starts three hosts and the Raft group (as `ww-crawl` does), makes the leader a host other
than the one this process is connected to, then, alternating in each round, appends
`--calls` batches of 16 records of 8 KB (a crawl worker's complete) to a log topic, 8 calls
in flight, through a client that dials the leader's host (`direct=True`) and through one
that goes through its own host (`direct=False`). Prints the CPU seconds of each host (read
from /proc) and of this process per round and mode, and the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from ww.crawler.cluster import local_cluster, start_queue
from ww.queue.client import QueueClient

RECORD = b"x" * 8192
BATCH = 16
IN_FLIGHT = 8
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def load(client: QueueClient, calls: int) -> None:
    left = calls

    async def one() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.append("bench", [RECORD] * BATCH)

    async with trio.open_nursery() as nursery:
        for _ in range(IN_FLIGHT):
            nursery.start_soon(one)


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=400)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="queue-hops-") as tmp:
        async with local_cluster(Path(tmp)) as cluster:
            first = await start_queue(cluster)
            home = await cluster.host.id()
            status = await first.status()
            if status["leader"] == home:
                await first.transfer(next(p for p in cluster.peers if p != home))
                with trio.fail_after(10):
                    while (await first.status())["leader"] in (home, None):
                        await trio.sleep(0.1)
            await first.create("bench", kind="log")
            await first.aclose()
            hosts = {h.name: h.process.pid for h in cluster.processes}
            results: dict[str, list[tuple[float, float]]] = {"dialed": [], "relayed": []}
            for _ in range(args.rounds):
                for mode in results:
                    client = await QueueClient.connect(cluster.host, direct=mode == "dialed")
                    with trio.fail_after(10):  # the other two hosts dialed
                        while mode == "dialed" and len(client.dialed()) < 2:
                            await trio.sleep(0.01)
                    await client.append("bench", [b""])  # find the leader
                    before = {n: cpu(pid) for n, pid in hosts.items()}
                    own = time.process_time()
                    await load(client, args.calls)
                    own = time.process_time() - own
                    spent = {n: cpu(pid) - before[n] for n, pid in hosts.items()}
                    await client.aclose()
                    total = sum(spent.values())
                    results[mode].append((total, own))
                    per_host = " ".join(f"{n} {s:.2f}" for n, s in sorted(spent.items()))
                    print(f"{mode:8} hosts {total:.2f} CPU-s ({per_host}), this process {own:.2f}")
            mb = args.calls * BATCH * len(RECORD) / 1e6
            for mode, rows in results.items():
                hosts_cpu = statistics.median(r[0] for r in rows)
                own_cpu = statistics.median(r[1] for r in rows)
                print(
                    f"median {mode:8} hosts {hosts_cpu:.2f} CPU-s, this process {own_cpu:.2f} "
                    f"for {mb:.0f} MB in {args.calls} calls"
                )
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
