"""`ww-crawl`: crawl from a seeds file on an embedded local cluster (or an existing one).

    ww-crawl SEEDS [options]            crawl; results stream into results.jsonl
    ww-crawl demo [options]             crawl a built-in offline site of three hosts
    ww-crawl status [--data-dir DIR]    the state of a running crawl, from another terminal
    ww-crawl export DATA_DIR -o FILE    write a crawl's results again

Expected failures raise `CrawlError` (or another error whose message is one line); `main` prints
it as one line and returns 1 (2 for usage errors). Ctrl-C stops a crawl cleanly: the workers
finish or give back what they hold, the export is flushed; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import trio

from .settings import (
    DEFAULT_USER_AGENT,
    RESUMABLE,
    CrawlSettings,
    SettingsError,
    claim_interval,
)

log = logging.getLogger("ww.crawler.cli")

__all__ = ["CrawlError", "build_parser", "main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_DATA_DIR = "ww-crawl-data"
DEFAULT_OUTPUT = "results.jsonl"
CRAWL_JSON = "crawl.json"
EXPORT_STATE = "export.json"
WATCH_INTERVAL = 0.25
PROGRESS_INTERVAL = 3.0
WORKER_STOP_TIMEOUT = 20.0
COMMANDS = ("status", "export", "demo")


class CrawlError(Exception):
    """An expected failure; the message is one line saying what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# Arguments


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


SIZE = re.compile(r"([0-9]+)([KMG]?)(?:i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size, e.g. 512K, 10M or 1G")
    return int(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match[2].lower()]


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def positive(text: str) -> int:
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {exc}") from None
    return text


# Flags that make the settings; each maps to the CrawlSettings field of the same name. Their
# argparse default is None, so a resume knows which flags were given.
SETTING_FLAGS = {
    "scope": "scope",
    "allow": "allow",
    "deny": "deny",
    "max_depth": "max_depth",
    "max_pages": "max_pages",
    "ignore_robots": "ignore_robots",
    "user_agent": "user_agent",
    "per_host_concurrency": "per_host_concurrency",
    "delay": "delay",
    "retries": "retries",
    "max_bytes": "max_bytes",
    "timeout": "timeout",
    "max_text": "max_text",
    "concurrency": "concurrency",
}


