"""Multi-host behaviour with real host processes on loopback (see conftest.host_factory)."""

from __future__ import annotations

import textwrap
import time

import pytest
import trio

from tests.ww.conftest import HostFactory, HostProcess, view_of, wait_for
from ww.rpc import DEFAULT_WINDOW, RemoteError

HOLDER = """
import trio

async def main(host, args):
    # Hang a channel at args[0] (and bytes below it), then obey one command sent on it.
    root = await host.root()
    anchor = await root.walk(args[0])
    chan = await host.channel(0)
    await anchor.store(chan)
    await (await anchor.walk("note")).store(b"held by a process")
    command = await chan.recv()
    if command == b"crash":
        raise RuntimeError("asked to crash")
    if command == b"hang":
        await trio.sleep_forever()
    return 7
"""


@pytest.fixture(scope="module")
def holder_rom(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from ww.rom import build_rom

    src = tmp_path_factory.mktemp("holder")
    (src / "rom.toml").write_text(
        'name = "holder"\nversion = "0.1.0"\nentry = "holder:main"\nrequires = ["trio"]\n'
    )
    (src / "holder.py").write_text(textwrap.dedent(HOLDER))
    return build_rom(src)


async def _view_is(host: HostProcess, peers: set[str]) -> bool:
    return await view_of(host) == peers


async def test_a_host_joined_through_one_peer_sees_every_host(host_factory: HostFactory):
    a, b, c = await host_factory.cluster(3)
    async with c.connect() as host:
        view = await host.view()
        entries = {e["peer"]: e for e in await view.hosts()}
    assert entries[a.peer]["addrs"] == [a.address]
    assert abs(entries[a.peer]["last_seen"] - time.time()) < 2.0
    d = await host_factory.start(peers=[c], meta={"role": "late"}, name="d")
    await wait_for(lambda: _view_is(a, {a.peer, b.peer, c.peer, d.peer}))
    async with a.connect() as host:
        view = await host.view()
        meta = {e["peer"]: e["meta"] for e in await view.hosts()}
    assert meta[d.peer] == {"role": "late"}


async def test_a_killed_host_leaves_every_view_within_its_ttl(host_factory: HostFactory):
    ttl = 1.5
    a, b, c = await host_factory.cluster(3, ttl=ttl)
    async with a.connect() as on_a, b.connect() as on_b:
        views = [await on_a.view(), await on_b.view()]
        c.kill()
        killed_at = trio.current_time()
        gone_after = []
        for view in views:
            with trio.fail_after(ttl + 5):
                while c.peer in {e["peer"] for e in await view.hosts()}:
                    await trio.sleep(0.02)
            gone_after.append(trio.current_time() - killed_at)
    # the last heartbeat came at most one interval before the kill; allow for a loaded machine
    assert max(gone_after) <= ttl + 1.0, f"gone after {gone_after}s, TTL {ttl}s"
    assert await view_of(a) == await view_of(b) == {a.peer, b.peer}


async def test_pubsub_fans_out_across_three_hosts_once_each(host_factory: HostFactory):
    hosts = await host_factory.cluster(3)
    per_host = 5
    expected = sorted(f"{h.name}-{i}".encode() for h in hosts for i in range(per_host))
    received: dict[str, list[bytes]] = {h.name: [] for h in hosts}

    done = trio.Semaphore(0)

    async def subscribe(h: HostProcess) -> None:
        async with h.connect() as host:
            topic = await (await host.pubsub()).join("fan")
            async with topic.stream("subscribe") as messages:
                async for data in messages:
                    received[h.name].append(data)
                    if len(received[h.name]) == len(expected):
                        done.release()

    async with trio.open_nursery() as nursery:
        for h in hosts:
            nursery.start_soon(subscribe, h)
        for h in hosts:
            await wait_for(lambda h=h: _subscribed(h))
        for h in hosts:
            async with h.connect() as host:
                topic = await (await host.pubsub()).join("fan")
                for i in range(per_host):
                    await topic.publish(f"{h.name}-{i}".encode())
        with trio.move_on_after(15):
            for _ in hosts:
                await done.acquire()
            await trio.sleep(0.2)  # room for a duplicate to show up, were there one
        nursery.cancel_scope.cancel()
    for name, got in received.items():
        assert sorted(got) == expected, name


async def _subscribed(h: HostProcess) -> bool:
    async with h.connect() as host:
        return (await host.stats())["subscriptions"] == 1


async def test_channel_across_hosts_blocks_a_sender_until_received(host_factory: HostFactory):
    a, b, c = await host_factory.cluster(3)
    async with a.connect() as owner, b.connect() as sender_host, c.connect() as receiver_host:
        chan = await owner.channel(0)
        await (await (await owner.root()).walk(f"/{a.peer}/pipe")).store(chan)
        # b and c reach the channel on a through the anchor, over their links to a
        sending = await (await (await sender_host.root()).walk(f"/{a.peer}/pipe")).load()
        receiving = await (await (await receiver_host.root()).walk(f"/{a.peer}/pipe")).load()
        sent = trio.Event()

        async def send() -> None:
            await sending.send(b"across")
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.sleep(0.3)
            assert not sent.is_set(), "an unbuffered send returned with no receiver"
            assert await receiving.recv() == b"across"
            with trio.fail_after(5):
                await sent.wait()

        buffered = await owner.channel(2)
        await (await (await owner.root()).walk(f"/{a.peer}/buf")).store(buffered)
        far = await (await (await sender_host.root()).walk(f"/{a.peer}/buf")).load()
        await far.send(1)
        await far.send(2)
        with trio.move_on_after(0.3) as blocked:
            await far.send(3)
        assert blocked.cancelled_caught, "a full buffered channel took a third value"
        assert [await buffered.recv(), await buffered.recv()] == [1, 2]
        await far.close()
        # the cancelled third send may or may not have landed before the cancel reached a
        assert [x async for x in _drain(buffered)] in ([], [3])
        with pytest.raises(RemoteError, match="closed"):
            await far.send(4)


async def _drain(chan):
    async with chan.stream("recv_stream") as values:
        async for value in values:
            yield value


async def test_what_a_connection_stores_goes_when_it_closes(host_factory: HostFactory):
    a, b = await host_factory.cluster(2)
    async with a.connect() as watcher:
        mine = await (await watcher.root()).walk(f"/{a.peer}")
        async with a.connect() as local, b.connect() as remote:
            await (await (await local.root()).walk(f"/{a.peer}/local/x")).store(b"1")
            # a client of b stores on a's tree, through b
            far = await (await remote.root()).walk(f"/{a.peer}/far")
            await far.store(b"2")
            assert await far.path() == f"/{a.peer}/far"
            assert await mine.ls() == ["far", "local"]
            assert await (await mine.walk("far")).load() == b"2"
        # the local client is gone: its anchor at once; b's client: once b releases its lease
        await wait_for(lambda: _ls_is(mine, []), timeout=5)
        stats = await watcher.stats()
        assert stats["anchors"] == 0


async def _ls_is(anchor, names) -> bool:
    return await anchor.ls() == names


async def test_what_a_process_stores_goes_when_it_exits(host_factory: HostFactory, holder_rom):
    a, b = await host_factory.cluster(2)
    async with a.connect() as client:
        root = await client.root()
        process = await client.spawn(holder_rom, [f"/{a.peer}/held"])
        held = await root.walk(f"/{a.peer}/held")
        await wait_for(lambda: _ls_is(held, ["note"]), timeout=10)
        assert await (await held.walk("note")).load() == b"held by a process"
        chan = await held.load()
        rows = await client.ps()
        assert [(r["name"], r["state"]) for r in rows] == [("holder", "running")]
        await chan.send(b"exit")
        assert await process.wait() == 7
        assert await (await root.walk(f"/{a.peer}")).ls() == []
        assert (await process.info())["state"] == "exited"

        # spawned at an anchor on b, the process runs on b and hangs its channel on a's tree
        remote = await (await root.walk(f"/{b.peer}/job")).spawn(holder_rom, [f"/{a.peer}/from-b"])
        from_b = await root.walk(f"/{a.peer}/from-b")
        await wait_for(lambda: _ls_is(from_b, ["note"]), timeout=10)
        async with b.connect() as on_b:
            assert [r["name"] for r in await on_b.ps()] == ["holder"]
            b_root = await on_b.root()
            stored = await (await b_root.walk(f"/{b.peer}/job")).load()
            assert (await stored.info())["name"] == "holder"
            await remote.kill()
            assert await remote.wait() < 0
            assert await (await b_root.walk(f"/{b.peer}")).ls() == []
        # b releases the lease it held on a for the process: a's anchors go too
        await wait_for(lambda: _ls_is(from_b, []), timeout=5)
        assert await (await root.walk(f"/{a.peer}")).ls() == []


async def test_a_crashing_process_leaves_its_host_up(host_factory: HostFactory, holder_rom):
    (a,) = await host_factory.cluster(1)
    async with a.connect() as client:
        process = await client.spawn(holder_rom, [f"/{a.peer}/c"])
        held = await (await client.root()).walk(f"/{a.peer}/c")
        await wait_for(lambda: _ls_is(held, ["note"]), timeout=10)
        await (await held.load()).send(b"crash")
        assert await process.wait() == 1
        pid = (await process.info())["pid"]
        assert b"asked to crash" in await client.logs(pid)
        assert await client.id() == a.peer
        # by content id, now that the host has it cached
        from ww.rom import Rom

        again = await client.spawn(Rom.load(holder_rom).cid, [f"/{a.peer}/d"])
        await client.kill((await again.info())["pid"])
        assert await again.wait() < 0


async def test_references_are_released_when_a_client_disconnects(host_factory: HostFactory):
    a, b = await host_factory.cluster(2)
    async with a.connect() as watcher:
        before = await watcher.stats()
        async with a.connect() as client:
            root = await client.root()
            chans = [await client.channel(1) for _ in range(5)]
            await (await root.walk(f"/{a.peer}/c0")).store(chans[0])
            await (await root.walk(f"/{b.peer}/remote")).store(b"x")
            topic = await (await client.pubsub()).join("t")
            async with topic.stream("subscribe"):
                during = await watcher.stats()
                assert during["exports"] > before["exports"]
                assert during["anchors"] == 1
                assert during["remote_leases"] == 1
        await wait_for(lambda: _stats_back(watcher, before), timeout=5)


async def _stats_back(watcher, before) -> bool:
    now = await watcher.stats()
    return all(
        now[k] == before[k]
        for k in ("exports", "anchors", "remote_leases", "connections", "subscriptions")
    )


async def test_bad_requests_get_one_line_errors_and_the_host_stays_up(host_factory: HostFactory):
    (a,) = await host_factory.cluster(1)
    async with a.connect() as client:
        root = await client.root()
        cases = [
            (root.walk("/a//b"), "empty component"),
            (client.spawn(b"x", [], {"memory": -1}), "positive number"),
            (client.spawn(b"x", [], {"nice": 1}), "limits must be"),
            (root.walk("/" + "x/" * 40), "levels deep"),
            (root.walk("/nobody/x"), "no host nobody"),
            (root.store(b"x"), "root anchor"),
            (client.channel(-1), "capacity"),
            (client.spawn(b"not a zip", []), "ROM"),
            (client.spawn("0" * 64, []), "no ROM"),
            (client.kill(999999), "no process"),
            (client.peer_link({"peer": "x", "ns": "other"}, None), "PeerLink"),
        ]
        for call, complaint in cases:
            with pytest.raises(RemoteError, match=complaint) as info:
                await call
            assert "\n" not in str(info.value)
        anchor = await root.walk(f"/{a.peer}/v")
        with pytest.raises(RemoteError, match="bytes or a capability"):
            await anchor.store("text")
        assert await client.id() == a.peer


async def test_a_subscriber_that_does_not_read_loses_messages_and_slows_nobody(
    host_factory: HostFactory,
):
    a, b = await host_factory.cluster(2)
    count = 600  # more than a subscriber's queue (256) and its stream window hold
    async with b.connect() as on_b, a.connect() as on_a:
        slow_topic = await (await on_b.pubsub()).join("busy")
        fast_topic = await (await on_b.pubsub()).join("busy")
        async with (
            slow_topic.stream("subscribe") as slow,
            fast_topic.stream("subscribe") as fast,
        ):
            await wait_for(lambda: _subscriptions(on_b, 2))
            publisher = await (await on_a.pubsub()).join("busy")
            got = []

            async def read_fast() -> None:
                async for data in fast:
                    got.append(data)
                    if len(got) == count:
                        return

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_fast)
                    for i in range(count):
                        await publisher.publish(b"%d" % i)
            assert got == [b"%d" % i for i in range(count)]  # in order, none lost

            # Reading past the stream's window makes the host take items out of the full
            # queue, so there is room again for one more message.
            backlog = [await slow.__anext__() for _ in range(DEFAULT_WINDOW + 8)]
            await publisher.publish(b"end")
            with trio.fail_after(10):
                while (data := await slow.__anext__()) != b"end":
                    backlog.append(data)
            assert backlog[0] == b"0"
            assert len(backlog) < count, "a subscriber's queue is bounded"


async def _subscriptions(host, n: int) -> bool:
    return (await host.stats())["subscriptions"] == n
