"""A plain fetch loop for benchmarks/crawl.py: how fast the web server answers, no crawling.

    python benchmarks/_load.py URLS_FILE --seconds 4 --concurrency 32

`--concurrency` trio tasks share one httpx2 client (keep-alive) and GET URLs from the file in a
shuffled cycle for `--seconds`, reading each body whole. Prints one JSON line:
{"requests": N, "bytes": B, "errors": E, "seconds": S}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import httpx2
import trio


async def run(urls: list[str], seconds: float, concurrency: int) -> dict[str, float]:
    stats = {"requests": 0, "bytes": 0, "errors": 0}
    deadline = time.perf_counter() + seconds
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def loop(client: httpx2.AsyncClient, offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            try:
                resp = await client.get(urls[i % len(urls)])
                stats["requests"] += 1
                stats["bytes"] += len(resp.content)
            except httpx2.HTTPError:
                stats["errors"] += 1
            i += concurrency

    t0 = time.perf_counter()
    async with (
        httpx2.AsyncClient(limits=limits, timeout=10.0) as client,
        trio.open_nursery() as nursery,
    ):
        for k in range(concurrency):
            nursery.start_soon(loop, client, k)
    return {**stats, "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("urls")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    urls = Path(args.urls).read_text().split()
    random.Random(args.seed).shuffle(urls)
    print(json.dumps(trio.run(run, urls, args.seconds, args.concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