def add_crawl_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to crawl")
    g.add_argument(
        "--scope",
        choices=("same-host", "same-domain", "any"),
        help="which hosts links may lead to, relative to the seeds (default: same-host)",
    )
    g.add_argument(
        "--allow",
        type=regex,
        action="append",
        metavar="REGEX",
        help="crawl only URLs matching one of these (repeatable)",
    )
    g.add_argument(
        "--deny",
        type=regex,
        action="append",
        metavar="REGEX",
        help="never crawl URLs matching this (repeatable)",
    )
    g.add_argument("--max-depth", type=count, metavar="N", help="link hops from a seed")
    g.add_argument("--max-pages", type=positive, metavar="N", help="stop after N results")
    g = p.add_argument_group("how to crawl")
    g.add_argument(
        "--ignore-robots", action="store_true", default=None, help="do not fetch or obey robots.txt"
    )
    g.add_argument(
        "--user-agent", metavar="TEXT", help=f"User-Agent header (default: {DEFAULT_USER_AGENT})"
    )
    g.add_argument(
        "--per-host-concurrency",
        type=positive,
        metavar="N",
        help="requests in flight per host, across the whole cluster (default: 2)",
    )
    g.add_argument(
        "--delay",
        type=seconds,
        metavar="SECONDS",
        help="least time between two requests to a host; Crawl-delay raises it (default: 0)",
    )
    g.add_argument(
        "--retries",
        type=count,
        metavar="N",
        help="tries after the first for connect errors, timeouts, 5xx, 429 (default: 3)",
    )
    g.add_argument(
        "--max-bytes",
        type=parse_size,
        metavar="SIZE",
        help="read at most this much of a body (default: 10M)",
    )
    g.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="total time for one request, redirects and body included (default: 30)",
    )
    g.add_argument(
        "--max-text",
        type=count,
        metavar="CHARS",
        help="visible text kept per page (default: 10000)",
    )
    g.add_argument(
        "--concurrency",
        type=positive,
        metavar="N",
        help="fetches in flight per worker (default: 16)",
    )
    g.add_argument(
        "--handler",
        metavar="ROM",
        help="a ROM (file or source dir) whose `async def handle(page)` runs on every page",
    )
    g = p.add_argument_group("output and state")
    g.add_argument(
        "-o", "--output", metavar="FILE", help=f"JSON Lines results (default: {DEFAULT_OUTPUT})"
    )
    g.add_argument("--warc", metavar="FILE", help="also write WARC request/response records")
    g.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"the crawl's hosts, queue and export state (default: ./{DEFAULT_DATA_DIR})",
    )
    g.add_argument("--resume", action="store_true", help="continue the crawl in DATA_DIR")
    g.add_argument(
        "--fresh",
        action="store_true",
        help="start over: remove the crawl in DATA_DIR and its output first",
    )
    g.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: crawl again the URLs whose result was an error",
    )
    g.add_argument(
        "--cluster",
        metavar="HOST:PORT",
        help="run on an existing ww cluster instead of starting one",
    )
    g.add_argument("--key", metavar="FILE", help="cluster key for --cluster")
    g.add_argument(
        "--workers", type=positive, default=1, metavar="N", help="worker ROMs per host (default: 1)"
    )
    g.add_argument(
        "--no-dashboard",
        action="store_true",
        help="a progress line every few seconds instead of the live dashboard",
    )
    g.add_argument("-v", "--verbose", action="count", default=0, help="log more")


def build_parser() -> Parser:
    p = Parser(
        prog="ww-crawl",
        description="Crawl the web from SEEDS (one URL a line) on a replicated queue.",
        epilog="Other commands: `ww-crawl demo`, `ww-crawl status`, `ww-crawl export DATA_DIR "
        "-o FILE` (each with --help).",
    )
    p.add_argument("seeds", metavar="SEEDS", help="a file with one URL a line (# comments)")
    add_crawl_options(p)
    return p


def build_demo_parser() -> Parser:
    p = Parser(prog="ww-crawl demo", description="Crawl a built-in offline site of three hosts.")
    add_crawl_options(p)
    p.set_defaults(data_dir="ww-crawl-demo")
    return p


def build_status_parser() -> Parser:
    p = Parser(prog="ww-crawl status", description="Show the state of a crawl.")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR")
    p.add_argument("--cluster", metavar="HOST:PORT")
    p.add_argument("--key", metavar="FILE")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def build_export_parser() -> Parser:
    p = Parser(prog="ww-crawl export", description="Write a crawl's results as JSON Lines.")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--warc", metavar="FILE", help="also write WARC (when the crawl kept bodies)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


# ---------------------------------------------------------------------------------------------
# The data dir


@dataclass(slots=True)
class CrawlInfo:
    """crawl.json: what the data dir holds."""

    seeds_file: str
    output: str
    warc: str | None
    settings: dict[str, Any]
    started: str
    hosts: list[str]
    handler: str | None = None
    retry_generation: int = 0
    pending_retry: list[str] | None = None  # URLs being put back by --retry-failed

    @classmethod
    def load(cls, path: Path) -> CrawlInfo:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise CrawlError(f"cannot read {path}: {exc}; start over with --fresh") from None

    def save(self, path: Path) -> None:
        fresh = path.with_name(path.name + ".new")
        fresh.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        fresh.replace(path)


def settings_from_args(args: argparse.Namespace, seeds: Sequence[str]) -> CrawlSettings:
    values: dict[str, Any] = {"seeds": tuple(seeds)}
    for flag, name in SETTING_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    values["handler"] = bool(getattr(args, "handler", None))
    values["warc"] = bool(getattr(args, "warc", None))
    try:
        return CrawlSettings(**values)
    except SettingsError as exc:
        raise CrawlError(str(exc)) from None


