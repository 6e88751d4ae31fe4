"""The queue state machine alone, in process: how fast entries apply, how big a seen-set gets.

    PYTHONPATH=$PWD python benchmarks/queue_state.py [--keys 1000000] [--hosts 1000]
        [--group 1] [--dir /tmp]

One SQLite file, WAL, synchronous=NORMAL, as a replica runs it. `--group N` commits once per
N entries (a replica commits once per batch of committed entries); 1 commits every entry.
Measures:
- puts of 100-byte items with unique keys (URLs over --hosts partition keys, or none with
  --hosts 0), in batches of 1,000 items per entry (items/s);
- claim + complete cycles: claim 1..10 items, complete them with a 2 KB result appended to a
  log topic and 10 new items put (cycles/s);
- both again once the seen-set holds --keys keys; the database size and the peak RSS.
Rates are given per second of wall time and per second of this process's CPU time (the
machine may be shared).
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ww.queue.commands import Command, Item
from ww.queue.state import QueueState


class Bench:
    def __init__(self, path: Path, hosts: int, group: int) -> None:
        self.state = QueueState(path, autocommit=group == 1)
        self.hosts = hosts
        self.group = group
        self.index = 0
        self.clock = 1_000_000.0
        self.serial = 0

    def apply(self, command: Command) -> dict[str, Any]:
        self.index += 1
        self.clock += 0.0001
        data = command.encode(time=self.clock, client="bench", seq=self.index, ack=self.index)
        answer = self.state.apply(self.index, data)
        if self.index % self.group == 0:
            self.state.commit()
        assert "error" not in answer, answer
        return answer

    def items(self, n: int) -> list[Item]:
        out = []
        for _ in range(n):
            self.serial += 1
            host = f"host{self.serial % self.hosts}.example" if self.hosts else "example.org"
            url = f"https://{host}/page/{self.serial * 7919 % 1_000_003}/{self.serial}"
            partition = host if self.hosts else None
            out.append(Item(url.encode().ljust(100, b" "), key=url, partition=partition))
        return out

    def puts(self, total: int, batch: int = 1000) -> tuple[float, float]:
        commands = [Command.put("urls", self.items(batch)) for _ in range(total // batch)]
        return rate(total, lambda: [self.apply(c) for c in commands])

    def cycles(self, n: int, rng: random.Random) -> tuple[float, float]:
        result = b"r" * 2048

        def run() -> None:
            for _ in range(n):
                claim = Command.claim("urls", "worker", rng.randint(1, 10), 60.0)
                ids = [c["id"] for c in self.apply(claim)["items"]]
                put = {"urls": self.items(10)}
                self.apply(Command.complete("worker", ids, append={"results": [result]}, put=put))

        return rate(n, run)


def rate(n: int, run: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def show(label: str, rates: tuple[float, float], unit: str) -> None:
    print(f"{label:<34}{rates[0]:>10,.0f} {unit}/s wall {rates[1]:>10,.0f} {unit}/s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--group", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(1)
    print(f"hosts={args.hosts} group={args.group}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench = Bench(Path(tmp) / "queue.db", args.hosts, args.group)
        bench.apply(Command.create("results", kind="log"))
        show("puts, empty queue", bench.puts(50_000), "items")
        show("claim+complete, empty queue", bench.cycles(5_000, rng), "cycles")
        start = time.perf_counter()
        while bench.serial < args.keys:
            bench.puts(100_000)
        print(f"filled to {bench.serial:,} keys in {time.perf_counter() - start:.0f} s")
        show(f"puts, {bench.serial:,} keys", bench.puts(50_000), "items")
        show(f"claim+complete, {bench.serial:,} keys", bench.cycles(5_000, rng), "cycles")
        bench.state.commit()
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"database {size / 1e6:.0f} MB, peak RSS {rss:.0f} MB")
        bench.state.close()


if __name__ == "__main__":
    main()
