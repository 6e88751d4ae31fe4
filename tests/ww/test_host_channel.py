"""Channels: the Channel itself, and send_stream between real hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from tests.ww.conftest import HostFactory, HostProcess
from ww.dial import dial
from ww.host.channel import Channel, ChannelClosed
from ww.rpc import RemoteError


async def test_unbuffered_send_waits_for_a_receiver() -> None:
    chan = Channel(0)
    sent = trio.Event()

    async def sender() -> None:
        await chan.send(b"x")
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()
        assert await chan.recv() == b"x"
        await sent.wait()


async def test_buffered_send_returns_until_full() -> None:
    chan = Channel(2)
    await chan.send(1)
    await chan.send(2)
    with trio.move_on_after(0.05) as scope:
        await chan.send(3)
    assert scope.cancelled_caught
    assert [await chan.recv(), await chan.recv()] == [1, 2]


async def test_close_lets_receivers_drain_then_reports_closed() -> None:
    chan = Channel(4)
    await chan.send("a")
    await chan.send("b")
    chan.close()
    with pytest.raises(ChannelClosed):
        await chan.send("c")
    assert [x async for x in chan.stream()] == ["a", "b"]
    with pytest.raises(ChannelClosed, match="closed"):
        await chan.recv()


async def test_close_fails_a_blocked_sender_and_wakes_a_blocked_receiver() -> None:
    chan = Channel(0)
    outcomes: list[str] = []

    async def send() -> None:
        try:
            await chan.send(1)
        except ChannelClosed:
            outcomes.append("send closed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        chan.close()
    assert outcomes == ["send closed"]

    waiter = Channel(0)
    async with trio.open_nursery() as nursery:

        async def receive() -> None:
            with pytest.raises(ChannelClosed):
                await waiter.recv()
            outcomes.append("recv closed")

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        waiter.close()
    assert outcomes == ["send closed", "recv closed"]


@pytest.mark.parametrize("capacity", [-1, 1.5, True, "3", 10**9])
def test_bad_capacity_is_refused(capacity: Any) -> None:
    with pytest.raises(ValueError, match="capacity"):
        Channel(capacity)


# --- send_stream across real hosts (see conftest.host_factory) ---------------------------------


async def _hang_channel(owner: Any, peer: str, name: str, capacity: int) -> Any:
    """Make a channel on the host `owner` is a client of and hang it at /<peer>/<name>."""
    chan = await owner.channel(capacity)
    await (await (await owner.root()).walk(f"/{peer}/{name}")).store(chan)
    return chan


async def _load(host: Any, path: str) -> Any:
    return await (await (await host.root()).walk(path)).load()


@asynccontextmanager
async def _far_channel(how: str, a: HostProcess, b: HostProcess, name: str) -> AsyncIterator[Any]:
    """The channel at /<b>/<name> as a client of `a` reaches it: through a's anchor tree
    (a relays every call) or over a connection dialed straight to b."""
    async with a.connect() as on_a:
        if how == "relayed":
            yield await _load(on_a, f"/{b.peer}/{name}")
        else:
            async with dial(on_a, b.peer) as far:
                yield await _load(far, f"/{b.peer}/{name}")


async def _receive(chan: Any, n: int, into: list[Any]) -> None:
    async with chan.stream("recv_stream") as values:
        async for value in values:
            into.append(value)
            if len(into) == n:
                return


@pytest.mark.parametrize("how", ["relayed", "dialed"])
async def test_values_pushed_from_another_host_arrive_in_order(
    host_factory: HostFactory, how: str
) -> None:
    a, b = await host_factory.cluster(2)
    count = 2000
    got: list[Any] = []
    async with b.connect() as on_b:
        chan = await _hang_channel(on_b, b.peer, "pipe", 16)
        async with _far_channel(how, a, b, "pipe") as far, trio.open_nursery() as nursery:
            nursery.start_soon(_receive, chan, count, got)
            with trio.fail_after(20):
                async with far.sink("send_stream", window=64) as tx:
                    for i in range(count):
                        await tx.send(b"%d" % i)
            assert tx.result is None
    assert got == [b"%d" % i for i in range(count)]


@pytest.mark.parametrize("how", ["relayed", "dialed"])
async def test_a_full_channel_holds_back_a_pusher_on_another_host_until_drained(
    host_factory: HostFactory, how: str
) -> None:
    a, b = await host_factory.cluster(2)
    capacity, window, count = 3, 4, 200
    got: list[Any] = []
    async with b.connect() as on_b:
        chan = await _hang_channel(on_b, b.peer, "slow", capacity)
        async with _far_channel(how, a, b, "slow") as far:
            async with far.sink("send_stream", window=window) as tx:
                pushed = 0
                with trio.move_on_after(0.5) as held_back:
                    while pushed < count:
                        await tx.send(pushed)
                        pushed += 1
                assert held_back.cancelled_caught, "pushed everything with nobody receiving"
                # the channel's buffer, the pushes in flight, and the one value the sink
                # method holds while it waits to send it
                assert pushed <= capacity + window + 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_receive, chan, count, got)
                    with trio.fail_after(10):
                        while pushed < count:
                            await tx.send(pushed)
                            pushed += 1
            assert tx.result is None
    assert got == list(range(count))


async def test_closing_the_channel_fails_a_held_back_pusher_on_another_host(
    host_factory: HostFactory,
) -> None:
    a, b = await host_factory.cluster(2)
    capacity, window = 2, 2
    async with b.connect() as on_b:
        chan = await _hang_channel(on_b, b.peer, "doomed", capacity)
        async with _far_channel("relayed", a, b, "doomed") as far:
            pushed = 0
            with pytest.raises(RemoteError, match="channel is closed") as info:
                async with far.sink("send_stream", window=window) as tx:
                    # credit for the pushes past the window came back only once b took the
                    # first values: they are in the channel
                    with trio.fail_after(10):
                        while pushed < capacity + window:
                            await tx.send(pushed)
                            pushed += 1
                    with trio.move_on_after(0.5):
                        while True:
                            await tx.send(pushed)
                            pushed += 1
                    assert pushed <= capacity + window + 1, "nothing held the pusher back"
                    await chan.close()
                    with trio.fail_after(10):
                        while True:
                            await tx.send(pushed)
                            pushed += 1
            assert "\n" not in str(info.value)
            # what got in before the close is still there for receivers, in order
            buffered = [x async for x in _drain(chan)]
            assert buffered == list(range(capacity))
            with pytest.raises(RemoteError, match="channel is closed"):
                async with far.sink("send_stream") as tx:
                    await tx.send("late")


async def _drain(chan: Any) -> AsyncIterator[Any]:
    async with chan.stream("recv_stream") as values:
        async for value in values:
            yield value