def given_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The setting flags given on this command line (for a resume)."""
    changes: dict[str, Any] = {}
    for flag, name in SETTING_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            changes[name] = tuple(value) if isinstance(value, list) else value
    return changes


def check_data_dir(data_dir: Path, args: argparse.Namespace, what: str) -> CrawlInfo | None:
    """The earlier crawl in `data_dir` when resuming; None for a new crawl. Refuses to reuse a
    data dir silently."""
    info_path = data_dir / CRAWL_JSON
    if args.resume and args.fresh:
        raise CrawlError("--resume and --fresh contradict each other; pass one")
    if args.retry_failed and not args.resume:
        raise CrawlError("--retry-failed goes with --resume")
    earlier = info_path.exists() or (data_dir / "hosts").exists()
    if args.resume:
        if not info_path.exists():
            raise CrawlError(f"{data_dir} holds no crawl to resume; start one without --resume")
        return CrawlInfo.load(info_path)
    if earlier and not args.fresh:
        raise CrawlError(
            f"{data_dir} holds an earlier crawl; pass --resume to continue it or --fresh to "
            "start over"
        )
    if args.fresh and data_dir.exists():
        from .cluster import stop_stale_hosts

        stop_stale_hosts(data_dir)  # refuses when a ww-crawl is running there
        if info_path.exists():
            old = CrawlInfo.load(info_path)
            for name in (old.output, old.warc):
                if name:
                    Path(name).unlink(missing_ok=True)
        shutil.rmtree(data_dir)
    return None


# ---------------------------------------------------------------------------------------------
# The crawl


async def run_crawl(args: argparse.Namespace, seeds_file: str, seeds: list[str]) -> int:
    from .cluster import local_cluster, remote_cluster

    data_dir = Path(args.data_dir)
    info = check_data_dir(data_dir, args, seeds_file)
    if info is None:
        settings = settings_from_args(args, seeds)
        output = str(Path(args.output or DEFAULT_OUTPUT).resolve())
        warc = str(Path(args.warc).resolve()) if args.warc else None
        handler = str(Path(args.handler).resolve()) if args.handler else None
        data_dir.mkdir(parents=True, exist_ok=True)
        info = CrawlInfo(
            seeds_file,
            output,
            warc,
            settings.to_dict(),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            [],
            handler,
        )
        info.save(data_dir / CRAWL_JSON)
        resume = False
    else:
        resume = True
        if args.output and str(Path(args.output).resolve()) != info.output:
            log.warning(
                "resuming into %s, where this crawl writes (not %s)", info.output, args.output
            )
        settings = CrawlSettings.from_dict(info.settings)
        if args.handler:
            info.handler = str(Path(args.handler).resolve())
    handler_rom: bytes | None = None
    if info.handler:
        from .handler import HandlerError, read_handler_rom

        try:
            handler_rom = read_handler_rom(Path(info.handler))
        except HandlerError as exc:
            raise CrawlError(str(exc)) from None

    cluster_cm = (
        remote_cluster(args.cluster, Path(args.key) if args.key else None)
        if args.cluster
        else local_cluster(data_dir)
    )
    async with cluster_cm as cluster:
        info.hosts = [h.address for h in cluster.processes] or [args.cluster]
        info.save(data_dir / CRAWL_JSON)
        crawl = Crawl(args, cluster, settings, info, data_dir, handler_rom)
        _CURRENT_CRAWL.append(crawl)
        try:
            return await crawl.run(resume)
        finally:
            _CURRENT_CRAWL.remove(crawl)


class Crawl:
    """One run of a crawl on a cluster: set up the queue, spawn the workers, export, watch."""

    def __init__(
        self,
        args: argparse.Namespace,
        cluster: Any,
        settings: CrawlSettings,
        info: CrawlInfo,
        data_dir: Path,
        handler_rom: bytes | None,
    ) -> None:
        self.args = args
        self.cluster = cluster
        self.settings = settings
        self.info = info
        self.data_dir = data_dir
        self.handler_rom = handler_rom
        self.client: Any = None
        self.workers: list[Any] = []
        self.stopping = trio.Event()
        self.dashboard: Any = None
        self.started = time.monotonic()

    async def run(self, resume: bool) -> int:
        from .cluster import connect_queue, spawn_workers, start_queue
        from .export import Exporter
        from .worker import CONTROL_TOPIC, RESULTS

        self.client = await start_queue(self.cluster, resume=resume)
        try:
            if resume:
                await self._resume_settings()
            await self._set_up(new=not resume)
            exporter = Exporter(
                Path(self.info.output),
                self.data_dir / EXPORT_STATE,
                warc=Path(self.info.warc) if self.info.warc else None,
                resume=resume,
                limit=self.settings.max_pages,
            )
            try:
                handler_path = await self._share_handler()
                self.workers = await spawn_workers(
                    self.cluster,
                    self.settings.encode(),
                    per_host=self.args.workers,
                    handler_path=handler_path,
                )
                log.info(
                    "crawling with %d workers on %d hosts; results go to %s",
                    len(self.workers),
                    len(self.cluster.peers),
                    self.info.output,
                )
                while not await self._crawl(exporter):
                    # The host ww-crawl talked through is gone: go on through another.
                    await self.client.aclose()
                    await self.cluster.reconnect()
                    self.client = await connect_queue(self.cluster)
                if self.stopping.is_set():
                    log.info("stopping the workers")
                else:
                    log.info("the crawl is done; stopping the workers")
                # Stop the workers, then export everything they completed.
                pubsub = await self.cluster.host.pubsub()
                control = await pubsub.join(CONTROL_TOPIC)
                with trio.move_on_after(WORKER_STOP_TIMEOUT):
                    await self._workers_gone(control)
                appended = int((await self.client.stats(RESULTS)).get("appended", 0))
                await exporter.catch_up(self.client, appended)
            finally:
                exporter.close()
            await self._summary(exporter)
        finally:
            # Workers still running (a second Ctrl-C, an error) are killed; the embedded
            # hosts would stop them anyway, the hosts of --cluster would not.
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                if self.args.cluster:
                    async with trio.open_nursery() as nursery:
                        for process in self.workers:
                            nursery.start_soon(_kill_quietly, process)
                await self.client.aclose()
        return EXIT_INTERRUPTED if self.stopping.is_set() else 0

    async def _crawl(self, exporter: Any) -> bool:
        """Export, show and watch until the crawl is done or asked to stop (True), or until
        the connection to the host ww-crawl talks through is lost (False)."""
        lost = self.cluster.lost
        try:
            async with trio.open_nursery() as nursery:

                async def cancel_when_lost() -> None:
                    await lost.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(cancel_when_lost)
                nursery.start_soon(exporter.follow, self.client)
                nursery.start_soon(self._show)
                await self._watch()
                nursery.cancel_scope.cancel()
        except Exception:
            # An error that comes of the lost connection may come just before the news.
            with trio.move_on_after(1):
                await lost.wait()
            if not lost.is_set():
                raise
        return not lost.is_set()

    async def _workers_gone(self, control: Any) -> None:
        """Tell the workers to stop until none hangs under /<peer>/ww-crawl on any host that
        answers. The message is sent again while they run: a worker still starting up (a
        short crawl can end before all have) has not joined the topic the first one went to."""
        from .cluster import WORKERS

        while True:
            await control.publish(b"stop")
            running = 0
            root = await self.cluster.host.root()
            for peer in self.cluster.peers:
                try:
                    running += len(await (await root.walk(f"/{peer}/{WORKERS}")).ls())
                except Exception:  # its host is gone, and its workers with it
                    continue
            if not running:
                return
            await trio.sleep(0.1)

    async def _set_up(self, *, new: bool) -> None:
        """Create the topics, record the settings and put the seeds. Every step may be done
        again (a resume does, in case the first run stopped half way through them)."""
        from .worker import CONFIG, FRONTIER, RESULTS, ROBOTS, frontier_item, robots_item

        s = self.settings
        c = self.client
        if new and FRONTIER in await c.topics():
            # Only on an existing cluster: an embedded one is new with its data dir.
            raise CrawlError(
                f"the Raft group at {self.args.cluster} already holds a crawl; continue it with "
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
            await self._limit_known_hosts()
        items: list[Any] = []
        if not s.ignore_robots:
            hosts: dict[str, str] = {}
            from .urls import host_key

            for url in s.seeds:
                hosts.setdefault(host_key(url), url)
            items += [robots_item(url) for url in hosts.values()]
        items += [frontier_item(url, 0, None) for url in s.seeds]
        result = await c.put(FRONTIER, items)
        if new:
            log.info("put %d seeds", len(s.seeds))
        elif result.added:
            log.info("put %d seeds again that were missing", result.added)

    async def _limit_known_hosts(self) -> None:
        """Set each known host's limits again: a resume may change the concurrency or delay."""
        from .robots import RobotsPolicy, host_delay
        from .worker import FRONTIER, ROBOTS

        s = self.settings
        policies: dict[str, RobotsPolicy] = {}
        offset = 0
        while records := await self.client.read(ROBOTS, offset, 500):
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
            await self.client.limit(FRONTIER, host, s.per_host_concurrency, claim_interval(delay))

    async def _resume_settings(self) -> None:
        from .worker import CONFIG

        records = await self.client.read(CONFIG, 0, 1)
        if records:
            stored = CrawlSettings.from_dict(msgpack.unpackb(records[0][1]))
        else:
            stored = self.settings
        changes = given_changes(self.args)
        ignored = sorted(
            k for k, v in changes.items() if k not in RESUMABLE and getattr(stored, k) != v
        )
        if ignored:
            log.warning(
                "a resumed crawl keeps its %s; ignoring the flags given for them",
                ", ".join(n.replace("_", "-") for n in ignored),
            )
        self.settings = stored.resumed(changes)
        if self.args.retry_failed:
            await self._retry_failed()

    async def _retry_failed(self) -> None:
        """Put the URLs whose latest result is a failure back into the frontier, under a new
        key (the seen-set remembers the old one), and take their old lines out of the JSON
        Lines file, so that each URL is there once, with its latest result. The plan is saved
        in crawl.json first, so a crash half way is finished by the next --resume."""
        from .export import decode_result, drop_urls
        from .worker import FRONTIER, retry_item

        if self.info.pending_retry is None:
            latest = await latest_results(self.client)
            failed = sorted(u for u, (_, d) in latest.items() if is_failure(decode_result(d)))
            self.info.retry_generation += 1
            self.info.pending_retry = failed
            self.info.save(self.data_dir / CRAWL_JSON)
        urls = self.info.pending_retry
        drop_urls(Path(self.info.output), self.data_dir / EXPORT_STATE, set(urls))
        latest = await latest_results(self.client)
        items = []
        for url in urls:
            record = decode_result(latest[url][1]) if url in latest else None
            depth = int(record.get("depth") or 0) if record else 0
            referrer = record.get("referrer") if record else None
            items.append(retry_item(url, depth, referrer, self.info.retry_generation))
        if items:
            await self.client.put(FRONTIER, items)
        self.info.pending_retry = None
        self.info.save(self.data_dir / CRAWL_JSON)
        log.info("put %d failed URLs back into the queue", len(items))

    async def _share_handler(self) -> str | None:
        if self.handler_rom is None:
            return None
        path = f"/{self.cluster.peers[0]}/ww-crawl-handler"
        root = await self.cluster.host.root()
        await (await root.walk(path)).store(self.handler_rom)
        return path

    async def _watch(self) -> None:
        """Return when the crawl is done: nothing ready, leased or delayed in the frontier, or
        --max-pages results, or a stop was asked for."""
        from .worker import FRONTIER, RESULTS

        s = self.settings
        while not self.stopping.is_set():
            frontier = await self.client.stats(FRONTIER)
            results = await self.client.stats(RESULTS)
            pending = sum(int(frontier.get(k, 0)) for k in ("ready", "leased", "delayed"))
            done = int(results.get("appended", 0))
            if pending == 0 or (s.max_pages is not None and done >= s.max_pages):
                return
            with trio.move_on_after(WATCH_INTERVAL):
                await self.stopping.wait()

    async def _show(self) -> None:
        """The live dashboard on a terminal (a progress line otherwise, or with
        --no-dashboard), fed by the queue's stats and the workers' stats messages."""
        from rich.console import Console

        from .dashboard import DashboardState, follow_stats, poll_queue, run_dashboard
        from .worker import STATS_TOPIC

        state = self.dashboard = DashboardState(
            max_pages=self.settings.max_pages, started=time.time()
        )
        topic = await (await self.cluster.host.pubsub()).join(STATS_TOPIC)
        console = Console(stderr=True)
        async with topic.stream("subscribe") as messages, trio.open_nursery() as nursery:
            nursery.start_soon(poll_queue, self.client, state)
            nursery.start_soon(follow_stats, messages, state.meter)
            nursery.start_soon(self._follow_delays, state.delays)
            nursery.start_soon(
                partial(
                    run_dashboard,
                    state.view,
                    console=console,
                    live=False if self.args.no_dashboard else None,
                    line_interval=PROGRESS_INTERVAL,
                    summary_on_exit=False,
                )
            )

    async def _follow_delays(self, delays: dict[str, float]) -> None:
        """Keep `delays` (host -> seconds between its requests) from the robots policies."""
        from .robots import RobotsPolicy, host_delay
        from .worker import ROBOTS

        offset = 0
        while True:
            try:
                records = await self.client.read(ROBOTS, offset, 500)
            except Exception as exc:  # the dashboard can wait for the group to answer again
                log.debug("reading crawl.robots failed: %s", exc)
                records = []
            for o, data in records:
                offset = o + 1
                try:
                    record = msgpack.unpackb(data)
                    policy = RobotsPolicy.from_dict(record["policy"])
                    delays[str(record["host"])] = host_delay(
                        policy, self.settings.user_agent, minimum=self.settings.delay
                    )
                except Exception:  # a malformed record is skipped, as the workers do
                    continue
            await trio.sleep(1.0)

    async def _summary(self, exporter: Any) -> None:
        from .dashboard import summary
        from .worker import FRONTIER, RESULTS

        if self.dashboard is not None:
            with contextlib.suppress(Exception):
                self.dashboard.frontier = await self.client.stats(FRONTIER)
                self.dashboard.results = await self.client.stats(RESULTS)
            # The counts come from the results written, which the exporter has all seen; the
            # workers' stats messages stopped being followed when the crawl ended, and miss
            # whatever happened since their last one.
            counts = exporter.counts
            view = dataclasses.replace(
                self.dashboard.view(),
                done=counts.results,
                failed=counts.failed,
                retried=counts.retried,
                bytes=counts.bytes,
                status=tuple(sorted(counts.status.items())),
            )
            print(summary(view), file=sys.stderr)
        elapsed = time.monotonic() - self.started
        limit = self.settings.max_pages
        lines = exporter.offset if limit is None else min(exporter.offset, limit)
        print(
            f"ww-crawl: {lines} results in {self.info.output} "
            f"({exporter.written} written by this run) in {elapsed:.1f} s",
            file=sys.stderr,
        )


