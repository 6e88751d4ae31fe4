"""Host↔host links: re-dialed after a peer restarts; refused across cluster namespaces."""

from __future__ import annotations

import trio

from tests.ww.conftest import HostFactory, HostProcess, view_of, wait_for


async def _view_is(host: HostProcess, peers: set[str]) -> bool:
    return await view_of(host) == peers


async def _published_reaches(sender: HostProcess, receiver: HostProcess) -> None:
    async with receiver.connect() as r, sender.connect() as s:
        topic = await (await r.pubsub()).join("again")
        async with topic.stream("subscribe") as messages:
            await wait_for(lambda: _subscribed(r))
            await (await (await s.pubsub()).join("again")).publish(b"back")
            with trio.fail_after(10):
                assert await messages.__anext__() == b"back"


async def _subscribed(host) -> bool:
    return (await host.stats())["subscriptions"] == 1


async def test_a_restarted_peer_is_dialed_again_and_rejoins(host_factory: HostFactory):
    a, b = await host_factory.cluster(2, ttl=1.5)
    a.kill()
    await a.process.wait()
    await wait_for(lambda: _view_is(b, {b.peer}), timeout=5)
    # same data dir (so the same peer id) and the same port b was configured with
    again = await host_factory.start(name="a-again", data_dir=a.data_dir, listen=a.address, ttl=1.5)
    assert again.peer == a.peer and again.address == a.address
    await wait_for(lambda: _view_is(b, {a.peer, b.peer}), timeout=10)
    await wait_for(lambda: _view_is(again, {a.peer, b.peer}), timeout=10)
    await _published_reaches(b, again)


async def test_a_host_of_another_namespace_is_not_linked(host_factory: HostFactory):
    a = await host_factory.start()
    stranger = await host_factory.start(peers=[a], ns="elsewhere", name="stranger")
    await wait_for(lambda: any("namespace" in line for line in stranger.lines), timeout=10)
    assert await view_of(a) == {a.peer}
    assert await view_of(stranger) == {stranger.peer}


class StubLink:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.closed = False


async def test_a_spare_link_to_the_same_host_takes_over_when_the_current_one_closes(
    nursery, tmp_path
):
    from ww.host.config import HostConfig
    from ww.host.node import Host

    async def no_dialing(addr):
        raise AssertionError("nothing is dialed here")

    host = Host(HostConfig(data_dir=tmp_path), "me", ("127.0.0.1", 1), nursery, no_dialing)
    first, second = StubLink("peer"), StubLink("peer")
    host._add_link(first)
    host._add_link(second)  # both hosts dialed each other at once
    assert host.links["peer"] is second
    second.closed = True
    host._remove_link(second)
    assert host.links["peer"] is first  # the spare carries traffic now
    first.closed = True
    host._remove_link(first)
    assert "peer" not in host.links
