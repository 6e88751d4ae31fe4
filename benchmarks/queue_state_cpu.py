"""CPU per item of the queue state machine alone: the workloads of queue_throughput.py, a frontier.

    PYTHONPATH=$PWD python benchmarks/queue_state_cpu.py [put cycle16 cycle1 frontier]
        [--fill 1000000] [--group 16] [--runs 5]

In this process, one QueueState without autocommit, committed every --group entries (a
replica commits once per Ready). The workloads are those of queue_throughput.py: `put` —
entries of 500 items of 100 bytes with unique numbered keys (k1, k2, ...) and no partition;
`cycleB` — claim B items and complete them in one command with a 2 KB result each (appended
to a log topic) and 10 new items each. `frontier` (a crawl's frontier, as in
`crawl.py --frontier-scale`): claim 16 URLs and complete them with an 8 KB result each and
50 new URLs each, the children of the claimed URL, over 3 hosts. `--fill N` first puts N
more keys into the put workload's topic (as `--scale` does). Prints the median CPU time
(time.process_time) per put item, per cycle (one item claimed and completed) or per new
frontier URL of --runs runs, and each run's: on a shared machine the CPU time is far
steadier than a rate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import msgpack

from ww.queue.commands import Command, Item
from ww.queue.state import QueueState

RESULT = b"r" * 2048
PAGE_RESULT = b"p" * 8192
HOSTS = ("http://127.0.0.1:8001", "http://127.0.0.2:8001", "http://127.0.0.3:8001")
FANOUT = 50


class Bench:
    def __init__(self, path: Path, group: int) -> None:
        self.state = QueueState(path, autocommit=False)
        self.group = group
        self.index = 0
        self.keys = count(1)
        self.building = 0.0  # CPU seconds spent making commands inside a timed run

    def apply(self, command: Command) -> dict[str, Any]:
        self.index += 1
        data = command.encode(
            time=1_000_000.0 + self.index / 10_000, client="bench", seq=self.index, ack=self.index
        )
        answer = self.state.apply(self.index, data)
        if self.index % self.group == 0:
            self.state.commit()
        assert "error" not in answer, answer
        return answer

    def items(self, n: int) -> list[Item]:
        out = []
        for _ in range(n):
            key = f"k{next(self.keys)}"
            out.append(Item(key.encode().ljust(100, b"."), key=key))
        return out

    def workload(self, name: str, n: int) -> Callable[[], None]:
        """A run of `n` put items or cycles, its commands made beforehand."""
        if name == "put":
            puts = [Command.put("bench", self.items(500)) for _ in range(max(1, n // 500))]

            def run_puts() -> None:
                for command in puts:
                    self.apply(command)

            return run_puts
        if name == "frontier":
            return self.frontier(max(1, n // (16 * FANOUT)))
        batch = int(name.removeprefix("cycle"))
        news = [self.items(10 * batch) for _ in range(max(1, n // batch))]

        def run_cycles() -> None:
            for new in news:
                claimed = self.apply(Command.claim("work", "worker", batch, 60.0))["items"]
                ids = [c["id"] for c in claimed]
                results = {"results": [RESULT] * len(ids)}
                self.apply(Command.complete("worker", ids, append=results, put={"work": new}))

        return run_cycles

    def frontier_items(self, parent: str) -> list[Item]:
        """The children of `parent` as a crawl worker puts them (payload, key, host)."""
        out = []
        for j in range(FANOUT):
            url = f"{parent}{j}/"
            payload = msgpack.packb({"depth": 3, "referrer": parent})
            out.append(Item(payload, key=url, partition=url.split("/")[2]))
        return out

    def frontier(self, cycles: int) -> Callable[[], None]:
        def run_frontier() -> None:
            for _ in range(cycles):
                claimed = self.apply(Command.claim("frontier", "worker", 16, 60.0))["items"]
                start = time.process_time()
                ids = [c["id"] for c in claimed]
                new = [i for c in claimed for i in self.frontier_items(c["key"])]
                results = {"results": [PAGE_RESULT] * len(ids)}
                complete = Command.complete("worker", ids, append=results, put={"frontier": new})
                self.building += time.process_time() - start  # the worker's part, not counted
                self.apply(complete)

        return run_frontier


def cpu_per_item(bench: Bench, run: Callable[[], None], n: int) -> float:
    start, building = time.process_time(), bench.building
    run()
    return (time.process_time() - start - (bench.building - building)) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["put", "cycle16", "cycle1"])
    parser.add_argument("--fill", type=int, default=0)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    for name in args.workloads:
        if name not in ("put", "frontier") and not name.removeprefix("cycle").isdigit():
            parser.error(
                f"unknown workload {name!r}; expected put, cycleB (e.g. cycle16) or frontier"
            )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench = Bench(Path(tmp) / "queue.db", args.group)
        bench.apply(Command.create("results", kind="log"))
        for _ in range(4):
            bench.apply(Command.put("work", bench.items(500)))
        seeds = [f"{host}/f/" for host in HOSTS]
        bench.apply(Command.put("frontier", [i for s in seeds for i in bench.frontier_items(s)]))
        for _ in range(args.fill // 1000):
            bench.apply(Command.put("bench", bench.items(1000)))
        bench.state.commit()
        print(f"group={args.group} fill={args.fill:,}")
        for name in args.workloads:
            n = {"put": 20_000, "cycle1": 1_000, "frontier": 160_000}.get(name, 4_000)
            unit = {"put": "item", "frontier": "new URL"}.get(name, "cycle")
            bench.workload(name, n // 4)()  # warm the cache and the statements
            runs = [cpu_per_item(bench, bench.workload(name, n), n) for _ in range(args.runs)]
            print(
                f"{name:<8} {statistics.median(runs):7.1f} µs CPU per {unit}"
                f"  (runs {' '.join(f'{r:.1f}' for r in runs)})",
                flush=True,
            )
        bench.state.close()


if __name__ == "__main__":
    main()
