"""Sinks (the caller pushes items, the method takes them) and batched stream items."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.rpc import (
    Capability,
    CapabilityError,
    Connection,
    ConnectionLost,
    Ref,
    RemoteError,
    sink,
)
from ww.rpc.connection import MAX_SINK_WINDOW
from ww.rpc.wire import FrameDecoder, encode_frame


class Counter(Capability):
    def __init__(self) -> None:
        self.released = trio.Event()

    async def _on_release(self) -> None:
        self.released.set()


class Collector(Capability):
    def __init__(self) -> None:
        self.taken: list[Any] = []
        self.gate = trio.Event()
        self.finished = trio.Event()
        self.fast: list[Any] = []

    @sink
    async def collect(self, items: AsyncIterator[Any], tag: str) -> str:
        async for item in items:
            self.taken.append(item)
        return f"{tag}:{len(self.taken)}"

    @sink
    async def gated(self, items: AsyncIterator[Any]) -> None:
        """Takes nothing until the gate opens; notes when it is cancelled or finishes."""
        try:
            await self.gate.wait()
            async for item in items:
                self.taken.append(item)
        finally:
            self.finished.set()

    @sink
    async def first_two(self, items: AsyncIterator[Any]) -> list[Any]:
        got = []
        async for item in items:
            got.append(item)
            if len(got) == 2:
                break
        return got

    @sink
    async def picky(self, items: AsyncIterator[Any]) -> None:
        async for item in items:
            if item < 0:
                raise ValueError(f"negative item {item}")
            self.taken.append(item)

    @sink
    async def mixed(self, items: AsyncIterator[Any]) -> int:
        """Even items are taken at once by the twin below; odd ones wait here for the gate."""
        async for item in items:
            await self.gate.wait()
            self.taken.append(item)
        return len(self.taken) + len(self.fast)

    def _mixed_nowait(self, item: Any) -> bool:
        if item % 2:
            return False
        self.fast.append(item)
        self.taken.append(item)
        return True

    @sink
    async def hold_caps(self, items: AsyncIterator[Ref]) -> int:
        n = 0
        async for ref in items:
            await ref.release()
            n += 1
        return n

    async def plain(self) -> str:
        return "plain"

    async def burst(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i  # no checkpoint between items: they queue while the writer waits


@asynccontextmanager
async def pair(service: Capability) -> AsyncIterator[tuple[Connection, Connection]]:
    left, right = trio.testing.memory_stream_pair()
    async with (
        Connection.open(left, service, name="server") as server,
        Connection.open(right, name="client") as client,
    ):
        yield server, client


async def test_sink_takes_items_in_order_and_returns_the_result() -> None:
    service = Collector()
    async with pair(service) as (server, client):
        async with client.bootstrap().sink("collect", "t", window=8) as tx:
            for i in range(100):
                await tx.send(i)
        assert tx.result == "t:100"
        assert service.taken == list(range(100))
        await trio.testing.wait_all_tasks_blocked()
        assert server._answers == {} and client._questions == {}


async def test_sender_waits_while_the_window_is_full() -> None:
    """Nothing taken: exactly `window` sends complete, the next one waits."""
    service = Collector()
    async with pair(service) as (_, client):
        async with client.bootstrap().sink("gated", window=4) as tx:
            for i in range(4):
                await tx.send(i)
            with trio.move_on_after(0.2) as scope:
                await tx.send(4)
            assert scope.cancelled_caught
            service.gate.set()
            with trio.fail_after(5):
                await tx.send(5)
        assert service.taken == [0, 1, 2, 3, 5]


async def test_several_tasks_push_into_one_sink() -> None:
    """Senders waiting for credit together are all let go as credit comes back."""
    service = Collector()
    async with pair(service) as (_, client):
        async with client.bootstrap().sink("collect", "many", window=2) as tx:

            async def push(first: int) -> None:
                for i in range(first, first + 100):
                    await tx.send(i)

            async with trio.open_nursery() as nursery:
                for first in range(0, 500, 100):
                    nursery.start_soon(push, first)
        assert tx.result == "many:500"
        assert sorted(service.taken) == list(range(500))


async def test_a_method_that_raises_fails_the_next_send_and_the_block() -> None:
    service = Collector()
    async with pair(service) as (_, client):
        with pytest.raises(RemoteError, match="negative item -1") as info:
            async with client.bootstrap().sink("picky", window=2) as tx:
                await tx.send(1)
                await tx.send(-1)
                with trio.fail_after(5):
                    while True:
                        await tx.send(2)
        assert info.value.type == "ValueError"
        assert service.taken == [1]


async def test_a_caller_that_handles_the_failure_sees_it_again_at_the_end() -> None:
    async with pair(Collector()) as (_, client):
        with pytest.raises(RemoteError, match="negative item -1"):
            async with client.bootstrap().sink("picky", window=2) as tx:
                await tx.send(-1)
                for _ in range(2):
                    with trio.fail_after(5), pytest.raises(RemoteError, match="negative item"):
                        while True:
                            await tx.send(1)


async def test_a_method_that_returns_early_refuses_further_items() -> None:
    async with pair(Collector()) as (_, client):
        async with client.bootstrap().sink("first_two", window=2) as tx:
            await tx.send("a")
            await tx.send("b")
            with trio.fail_after(5), pytest.raises(CapabilityError, match="takes no more"):
                while True:
                    await tx.send("c")
        assert tx.result == ["a", "b"]


async def test_leaving_by_an_exception_cancels_the_method() -> None:
    service = Collector()
    async with pair(service) as (server, _client):
        with pytest.raises(KeyError):
            async with _client.bootstrap().sink("gated") as tx:
                await tx.send(1)
                raise KeyError("caller gave up")
        with trio.fail_after(5):
            await service.finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert server._answers == {}
        assert service.taken == []


async def test_nowait_twin_takes_items_without_reordering_them() -> None:
    """The twin may take an item only while the method waits for its next one."""
    service = Collector()
    with trio.fail_after(10):
        async with pair(service) as (_, client), client.bootstrap().sink("mixed", window=32) as tx:
            for i in range(0, 40, 2):  # all even: the twin takes them
                await tx.send(i)
            await client.bootstrap().plain()  # a round trip: they have arrived
            assert service.fast == list(range(0, 40, 2))
            for i in range(40, 42):  # the twin takes 40; the method holds 41 at the gate
                await tx.send(i)
            await client.bootstrap().plain()
            for i in range(42, 60):  # in frames of their own: they must wait behind 41
                await tx.send(i)
                await client.bootstrap().plain()
            assert service.fast == list(range(0, 42, 2))
            service.gate.set()
        assert tx.result == 40 + 21
        assert service.taken == [*range(0, 40, 2), *range(40, 60)]


async def test_capabilities_pushed_into_a_sink_are_released() -> None:
    counters = [Counter() for _ in range(3)]
    async with pair(Collector()) as (_, client):
        async with client.bootstrap().sink("hold_caps") as tx:
            for counter in counters:
                await tx.send(counter)
        assert tx.result == 3
        with trio.fail_after(5):
            for counter in counters:
                await counter.released.wait()
        assert client.export_count() == 0


async def test_kinds_are_checked() -> None:
    async with pair(Collector()) as (_, client):
        service = client.bootstrap()
        with pytest.raises(RemoteError, match="has no method 'collect' \\('collect' is a sink"):
            await service.collect("t")
        with pytest.raises(RemoteError, match="has no sink 'plain' \\('plain' is a method"):
            async with service.sink("plain") as tx:
                await tx.send(1)
        with pytest.raises(ValueError, match="sink window"):
            async with service.sink("collect", "t", window=0):
                pass
        assert await service.plain() == "plain"


async def test_a_sink_relayed_through_a_middle_connection() -> None:
    """B pushes into C's sink through A's forwarder: items, credit, the answer and the
    cancellation all pass through, and A's tables return to empty."""
    service = Collector()

    class Pusher(Capability):
        async def push(self, ref: Ref, n: int, window: int) -> Any:
            async with ref.sink("collect", "relayed", window=window) as tx:
                for i in range(n):
                    await tx.send(i)
            return tx.result

        async def push_and_quit(self, ref: Ref) -> None:
            with pytest.raises(KeyError):
                async with ref.sink("gated", window=2) as tx:
                    await tx.send(1)
                    raise KeyError("quit")

    ac_left, ac_right = trio.testing.memory_stream_pair()
    ab_left, ab_right = trio.testing.memory_stream_pair()
    async with (
        Connection.open(ac_left, service) as c_side,
        Connection.open(ac_right) as a_to_c,
        Connection.open(ab_left, Pusher()),
        Connection.open(ab_right) as a_to_b,
    ):
        pusher = a_to_b.bootstrap()
        assert await pusher.push(a_to_c.bootstrap(), 500, 4) == "relayed:500"
        assert service.taken == list(range(500))
        await pusher.push_and_quit(a_to_c.bootstrap())
        with trio.fail_after(5):
            await service.finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert a_to_b._answers == {} and a_to_c._questions == {}
        assert c_side._answers == {}


