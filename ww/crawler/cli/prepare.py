"""Make the queue ready for a run of a crawl: its topics, settings and seeds; on a resume, the
settings the crawl keeps, each known host's limits, and (--retry-failed) its failures put back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgpack

from ww.crawler.settings import RESUMABLE, CrawlSettings, claim_interval

from .datadir import CRAWL_JSON, EXPORT_STATE, CrawlInfo
from .errors import CrawlError
from .results import is_failure, latest_results

log = logging.getLogger(__package__)

__all__ = ["limit_known_hosts", "resumed_settings", "retry_failed", "set_up"]


async def set_up(client: Any, s: CrawlSettings, *, new: bool, cluster: str | None) -> None:
    """Create the topics, record the settings and put the seeds. Every step may be done
    again (a resume does, in case the first run stopped half way through them). `cluster`:
    the address given with --cluster, for the error when the group holds a crawl already."""
    from ww.crawler.worker import CONFIG, FRONTIER, RESULTS, ROBOTS, frontier_item, robots_item

    c = client
    if new and FRONTIER in await c.topics():
        # Only on an existing cluster: an embedded one is new with its data dir.
        raise CrawlError(
            f"the Raft group at {cluster} already holds a crawl; continue it with "
            "--resume (and the --data-dir it was started with)"
        )
    await c.create(FRONTIER, kind="work", max_attempts=s.max_attempts)
    await c.create(RESULTS, kind="log")
    await c.create(ROBOTS, kind="log")
    await c.create(CONFIG, kind="log")
    if (await c.stats(CONFIG)).get("appended", 0) == 0:
        await c.complete("ww-crawl", [], append={CONFIG: [msgpack.packb(s.to_dict())]})
    # Until its robots.txt is known a host gets one leased item at a time: its robots item,
    # put first, is claimed before its pages (see ww.crawler.worker).
    first_k = s.per_host_concurrency if s.ignore_robots else 1
    await c.limit(FRONTIER, None, first_k, claim_interval(s.delay))
    if not new and not s.ignore_robots:
        await limit_known_hosts(c, s)
    items: list[Any] = []
    if not s.ignore_robots:
        hosts: dict[str, str] = {}
        from ww.crawler.urls import host_key

        for url in s.seeds:
            hosts.setdefault(host_key(url), url)
        items += [robots_item(url) for url in hosts.values()]
    items += [frontier_item(url, 0, None) for url in s.seeds]
    result = await c.put(FRONTIER, items)
    if new:
        log.info("put %d seeds", len(s.seeds))
    elif result.added:
        log.info("put %d seeds again that were missing", result.added)


async def limit_known_hosts(client: Any, s: CrawlSettings) -> None:
    """Set each known host's limits again: a resume may change the concurrency or delay."""
    from ww.crawler.robots import RobotsPolicy, host_delay
    from ww.crawler.worker import FRONTIER, ROBOTS

    policies: dict[str, RobotsPolicy] = {}
    offset = 0
    while records := await client.read(ROBOTS, offset, 500):
        for o, data in records:
            offset = o + 1
            try:
                record = msgpack.unpackb(data)
                if record.get("final", True):
                    policies[str(record["host"])] = RobotsPolicy.from_dict(record["policy"])
            except Exception:
                continue
    for host, policy in policies.items():
        delay = host_delay(policy, s.user_agent, minimum=s.delay)
        await client.limit(FRONTIER, host, s.per_host_concurrency, claim_interval(delay))


async def resumed_settings(
    client: Any, settings: CrawlSettings, changes: dict[str, Any]
) -> CrawlSettings:
    """The settings the crawl was started with (`settings` when the queue holds none), with
    the resumable ones among `changes` (the setting flags given) applied."""
    from ww.crawler.worker import CONFIG

    records = await client.read(CONFIG, 0, 1)
    stored = CrawlSettings.from_dict(msgpack.unpackb(records[0][1])) if records else settings
    ignored = sorted(
        k for k, v in changes.items() if k not in RESUMABLE and getattr(stored, k) != v
    )
    if ignored:
        log.warning(
            "a resumed crawl keeps its %s; ignoring the flags given for them",
            ", ".join(n.replace("_", "-") for n in ignored),
        )
    return stored.resumed(changes)


async def retry_failed(client: Any, info: CrawlInfo, data_dir: Path) -> None:
    """Put the URLs whose latest result is a failure back into the frontier, under a new
    key (the seen-set remembers the old one), and take their old lines out of the JSON
    Lines file, so that each URL is there once, with its latest result. The plan is saved
    in crawl.json first, so a crash half way is finished by the next --resume."""
    from ww.crawler.export import decode_result, drop_urls
    from ww.crawler.worker import FRONTIER, retry_item

    if info.pending_retry is None:
        latest = await latest_results(client)
        failed = sorted(u for u, (_, d) in latest.items() if is_failure(decode_result(d)))
        info.retry_generation += 1
        info.pending_retry = failed
        info.save(data_dir / CRAWL_JSON)
    urls = info.pending_retry
    drop_urls(Path(info.output), data_dir / EXPORT_STATE, set(urls))
    latest = await latest_results(client)
    items = []
    for url in urls:
        record = decode_result(latest[url][1]) if url in latest else None
        depth = int(record.get("depth") or 0) if record else 0
        referrer = record.get("referrer") if record else None
        items.append(retry_item(url, depth, referrer, info.retry_generation))
    if items:
        await client.put(FRONTIER, items)
    info.pending_retry = None
    info.save(data_dir / CRAWL_JSON)
    log.info("put %d failed URLs back into the queue", len(items))