async def _kill_quietly(process: Any) -> None:
    with contextlib.suppress(Exception):
        await process.kill()


def is_failure(record: dict[str, Any] | None) -> bool:
    """A result worth another try with --retry-failed: an error (no response, robots.txt
    unavailable, ...), a 5xx or a 429."""
    if record is None:
        return False
    status = record.get("status")
    return record.get("error") is not None or status is None or status >= 500 or status == 429


async def latest_results(client: Any) -> dict[str, tuple[int, bytes]]:
    """url -> (offset, record bytes) of the latest result of each URL in crawl.results."""
    from .export import decode_result
    from .worker import RESULTS

    end = int((await client.stats(RESULTS)).get("appended", 0))
    latest: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while offset < end:
        records = await client.read(RESULTS, offset, 1000)
        if not records:
            break
        for o, data in records:
            record = decode_result(data)
            if record is not None and isinstance(record.get("url"), str):
                latest[record["url"]] = (o, data)
            offset = o + 1
    return latest


# ---------------------------------------------------------------------------------------------
# status, export, demo


async def cmd_status(args: argparse.Namespace) -> int:
    from ww.queue.client import QueueClient

    from .cluster import connect
    from .worker import FRONTIER, RESULTS

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
    from .cluster import local_cluster, start_queue
    from .export import Exporter
    from .worker import RESULTS

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
    from .sites import demo_site, serve_site

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


