"""The crawl worker ROM: `ww.crawler.worker.Worker` on this host, until told to stop.

args: --settings B64 (CrawlSettings.encode()), --name NAME, --group raft/v1 and, with a
handler, --handler PATH (the anchor that holds the handler ROM's bytes). It publishes its
stats on `ww-crawl.stats`, and stops on a "stop" message on `ww-crawl.control` (or SIGTERM):
the batches in flight finish within the drain time, and what is left goes back to the queue.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import trio

from ww.crawler.handler import load_handler
from ww.crawler.settings import CrawlSettings
from ww.crawler.worker import CONTROL_TOPIC, STATS_TOPIC, Worker, wait_until_set_up
from ww.queue.client import QueueClient, QueueError

log = logging.getLogger("ww-crawl.worker")

DRAIN = 10.0  # seconds the batches in flight get to finish after "stop"
SIGTERM_DRAIN = 1.5  # the host kills a process 2 s after SIGTERM
START_TIMEOUT = 120.0  # how long to wait for the Raft group and the crawl's topics


async def main(host: Any, args: list[str]) -> int:
    if host is None:
        print("the crawl worker needs a host", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="ww-crawl-worker")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--group", default="raft/v1")
    parser.add_argument("--handler")
    opts = parser.parse_args(args)
    # httpx2 logs every request at INFO: a line per page through the host's log relay.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    settings = CrawlSettings.decode(opts.settings)
    peer = await host.id()
    pubsub = await host.pubsub()
    stats = await pubsub.join(STATS_TOPIC)
    control = await pubsub.join(CONTROL_TOPIC)
    handler_cm = None
    handler = None
    if opts.handler:
        root = await host.root()
        data = await (await root.walk(opts.handler)).load()
        handler_cm = load_handler(bytes(data))
        handler = handler_cm.__enter__()
    client = await _connect(host, opts.group)
    if client is None:
        print(
            f"no crawl was set up in the Raft group {opts.group} within {START_TIMEOUT:g} s; "
            "see `ww run roms/raft status`",
            file=sys.stderr,
        )
        return 1
    worker = Worker(
        client, settings, opts.name, host_id=peer, handler=handler, publish=stats.publish
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, worker)
            nursery.start_soon(_stop_on_message, worker, control)
            await worker.run()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
        if handler_cm is not None:
            handler_cm.__exit__(None, None, None)
    log.info("worker %s stopped: %d pages", opts.name, worker.stats.pages)
    return 0


async def _connect(host: Any, group: str) -> QueueClient | None:
    """A client of the group once the crawl is set up in it (the workers of a new crawl are
    spawned while its replicas start), or None after START_TIMEOUT."""
    client = None
    with trio.move_on_after(START_TIMEOUT):
        while client is None:
            try:
                client = await QueueClient.connect(host, group=group)
            except QueueError:  # no replica serves yet
                await trio.sleep(0.05)
        await wait_until_set_up(client)
        return client
    if client is not None:
        await client.aclose()
    return None


async def _stop_on_signal(worker: Worker) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            worker.stop(SIGTERM_DRAIN)


async def _stop_on_message(worker: Worker, control: Any) -> None:
    async with control.stream("subscribe") as messages:
        async for message in messages:
            if bytes(message) == b"stop":
                worker.stop(DRAIN)
