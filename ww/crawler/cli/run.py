"""`ww-crawl SEEDS`: one run of a crawl on a cluster (embedded, or --cluster): set up the
queue, spawn the workers, export the results as they commit, show the progress, watch for the
end, stop the workers and print the summary."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio

from ww.crawler.settings import CrawlSettings

from .args import DEFAULT_OUTPUT, given_changes, settings_from_args
from .datadir import CRAWL_JSON, EXPORT_STATE, CrawlInfo, check_data_dir
from .errors import EXIT_INTERRUPTED, CrawlError
from .prepare import resumed_settings, retry_failed, set_up

log = logging.getLogger(__package__)

__all__ = ["RUNNING", "Crawl", "cmd_crawl", "run_crawl"]

WATCH_INTERVAL = 0.25
PROGRESS_INTERVAL = 3.0
WORKER_STOP_TIMEOUT = 20.0


async def cmd_crawl(args: argparse.Namespace) -> int:
    """`ww-crawl SEEDS`: crawl from the seeds file (on --resume, one that is gone is fine)."""
    from ww.crawler.seeds import SeedsError, read_seeds

    try:
        seeds = read_seeds(Path(args.seeds))
    except SeedsError as exc:
        if args.resume:
            seeds = []
        else:
            raise CrawlError(str(exc)) from None
    return await run_crawl(args, str(Path(args.seeds).resolve()), seeds)


async def run_crawl(args: argparse.Namespace, seeds_file: str, seeds: list[str]) -> int:
    from ww.crawler.cluster import local_cluster, remote_cluster

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
        from ww.crawler.handler import HandlerError, read_handler_rom

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
        RUNNING.append(crawl)
        try:
            return await crawl.run(resume)
        finally:
            RUNNING.remove(crawl)


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
        from ww.crawler.cluster import connect_queue, start_queue
        from ww.crawler.export import Exporter
        from ww.crawler.worker import CONTROL_TOPIC, RESULTS

        # A new crawl on an embedded cluster has nothing to check in the queue first: its
        # workers start (a process each, imports, a connection) while the replicas elect a
        # leader, and wait for the topics set_up creates.
        early = not resume and not self.args.cluster
        async with trio.open_nursery() as nursery:
            if early:
                nursery.start_soon(self._spawn_workers)
            self.client = await start_queue(self.cluster, resume=resume)
        try:
            if resume:
                self.settings = await resumed_settings(
                    self.client, self.settings, given_changes(self.args)
                )
                if self.args.retry_failed:
                    await retry_failed(self.client, self.info, self.data_dir)
            await set_up(self.client, self.settings, new=not resume, cluster=self.args.cluster)
            exporter = Exporter(
                Path(self.info.output),
                self.data_dir / EXPORT_STATE,
                warc=Path(self.info.warc) if self.info.warc else None,
                resume=resume,
                limit=self.settings.max_pages,
            )
            try:
                if not early:
                    await self._spawn_workers()
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
        from ww.crawler.cluster import WORKERS

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

    async def _spawn_workers(self) -> None:
        from ww.crawler.cluster import spawn_workers

        self.workers = await spawn_workers(
            self.cluster,
            self.settings.encode(),
            per_host=self.args.workers,
            handler_path=await self._share_handler(),
        )

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
        from ww.crawler.worker import FRONTIER, RESULTS

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

        from ww.crawler.dashboard import DashboardState, follow_stats, poll_queue, run_dashboard
        from ww.crawler.worker import STATS_TOPIC

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
        from ww.crawler.robots import RobotsPolicy, host_delay
        from ww.crawler.worker import ROBOTS

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
        from ww.crawler.dashboard import summary
        from ww.crawler.worker import FRONTIER, RESULTS

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


RUNNING: list[Crawl] = []  # the crawls of this process, for Ctrl-C to stop
