import pytest
import trio
import trio.testing

from ww.host.channel import Channel, ChannelClosed


async def test_unbuffered_send_waits_for_a_receiver():
    chan = Channel(0)
    sent = trio.Event()

    async def sender():
        await chan.send(b"x")
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()
        assert await chan.recv() == b"x"
        await sent.wait()


async def test_buffered_send_returns_until_full():
    chan = Channel(2)
    await chan.send(1)
    await chan.send(2)
    with trio.move_on_after(0.05) as scope:
        await chan.send(3)
    assert scope.cancelled_caught
    assert [await chan.recv(), await chan.recv()] == [1, 2]


async def test_close_lets_receivers_drain_then_reports_closed():
    chan = Channel(4)
    await chan.send("a")
    await chan.send("b")
    chan.close()
    with pytest.raises(ChannelClosed):
        await chan.send("c")
    assert [x async for x in chan.stream()] == ["a", "b"]
    with pytest.raises(ChannelClosed, match="closed"):
        await chan.recv()


async def test_close_fails_a_blocked_sender_and_wakes_a_blocked_receiver():
    chan = Channel(0)
    outcomes = []

    async def send():
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

        async def receive():
            with pytest.raises(ChannelClosed):
                await waiter.recv()
            outcomes.append("recv closed")

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        waiter.close()
    assert outcomes == ["send closed", "recv closed"]


@pytest.mark.parametrize("capacity", [-1, 1.5, True, "3", 10**9])
def test_bad_capacity_is_refused(capacity):
    with pytest.raises(ValueError, match="capacity"):
        Channel(capacity)
