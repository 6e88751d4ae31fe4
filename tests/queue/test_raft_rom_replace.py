"""The Raft ROM in real processes: every replica replaced, one by one (a new host's replica
added, then an old one removed), while a producer and a consumer keep working; nothing
acknowledged is lost and nothing is completed twice."""

from __future__ import annotations

import trio

from tests.queue.conftest import HostFactory, wait_for
from tests.queue.test_raft_rom import TTL, Load, caught_up, ww_run
from ww.queue.client import QueueClient


async def test_replace_all_three_replicas_one_by_one_under_load(
    host_factory: HostFactory,
) -> None:
    hosts = await host_factory.cluster(6, ttl=TTL)
    old, new = hosts[:3], hosts[3:]
    started = await ww_run(
        hosts[0], "start", "--hosts", ",".join(h.peer for h in old), "--snapshot-interval", "100"
    )
    assert started.returncode == 0, started.stderr.decode()
    load = Load()
    async with hosts[0].connect() as ref:
        client = await QueueClient.connect(ref, timeout=30)
        await client.create("work", max_attempts=10)
        await client.create("results", kind="log")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run_for, client, 120.0)
            for out, into in zip(old, new, strict=True):
                await trio.sleep(1.0)
                added = await ww_run(hosts[0], "add", into.peer)
                assert added.returncode == 0, added.stderr.decode()
                removed = await ww_run(hosts[0], "remove", out.peer)
                assert removed.returncode == 0, removed.stderr.decode()
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

        status = await client.status()
        assert sorted(status["voters"]) == sorted(h.peer for h in new)
        assert status["leader"] in {h.peer for h in new}
        await wait_for(lambda: caught_up(client, {h.peer for h in new}), timeout=20)
        # Drain, then check every acknowledged put completed exactly once.
        while True:
            items = await client.claim("work", "final", max_items=100, lease=30)
            if not items:
                stats = await client.stats("work")
                if stats["ready"] == 0 and stats["leased"] == 0 and stats["delayed"] == 0:
                    break
                await trio.sleep(0.2)
                continue
            await load.complete(client, "final", items)
        keys: list[str] = []
        offset = 0
        while batch := await client.read("results", offset, 1000):
            keys.extend(r.decode() for _, r in batch)
            offset = batch[-1][0] + 1
        assert len(keys) == len(set(keys)), "an item was completed twice"
        assert load.acked <= set(keys), "an acknowledged put was lost"
        assert set(load.completed) <= set(keys)
        assert len(load.acked) > 100