async def test_a_pusher_that_goes_away_cancels_the_relayed_sink() -> None:
    """The pusher's connection to the middle drops while it is held back: the far method
    is cancelled and neither the middle nor the far side keeps the question."""
    service = Collector()
    ac_left, ac_right = trio.testing.memory_stream_pair()
    ab_left, ab_right = trio.testing.memory_stream_pair()

    class Middle(Capability):
        def __init__(self, far: Ref) -> None:
            self.far = far

        async def far_collector(self) -> Ref:
            return self.far

    async with (
        Connection.open(ac_left, service) as c_side,
        Connection.open(ac_right) as a_to_c,
        Connection.open(ab_left, Middle(a_to_c.bootstrap())) as a_side,
    ):
        async with Connection.open(ab_right) as b_to_a:
            far = await b_to_a.bootstrap().far_collector()
            with pytest.raises(ConnectionLost):
                async with far.sink("gated", window=2) as tx:
                    await tx.send(1)
                    await tx.send(2)
                    await trio.testing.wait_all_tasks_blocked()  # the far method holds 1
                    assert c_side._answers != {}
                    await b_to_a.aclose()  # the pusher's process died
        with trio.fail_after(5):
            await service.finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert service.taken == []
        assert a_side._answers == {} and a_to_c._questions == {}
        assert c_side._answers == {}


