"""The bare crawl loop that benchmarks/crawl.py measures ww-crawl against.

    python benchmarks/_bare_crawl.py SEEDS -o OUT.jsonl [--concurrency 32] [--max-pages N]

httpx2 + trio + selectolax (lexbor), nothing else: an in-memory frontier (a deque) with a
seen-set of URLs (fragment dropped), `--concurrency` fetch tasks sharing one client, links
followed on the seed's host and port only, one JSON object per URL written as it is fetched.
No replication, no retries, no robots, no politeness: what a crawl costs with none of that.
Each record has the fields a crawler's result needs (url, status, content_type, size, sha256,
title, links, text, depth, referrer, elapsed_ms, error), so the parse does the same work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any
from urllib.parse import urldefrag, urljoin, urlsplit

import httpx2
import trio
from selectolax.lexbor import LexborHTMLParser

LINK_TAGS = "a[href], area[href], frame[src], iframe[src]"
MAX_TEXT = 10_000


def netloc(url: str) -> str:
    return urlsplit(url).netloc.lower()


class Crawl:
    def __init__(self, seeds: list[str], out: IO[str], concurrency: int, max_pages: int | None):
        self.frontier: deque[tuple[str, int, str | None]] = deque()
        self.seen: set[str] = set()
        self.scope = {netloc(u) for u in seeds}
        self.out = out
        self.concurrency = concurrency
        self.max_pages = max_pages
        self.started = 0
        self.done = 0
        self.active = 0
        self.wake = trio.Event()
        for url in seeds:
            self.add(urldefrag(url)[0], 0, None)

    def add(self, url: str, depth: int, referrer: str | None) -> None:
        if url not in self.seen:
            self.seen.add(url)
            self.frontier.append((url, depth, referrer))

    def links(self, base: str, tree: LexborHTMLParser) -> list[str]:
        base_tag = tree.css_first("base[href]")
        if base_tag is not None:
            base = urljoin(base, base_tag.attributes.get("href") or "")
        found: list[str] = []
        for node in tree.css(LINK_TAGS):
            ref = node.attributes.get("href") or node.attributes.get("src")
            if not ref:
                continue
            url = urldefrag(urljoin(base, ref.strip()))[0]
            parts = urlsplit(url)
            if parts.scheme in ("http", "https") and parts.netloc.lower() in self.scope:
                found.append(url)
        return list(dict.fromkeys(found))

    def record(
        self, url: str, depth: int, referrer: str | None, resp: httpx2.Response, elapsed: float
    ) -> dict[str, Any]:
        body = resp.content
        ctype = resp.headers.get("content-type", "")
        rec: dict[str, Any] = {
            "url": url,
            "final_url": str(resp.url),
            "status": resp.status_code,
            "error": None,
            "depth": depth,
            "referrer": referrer,
            "elapsed_ms": round(elapsed * 1000, 1),
            "content_type": ctype,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "title": None,
            "links": [],
            "text": None,
        }
        if ctype.startswith("text/html"):
            tree = LexborHTMLParser(body)
            title = tree.css_first("title")
            rec["title"] = title.text(strip=True) if title is not None else None
            rec["links"] = links = self.links(str(resp.url), tree)
            tree.strip_tags(["script", "style", "noscript"])
            body_node = tree.body
            text = body_node.text(separator=" ", strip=True) if body_node is not None else ""
            rec["text"] = text[:MAX_TEXT]
            for link in links:
                self.add(link, depth + 1, url)
        return rec

    async def fetch(
        self, client: httpx2.AsyncClient, url: str, depth: int, referrer: str | None
    ) -> None:
        t0 = time.perf_counter()
        try:
            resp = await client.get(url)
        except httpx2.HTTPError as exc:
            rec: dict[str, Any] = {
                "url": url,
                "status": None,
                "error": repr(exc),
                "depth": depth,
                "referrer": referrer,
            }
        else:
            rec = self.record(url, depth, referrer, resp, time.perf_counter() - t0)
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.done += 1

    async def worker(self, client: httpx2.AsyncClient) -> None:
        while True:
            if self.max_pages is not None and self.started >= self.max_pages:
                return
            if not self.frontier:
                if self.active == 0:
                    self.wake.set()  # nothing queued, nothing in flight: the crawl is over
                    return
                await self.wake.wait()
                continue
            url, depth, referrer = self.frontier.popleft()
            self.started += 1
            self.active += 1
            try:
                await self.fetch(client, url, depth, referrer)
            finally:
                self.active -= 1
                # Links may have been added (or the crawl may be over): wake the idle workers.
                self.wake.set()
                self.wake = trio.Event()

    async def run(self) -> None:
        limits = httpx2.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        async with (
            httpx2.AsyncClient(limits=limits, timeout=30.0) as client,
            trio.open_nursery() as nursery,
        ):
            for _ in range(self.concurrency):
                nursery.start_soon(self.worker, client)


def read_seeds(path: str) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("seeds")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-pages", type=int, default=None)
    args = p.parse_args()
    with open(args.output, "w", buffering=1 << 20) as out:
        crawl = Crawl(read_seeds(args.seeds), out, args.concurrency, args.max_pages)
        t0 = time.perf_counter()
        trio.run(crawl.run)
        elapsed = time.perf_counter() - t0
    print(
        f"bare: {crawl.done} pages in {elapsed:.1f} s, {len(crawl.seen)} URLs seen", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