async def cmd_crawl(args: argparse.Namespace) -> int:
    from .seeds import SeedsError, read_seeds

    try:
        seeds = read_seeds(Path(args.seeds))
    except SeedsError as exc:
        if args.resume:
            seeds = []
        else:
            raise CrawlError(str(exc)) from None
    return await run_crawl(args, str(Path(args.seeds).resolve()), seeds)


# ---------------------------------------------------------------------------------------------
# Entry point


def setup_logging(verbosity: int) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=verbosity > 0)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Any]:
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "status":
            return build_status_parser().parse_args(rest), cmd_status
        if command == "export":
            return build_export_parser().parse_args(rest), cmd_export
        return build_demo_parser().parse_args(rest), cmd_demo
    return build_parser().parse_args(argv), cmd_crawl


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ww-crawl`; returns the exit code."""
    args, command = parse(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        return trio.run(_until_interrupted, command, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as group:
        exc = _unwrap(group)
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if isinstance(exc, SystemExit):
            raise
        if args.verbose:
            log.error("failed", exc_info=exc)
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, _known_errors()):
            text = f"{type(exc).__name__}: {text} (run with -v for the traceback)"
        print(f"ww-crawl: error: {text}", file=sys.stderr)
        return EXIT_ERROR


async def _until_interrupted(command: Any, args: argparse.Namespace) -> int:
    """Run the command; the first Ctrl-C (or SIGTERM) asks a crawl to stop cleanly, the second
    stops everything at once."""
    code = EXIT_INTERRUPTED
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal code
                code = await command(args)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            first = True
            async for _ in signals:
                if first and _CURRENT_CRAWL:
                    first = False
                    print("ww-crawl: stopping (Ctrl-C again to stop at once)", file=sys.stderr)
                    for crawl in _CURRENT_CRAWL:
                        crawl.stopping.set()
                    continue
                nursery.cancel_scope.cancel()
                break
    return code


_CURRENT_CRAWL: list[Crawl] = []


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _known_errors() -> tuple[type[BaseException], ...]:
    known: list[type[BaseException]] = [CrawlError, SettingsError]
    for module, names in (
        ("ww.crawler.seeds", ("SeedsError",)),
        ("ww.crawler.cluster", ("ClusterError",)),
        ("ww.crawler.export", ("ExportError",)),
        ("ww.crawler.handler", ("HandlerError",)),
        ("ww.queue.client", ("QueueError",)),
        ("ww.rom", ("RomError",)),
        ("ww.auth", ("AuthError",)),
        ("ww.rpc", ("RemoteError", "ConnectionLost", "CapabilityError")),
    ):
        mod = sys.modules.get(module)
        for name in names:
            error = getattr(mod, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                known.append(error)
    return tuple(known)


if __name__ == "__main__":
    sys.exit(main())