async def test_stream_items_produced_together_travel_in_one_frame() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with Connection.open(left, Collector()):
        await right.send_all(encode_frame(msgpack.packb([4, 1, 0, "burst", [200], 300])))
        frames = FrameDecoder()
        values: list[int] = []
        batches = 0
        with trio.fail_after(5):
            while True:
                for body in frames.feed(await right.receive_some()):
                    message = msgpack.unpackb(body)
                    if message[0] == 6:  # End
                        break
                    assert message[:2] == [5, 1]  # Items of stream 1
                    values += message[2]
                    batches += 1
                else:
                    continue
                break
    assert values == list(range(200))
    assert batches < 20  # the generator never waited, so items went out many to a frame


async def test_batches_stay_within_a_small_frame_limit() -> None:
    """Items join a batch only while it fits the frame limit the peers agreed on."""
    service = Collector()
    left, right = trio.testing.memory_stream_pair()
    async with (
        Connection.open(left, service, max_frame=1000) as server,
        Connection.open(right, max_frame=1000) as client,
    ):
        async with client.bootstrap().stream("burst", 300, window=300) as items:
            assert [i async for i in items] == list(range(300))
        async with client.bootstrap().sink("collect", "small", window=300) as tx:
            for _ in range(300):
                await tx.send(b"x" * 90)
        assert tx.result == "small:300"
        assert not server.closed.is_set() and not client.closed.is_set()


