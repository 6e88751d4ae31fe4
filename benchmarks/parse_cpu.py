"""CPU per page of a worker's parsing, link canonicalization, record building and following.

    python benchmarks/parse_cpu.py [--site DIR --port PORT] [--repeat 3] [--limit N]

The pages are those of crawl.py's site: generated into a temporary directory (20,000 pages,
its default seed), or read from DIR (DIR/<host>/p/*.html, a site crawl.py kept, with the port
it was served on, which only goes into the URLs). Each page is read once; then, per repeat,
with the URL memo emptied first (as in a freshly started worker):

- parse: `parse_html` over every page;
- links: every link ref of every page to its canonical URL, as `parse_html` does
  (`link_resolver(page)(ref)`, the same as `canonicalize(urljoin(page, ref))`);
- record: `make_record` and `msgpack.packb` of every parsed page;
- follow: `Worker._follow` on the links of every parsed page (scope, trap guards, frontier
  items), by a worker that has put nothing yet (same-host scope, robots.txt ignored).

Prints the median `time.process_time` per page of each, in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from selectolax.lexbor import LexborHTMLParser

from ww.crawler.fetch import FetchResult
from ww.crawler.parse import Page, parse_html
from ww.crawler.record import make_record
from ww.crawler.settings import CrawlSettings
from ww.crawler.urls import _canonicalize, link_resolver
from ww.crawler.worker import Worker

CONTENT_TYPE = "text/html"


def load(site: Path, port: int, limit: int | None) -> list[tuple[str, bytes]]:
    pages: list[tuple[str, bytes]] = []
    for host_dir in sorted(p for p in site.iterdir() if p.is_dir()):
        for path in sorted((host_dir / "p").glob("*.html")):
            pages.append((f"http://{host_dir.name}:{port}/p/{path.name}", path.read_bytes()))
    pages.sort(key=lambda p: p[0].rsplit("/", 1)[1])  # interleave the hosts, as a crawl does
    return pages[:limit] if limit else pages


def per_page(seconds: float, n: int) -> float:
    return seconds / n * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, help="a site crawl.py kept (default: generate one)")
    p.add_argument("--port", type=int, default=8000, help="the port the site was served on")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    if args.site is None:
        from crawl import generate_site  # benchmarks/crawl.py

        with tempfile.TemporaryDirectory() as tmp:
            generate_site(Path(tmp), 20_000, 0, seed=1)
            pages = load(Path(tmp), args.port, args.limit)
    else:
        pages = load(args.site, args.port, args.limit)
    refs = [
        (url, [n.attributes.get("href") or "" for n in LexborHTMLParser(body).css("a[href]")])
        for url, body in pages
    ]
    n_refs = sum(len(r) for _, r in refs)
    times: dict[str, list[float]] = {"parse": [], "links": [], "record": [], "follow": []}
    parsed: list[tuple[str, bytes, Page]] = []
    for _ in range(args.repeat):
        _canonicalize.cache_clear()
        t0 = time.process_time()
        parsed = [
            (url, body, parse_html(body, url, content_type=CONTENT_TYPE)) for url, body in pages
        ]
        times["parse"].append(time.process_time() - t0)

        _canonicalize.cache_clear()
        t0 = time.process_time()
        for url, page_refs in refs:
            resolve = link_resolver(url)
            for ref in page_refs:
                with contextlib.suppress(ValueError):
                    resolve(ref)
        times["links"].append(time.process_time() - t0)

        t0 = time.process_time()
        for url, body, page in parsed:
            result = FetchResult(
                url=url,
                final_url=url,
                status=200,
                headers=(("content-type", CONTENT_TYPE),),
                content_type=CONTENT_TYPE,
                body=body,
                size=len(body),
                sha256="0" * 64,
            )
            record = make_record(
                url,
                depth=1,
                referrer=url,
                fetched_at=time.time(),
                attempts=0,
                worker="w",
                result=result,
                page=page,
                links=list(page.links),
            )
            msgpack.packb(record)
        times["record"].append(time.process_time() - t0)

        seeds = tuple(sorted({url.split("/p/")[0] + "/" for url, _ in pages}))
        worker = Worker(None, CrawlSettings(seeds=seeds, ignore_robots=True), "w")  # type: ignore[arg-type]
        t0 = time.process_time()
        for url, _, page in parsed:
            items = worker._follow(url, 1, list(page.links))
            worker._remember_put(item.key for item in items)
        times["follow"].append(time.process_time() - t0)
    print(f"{len(pages)} pages, {n_refs} link refs, median of {args.repeat}:", file=sys.stderr)
    for name, ts in times.items():
        print(
            f"  {name:13s} {per_page(statistics.median(ts), len(pages)):.4f} ms a page",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
