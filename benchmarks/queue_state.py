"""The queue state machine alone, in process: how fast entries apply, how big a seen-set gets.

    PYTHONPATH=$PWD python benchmarks/queue_state.py [--keys 1000000] [--dir /tmp]

Measures (one SQLite file, WAL, synchronous=NORMAL, as a replica runs it):
- puts of 100-byte items with unique keys, in batches of 1,000 (items/s applied);
- claim + complete cycles: claim 1..10 items, complete them with a 2 KB result appended to a
  log topic and 10 new items put (cycles/s);
- the same two after the seen-set holds --keys keys, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
from pathlib import Path

from ww.queue.commands import Command, Item
from ww.queue.state import QueueState


class Bench:
    def __init__(self, path: Path) -> None:
        self.state = QueueState(path)
        self.index = 0
        self.clock = 1_000_000.0
        self.serial = 0

    def apply(self, command: Command) -> dict:
        self.index += 1
        self.clock += 0.0001
        answer = self.state.apply(
            self.index,
            command.encode(time=self.clock, client="bench", seq=self.index, ack=self.index),
        )
        assert "error" not in answer, answer
        return answer

    def items(self, n: int, hosts: int = 1000) -> list[Item]:
        out = []
        for _ in range(n):
            self.serial += 1
            url = f"https://host{self.serial % hosts}.example/page/{self.serial * 7919}"
            out.append(
                Item(url.encode().ljust(100, b" "), key=url, partition=f"h{self.serial % hosts}")
            )
        return out

    def puts(self, total: int, batch: int = 1000) -> float:
        commands = [Command.put("urls", self.items(batch)) for _ in range(total // batch)]
        start = time.perf_counter()
        for c in commands:
            self.apply(c)
        return total / (time.perf_counter() - start)

    def cycles(self, n: int, rng: random.Random) -> float:
        result = b"r" * 2048
        start = time.perf_counter()
        for _ in range(n):
            claimed = self.apply(Command.claim("urls", "worker", rng.randint(1, 10), 60.0))["items"]
            ids = [c["id"] for c in claimed]
            self.apply(
                Command.complete(
                    "worker", ids, append={"results": [result]}, put={"urls": self.items(10)}
                )
            )
        return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench = Bench(Path(tmp) / "queue.db")
        bench.apply(Command.create("results", kind="log"))
        print(f"puts, empty queue:      {bench.puts(50_000):>10,.0f} items/s")
        print(f"claim+complete, empty:  {bench.cycles(5_000, rng):>10,.0f} cycles/s")
        t0 = time.perf_counter()
        while bench.serial < args.keys:
            bench.puts(100_000)
        print(f"filled to {bench.serial:,} keys in {time.perf_counter() - t0:.1f} s")
        print(f"puts, {bench.serial:,} keys: {bench.puts(50_000):>10,.0f} items/s")
        print(f"claim+complete, full:   {bench.cycles(5_000, rng):>10,.0f} cycles/s")
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"database {size / 1e6:.0f} MB, peak RSS {rss:.0f} MB")
        bench.state.close()


if __name__ == "__main__":
    main()