async def test_pushing_beyond_the_credit_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ww.rpc")
    service = Collector()
    left, right = trio.testing.memory_stream_pair()
    async with Connection.open(left, service) as server:
        await right.send_all(encode_frame(msgpack.packb([9, 1, 0, "gated", [], 2])))
        await right.send_all(encode_frame(msgpack.packb([10, 1, [1, 2, 3]])))
        with trio.fail_after(5):
            await server.closed.wait()
    assert "more items than its credit" in (server.close_reason or "")


async def test_a_window_above_the_limit_is_refused() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with Connection.open(left, Collector()):
        frame = [9, 1, 0, "collect", ["t"], MAX_SINK_WINDOW + 1]
        await right.send_all(encode_frame(msgpack.packb(frame)))
        with trio.fail_after(5):
            reply = msgpack.unpackb((await right.receive_some())[4:])
    assert reply[:3] == [2, 1, "CapabilityError"] and "window" in reply[3]


async def test_connection_lost_reaches_a_waiting_sender() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with Connection.open(right) as client:
        with pytest.raises(ConnectionLost):
            async with client.bootstrap().sink("anything", window=1) as tx:
                await tx.send(1)
                await left.aclose()
                with trio.fail_after(5):
                    await tx.send(2)


class Prefix(Capability):
    """Takes items until `stop` (then returns) or `fail` (then raises); notes what it took.
    Items divisible by 3 are taken by the nowait twin when they can be."""

    def __init__(self) -> None:
        self.taken: list[int] = []

    @sink
    async def take(self, items: AsyncIterator[int], stop: int, fail: int) -> int:
        async for item in items:
            if item == fail:
                raise ValueError(f"failed at {item}")
            if item == stop:
                return len(self.taken)
            if item % 2:
                await trio.sleep(0)  # busy with an item when the next ones arrive
            self.taken.append(item)
        return len(self.taken)

    def _take_nowait(self, item: int, stop: int, fail: int) -> bool:
        if item % 3 or item in (stop, fail):
            return False
        self.taken.append(item)
        return True


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    window=st.integers(1, 40),
    stop=st.integers(0, 400),
    fail=st.integers(0, 400),
    relayed=st.booleans(),
)
def test_whatever_the_window_and_ending_items_are_taken_in_order_once(
    n: int, window: int, stop: int, fail: int, relayed: bool
) -> None:
    """The method sees a prefix of what was pushed, in order, each item once; the caller
    learns how it ended; no question is left behind on any connection."""

    async def scenario() -> None:
        service = Prefix()
        async with AsyncExitStack() as stack:
            left, right = trio.testing.memory_stream_pair()
            server = await stack.enter_async_context(Connection.open(left, service))
            client = await stack.enter_async_context(Connection.open(right))
            conns = [server, client]
            target = client.bootstrap()
            if relayed:  # through a middle connection that forwards `target`
                ml, mr = trio.testing.memory_stream_pair()
                middle = await stack.enter_async_context(Connection.open(ml, Relayer(target)))
                outer = await stack.enter_async_context(Connection.open(mr))
                conns += [middle, outer]
                target = await outer.bootstrap().target()
            ended = "completed"
            with trio.fail_after(10):
                try:
                    async with target.sink("take", stop, fail, window=window) as tx:
                        for i in range(n):
                            await tx.send(i)
                except RemoteError as exc:
                    ended = "failed"
                    assert f"failed at {fail}" in str(exc)
                except CapabilityError:
                    ended = "returned early"
                await trio.testing.wait_all_tasks_blocked()
            taken = service.taken
            assert taken == list(range(len(taken)))  # a prefix, in order, each once
            first_end = min(stop, fail, n)
            assert len(taken) == first_end
            if ended == "completed":
                assert tx.result == len(taken)
                assert first_end == n or stop < fail
            elif ended == "failed":
                assert fail < n and fail <= stop
            for conn in conns:
                assert conn._answers == {} and conn._questions == {}

    trio.run(scenario)


class Relayer(Capability):
    def __init__(self, target: Ref) -> None:
        self._target = target

    async def target(self) -> Ref:
        return self._target
