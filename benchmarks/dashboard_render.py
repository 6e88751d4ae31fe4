"""How long one frame of the crawl dashboard takes: building the view from a meter (3 workers)
and the queue's stats (10 hosts), rendering it, and drawing it on a 160-column terminal.

    python benchmarks/dashboard_render.py [--frames N] [--width W]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from rich.console import Console

from ww.crawler.dashboard import DashboardState, render
from ww.crawler.progress import CrawlMeter

NOW = 1_700_000_000.0


def state() -> DashboardState:
    meter = CrawlMeter()
    peers = [f"{c * 10}{'0' * 16}" for c in "abc"]
    for step in range(240):  # a minute of stats, 4 messages a second per worker
        t = NOW - 60 + step * 0.25
        for i, peer in enumerate(peers):
            meter.feed(
                {
                    "worker": f"worker-{i}",
                    "host": peer,
                    "in_flight": 4,
                    "pages": step * (i + 1),
                    "errors": step // 20,
                    "retries": step // 10,
                    "bytes": step * 40_000,
                    "status": {"200": step * (i + 1), "404": step // 20},
                    "time": t,
                    "last_error": f"timed out: http://127.0.0.{i + 2}/p{step // 20}",
                },
                t,
            )
    s = DashboardState(max_pages=10_000, started=NOW - 60, meter=meter, clock=lambda: NOW)
    s.frontier = {
        "ready": 2000,
        "leased": 12,
        "delayed": 30,
        "dead": 1,
        "seen": 4000,
        "partitions": [[f"127.0.0.{i + 2}:8000", 200 - i, 2, NOW + 0.5] for i in range(10)],
    }
    s.results = {"appended": 1500}
    s.group = {
        "leader": peers[0],
        "term": 3,
        "commit": 5000,
        "members": [{"peer": p, "applied": 5000 - i} for i, p in enumerate(peers)],
    }
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--width", type=int, default=160)
    args = parser.parse_args()
    s = state()
    console = Console(file=io.StringIO(), width=args.width, force_terminal=True)
    build, draw = [], []
    for _ in range(args.frames):
        t0 = time.perf_counter()
        view = s.view()
        t1 = time.perf_counter()
        console.print(render(view))
        t2 = time.perf_counter()
        build.append(t1 - t0)
        draw.append(t2 - t1)
    b, d = statistics.median(build) * 1e3, statistics.median(draw) * 1e3
    print(
        f"view {b:.3f} ms, render + draw {d:.3f} ms, frame {b + d:.3f} ms (median of {args.frames})"
    )
    print(f"at 4 frames/s: {(b + d) * 4 / 10:.2f}% of one core")


if __name__ == "__main__":
    main()
