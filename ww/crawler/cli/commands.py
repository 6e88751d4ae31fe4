"""`ww-crawl status`, `ww-crawl export` and `ww-crawl demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from .datadir import CRAWL_JSON, CrawlInfo
from .errors import CrawlError
from .results import latest_results
from .run import run_crawl

__all__ = ["DEMO_HOSTS", "cmd_demo", "cmd_export", "cmd_status"]


async def cmd_status(args: argparse.Namespace) -> int:
    from ww.crawler.cluster import connect
    from ww.crawler.worker import FRONTIER, RESULTS
    from ww.queue.client import QueueClient

    data_dir = Path(args.data_dir)
    if args.cluster is not None:
        addresses = [args.cluster]
    else:
        info_path = data_dir / CRAWL_JSON
        if not info_path.exists():
            raise CrawlError(f"{data_dir} holds no crawl; pass --data-dir or --cluster HOST:PORT")
        addresses = CrawlInfo.load(info_path).hosts
        if not addresses:
            raise CrawlError(f"the crawl in {data_dir} is not running")
    failure = ""
    for address in addresses:  # the first host that answers
        try:
            async with connect(address, Path(args.key) if args.key else None) as host:
                client = await QueueClient.connect(host, timeout=10)
                try:
                    frontier = await client.stats(FRONTIER)
                    results = await client.stats(RESULTS)
                    status = await client.status()
                finally:
                    await client.aclose()
            break
        except Exception as exc:
            failure = " ".join(str(exc).split())
    else:
        raise CrawlError(f"no host of the crawl answers; the last said: {failure}")
    print(f"results: {results.get('appended', 0)}")
    for k in ("ready", "leased", "delayed", "done", "dead", "seen"):
        print(f"frontier {k}: {frontier.get(k, 0)}")
    print(
        f"raft: leader {status.get('leader')}, term {status.get('term')}, "
        f"commit {status.get('commit')}"
    )
    return 0


async def cmd_export(args: argparse.Namespace) -> int:
    from ww.crawler.cluster import local_cluster, start_queue
    from ww.crawler.export import Exporter
    from ww.crawler.worker import RESULTS

    data_dir = Path(args.data_dir)
    if not (data_dir / CRAWL_JSON).exists():
        raise CrawlError(f"{data_dir} holds no crawl; pass the --data-dir of one")
    out = Path(args.output)
    out_partial = out.with_name(f".{out.name}.partial")
    state = out.with_name(f".{out.name}.export-state")
    async with local_cluster(data_dir) as cluster:
        client = await start_queue(cluster)
        try:
            exporter = Exporter(out_partial, state, warc=Path(args.warc) if args.warc else None)
            try:
                appended = int((await client.stats(RESULTS)).get("appended", 0))
                # Each URL once, with its latest result (--retry-failed adds later ones).
                latest = {o for o, _ in (await latest_results(client)).values()}
                exporter.skip = set(range(appended)) - latest
                await exporter.catch_up(client, appended)
            finally:
                exporter.close()
        finally:
            await client.aclose()
    out_partial.replace(out)
    state.unlink(missing_ok=True)
    print(f"ww-crawl export: {exporter.written} results in {out}", file=sys.stderr)
    return 0


DEMO_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


async def cmd_demo(args: argparse.Namespace) -> int:
    from ww.crawler.sites import demo_site, serve_site

    if args.resume:
        raise CrawlError(
            "the demo cannot be resumed (its site gets new ports each time); "
            "run `ww-crawl demo --fresh` to crawl it again"
        )
    site = demo_site(hosts=DEMO_HOSTS)
    async with trio.open_nursery() as nursery:
        for host in DEMO_HOSTS:
            await nursery.start(serve_site, site, host)
        seeds = [site.url(DEMO_HOSTS[0], "/")]
        print(
            f"ww-crawl demo: a site of {len(site.links)} pages on {len(DEMO_HOSTS)} hosts, "
            f"from {seeds[0]}",
            file=sys.stderr,
        )
        if args.scope is None:
            args.scope = "any"
        if args.output is None:
            args.output = "demo-results.jsonl"
        code = await run_crawl(args, "(demo)", seeds)
        nursery.cancel_scope.cancel()
    return code
