"""Capability RPC: calls, capabilities, release and streams between two real connections."""

from __future__ import annotations

import functools
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from ww.rpc import (
    Capability,
    CapabilityError,
    Connection,
    ConnectionLost,
    Ref,
    RemoteError,
    serve_connection,
)


class Counter(Capability):
    def __init__(self) -> None:
        self.n = 0
        self.released = trio.Event()
        self.release_calls = 0

    async def inc(self, k: int = 1) -> int:
        self.n += k
        return self.n

    async def _on_release(self) -> None:
        self.release_calls += 1
        self.released.set()


class Service(Capability):
    """The bootstrap object the tests talk to."""

    def __init__(self) -> None:
        self.counter = Counter()
        self.gate = trio.Event()
        self.slow_cancelled = trio.Event()
        self.produced = 0
        self.stream_closed = trio.Event()
        self.held: list[Any] = []

    async def echo(self, value: Any) -> Any:
        return value

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def slow(self) -> str:
        try:
            await self.gate.wait()
        except trio.Cancelled:
            self.slow_cancelled.set()
            raise
        return "slow"

    async def fast(self) -> str:
        return "fast"

    async def open_gate(self) -> None:
        self.gate.set()

    async def fail(self) -> None:
        raise ValueError("no such\nwidget")

    async def refuse(self) -> None:
        raise CapabilityError("you may not do that")

    async def get_counter(self) -> Counter:
        return self.counter

    async def new_counter(self) -> Counter:
        return Counter()

    async def is_my_counter(self, ref: Any) -> bool:
        return ref is self.counter

    async def call_back(self, callback: Ref, k: int) -> Any:
        return await callback.inc(k)

    async def hold(self, value: Any) -> None:
        self.held.append(value)

    async def use_held(self, k: int) -> Any:
        return await self.held[-1].inc(k)

    async def drop_held(self) -> None:
        for ref in self.held:
            await ref.release()
        self.held.clear()

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def forever(self) -> AsyncIterator[int]:
        try:
            while True:
                self.produced += 1
                yield self.produced
        finally:
            self.stream_closed.set()

    async def broken_stream(self) -> AsyncIterator[int]:
        yield 1
        raise KeyError("gone")

    async def odd_items(self) -> AsyncIterator[object]:
        try:
            yield 1
            yield object()
            self.produced = -1  # never reached: the stream stops at the unsendable item
            yield 3
        finally:
            self.stream_closed.set()

    async def counters(self, n: int) -> AsyncIterator[Counter]:
        for _ in range(n):
            yield self.counter


@asynccontextmanager
async def memory_pair(
    service: Capability | None = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """(server, client) connections over an in-memory stream pair."""
    left, right = trio.testing.memory_stream_pair()
    async with (
        Connection.open(left, service, name="server") as server,
        Connection.open(right, name="client") as client,
    ):
        yield server, client


@asynccontextmanager
async def tcp_server(service: Capability) -> AsyncIterator[tuple[int, list[Connection]]]:
    """A real TCP server on 127.0.0.1 serving `service`; yields (port, server connections)."""
    conns: list[Connection] = []

    async def handler(stream: trio.SocketStream) -> None:
        async with Connection.open(stream, service, name="server") as conn:
            conns.append(conn)
            await conn.closed.wait()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1], conns
        nursery.cancel_scope.cancel()


async def test_call_returns_value_over_tcp() -> None:
    service = Service()
    async with tcp_server(service) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with Connection.open(stream) as conn:
            ref = conn.bootstrap()
            assert await ref.call("add", 2, 3) == 5
            assert await ref.echo({"a": [1, b"x", None, 2.5, True]}) == {
                "a": [1, b"x", None, 2.5, True]
            }


async def test_keyword_arguments_reach_the_method() -> None:
    async with memory_pair(Service()) as (_, client):
        ref = client.bootstrap()
        assert await ref.add(2, b=5) == 7
        assert await ref.call("add", a=1, b=2) == 3
        with pytest.raises(RemoteError, match=r"bad arguments.*'c'"):
            await ref.add(1, c=2)
        assert await ref.add(1, 2) == 3


async def test_concurrent_calls_fast_returns_before_slow() -> None:
    service = Service()
    async with memory_pair(service) as (_, client):
        ref = client.bootstrap()
        order: list[str] = []

        async def slow() -> None:
            order.append(await ref.slow())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.testing.wait_all_tasks_blocked()
            order.append(await ref.fast())
            assert order == ["fast"]
            await ref.open_gate()
        assert order == ["fast", "slow"]


async def test_exception_becomes_remote_error_with_one_line() -> None:
    async with memory_pair(Service()) as (_, client):
        with pytest.raises(RemoteError) as info:
            await client.bootstrap().fail()
        assert info.value.type == "ValueError"
        assert info.value.message == "no such\nwidget"
        assert "\n" not in str(info.value)
        with pytest.raises(RemoteError) as info:
            await client.bootstrap().refuse()
        assert (info.value.type, info.value.message) == ("CapabilityError", "you may not do that")


async def test_unknown_method_wrong_arity_unknown_cap_are_remote_errors() -> None:
    async with memory_pair(Service()) as (server, client):
        ref = client.bootstrap()
        with pytest.raises(RemoteError, match="no method 'nope'"):
            await ref.nope()
        with pytest.raises(RemoteError, match="no method '_on_release'"):
            await ref.call("_on_release")
        with pytest.raises(RemoteError, match="bad arguments"):
            await ref.add(1)
        with pytest.raises(RemoteError, match="is a stream"):
            await ref.count(3)
        with pytest.raises(RemoteError, match="unknown or released capability 77"):
            await Ref(client, 77, tracked=False).inc()
        with pytest.raises(RemoteError, match="no bootstrap capability"):
            await server.bootstrap().anything()
        with pytest.raises(RemoteError, match=r"no method 'xxxx.*\.\.\.$") as info:
            await ref.call("x" * 100_000)
        assert len(info.value.message) <= 4096
        # The connection is still fine.
        assert await ref.add(1, 2) == 3
        assert not server.closed.is_set()


async def test_unserializable_result_and_argument() -> None:
    class Odd(Capability):
        async def thing(self) -> object:
            return object()

    async with memory_pair(Odd()) as (_, client):
        with pytest.raises(RemoteError, match="cannot send a object"):
            await client.bootstrap().thing()
        with pytest.raises(TypeError, match="cannot send a object"):
            await client.bootstrap().thing(object())


async def test_capability_returned_then_released() -> None:
    service = Service()
    async with memory_pair(service) as (server, client):
        ref = client.bootstrap()
        counter = await ref.get_counter()
        assert isinstance(counter, Ref)
        assert await counter.inc() == 1
        assert await counter.inc(4) == 5
        assert server.export_count() == 1
        # The same object exported twice is one entry.
        again = await ref.get_counter()
        assert again == counter
        assert server.export_count() == 1
        await counter.release()
        await counter.release()  # idempotent
        assert await ref.fast() == "fast"  # the release travelled before this call
        assert server.export_count() == 1
        assert not service.counter.released.is_set()
        await again.release()
        assert await ref.fast() == "fast"
        assert server.export_count() == 0
        with trio.fail_after(5):
            await service.counter.released.wait()
        assert service.counter.release_calls == 1
        with pytest.raises(CapabilityError, match="released"):
            await counter.inc()


async def test_dropping_the_last_python_reference_releases() -> None:
    service = Service()
    async with memory_pair(service) as (server, client):
        counter = await client.bootstrap().get_counter()
        assert server.export_count() == 1
        del counter
        gc.collect()
        assert await client.bootstrap().fast() == "fast"
        assert server.export_count() == 0
        with trio.fail_after(5):
            await service.counter.released.wait()


async def test_async_with_ref_releases_on_exit() -> None:
    async with memory_pair(Service()) as (server, client):
        async with await client.bootstrap().new_counter() as counter:
            assert await counter.inc(2) == 2
            assert server.export_count() == 1
        await client.bootstrap().fast()
        assert server.export_count() == 0


async def test_cap_passed_back_to_its_owner_is_the_same_object() -> None:
    service = Service()
    async with memory_pair(service) as (_, client):
        ref = client.bootstrap()
        counter = await ref.get_counter()
        assert await ref.is_my_counter(counter) is True
        assert await ref.is_my_counter(await ref.new_counter()) is False
        # and the client's own capability comes back to it as itself
        mine = Counter()
        assert await ref.echo(mine) is mine
        assert await ref.echo([mine, {"k": mine}]) == [mine, {"k": mine}]


async def test_client_passes_capability_to_server_which_calls_back() -> None:
    service = Service()
    async with memory_pair(service) as (_, client):
        mine = Counter()
        ref = client.bootstrap()
        assert await ref.call_back(mine, 7) == 7
        assert mine.n == 7
        # The server's handle was dropped when the call returned: our export is gone.
        await ref.fast()
        assert client.export_count() == 0
        with trio.fail_after(5):
            await mine.released.wait()


async def test_third_party_ref_is_proxied_and_released() -> None:
    """A holds a ref to C's counter and gives it to B; B uses it; releases reach C."""
    c_service, b_service = Service(), Service()
    ac_left, ac_right = trio.testing.memory_stream_pair()
    ab_left, ab_right = trio.testing.memory_stream_pair()
    async with (
        Connection.open(ac_left, c_service, name="c") as c_side,
        Connection.open(ac_right, name="a->c") as a_to_c,
        Connection.open(ab_left, b_service, name="b") as b_side,
        Connection.open(ab_right, name="a->b") as a_to_b,
    ):
        counter = await a_to_c.bootstrap().get_counter()
        b = a_to_b.bootstrap()
        await b.hold(counter)
        assert a_to_b.export_count() == 1  # the forwarder
        assert await b.use_held(3) == 3
        assert c_service.counter.n == 3
        # B hands the forwarded ref back to A: A gets its original reference.
        assert await b.echo(counter) == counter
        # B drops it: A's forwarder goes, C still has A's own reference.
        await b.drop_held()
        await b.fast()
        assert a_to_b.export_count() == 0
        await a_to_c.bootstrap().fast()
        assert c_side.export_count() == 1
        await counter.release()
        await a_to_c.bootstrap().fast()
        assert c_side.export_count() == 0
        with trio.fail_after(5):
            await c_service.counter.released.wait()
        assert b_side.export_count() == 0


async def test_third_party_stream_is_relayed() -> None:
    c_service = Service()
    ac_left, ac_right = trio.testing.memory_stream_pair()
    ab_left, ab_right = trio.testing.memory_stream_pair()

    class Reader(Capability):
        async def read(self, ref: Ref, n: int) -> list[int]:
            async with ref.stream("count", n) as items:
                return [x async for x in items]

    async with (
        Connection.open(ac_left, c_service),
        Connection.open(ac_right) as a_to_c,
        Connection.open(ab_left, Reader()),
        Connection.open(ab_right) as a_to_b,
    ):
        assert await a_to_b.bootstrap().read(a_to_c.bootstrap(), 40) == list(range(40))


async def test_disconnect_releases_everything() -> None:
    service = Service()
    left, right = trio.testing.memory_stream_pair()
    client_cap = Counter()
    async with Connection.open(left, service, name="server") as server:
        async with Connection.open(right, name="client") as client:
            ref = client.bootstrap()
            shared = await ref.get_counter()
            kept = await ref.new_counter()
            await ref.hold(client_cap)
            assert server.export_count() == 2
            assert client.export_count() == 1
        with trio.fail_after(5):
            await server.closed.wait()
        assert server.export_count() == 0
        assert client.export_count() == 0
        assert service.counter.released.is_set()
        assert client_cap.released.is_set()
        with pytest.raises(ConnectionLost):
            await kept.inc()
        with pytest.raises(ConnectionLost):
            await shared.inc()


async def test_outstanding_call_gets_connection_lost_when_peer_leaves() -> None:
    service = Service()
    left, right = trio.testing.memory_stream_pair()
    async with Connection.open(right, name="client") as client:
        async with trio.open_nursery() as nursery:

            async def serve_then_leave() -> None:
                async with Connection.open(left, service):
                    await trio.testing.wait_all_tasks_blocked()

            nursery.start_soon(serve_then_leave)
            with pytest.raises(ConnectionLost):
                await client.bootstrap().slow()
        assert service.slow_cancelled.is_set()


async def test_cancelled_call_cancels_the_remote_method() -> None:
    service = Service()
    async with memory_pair(service) as (server, client):
        with trio.move_on_after(0.05):
            await client.bootstrap().slow()
        with trio.fail_after(5):
            await service.slow_cancelled.wait()
        assert await client.bootstrap().fast() == "fast"
        assert server._answers == {}


async def test_stream_items_and_end() -> None:
    async with memory_pair(Service()) as (_, client):
        async with client.bootstrap().stream("count", 100) as items:
            assert [x async for x in items] == list(range(100))
        async with client.bootstrap().stream("count", 0) as items:
            assert [x async for x in items] == []


async def test_unsendable_stream_item_ends_the_stream_with_an_error() -> None:
    service = Service()
    async with memory_pair(service) as (_, client):
        got = []
        with pytest.raises(RemoteError, match="cannot send a object"):
            async with client.bootstrap().stream("odd_items") as items:
                async for x in items:
                    got.append(x)
        assert got == [1]
        with trio.fail_after(5):
            await service.stream_closed.wait()
        assert service.produced == 0


async def test_stream_error_is_remote_error() -> None:
    async with memory_pair(Service()) as (_, client):
        got = []
        with pytest.raises(RemoteError, match="KeyError"):
            async with client.bootstrap().stream("broken_stream") as items:
                async for x in items:
                    got.append(x)
        assert got == [1]
        with pytest.raises(RemoteError, match="no stream 'fast'"):
            async with client.bootstrap().stream("fast") as items:
                await items.__anext__()


@pytest.mark.parametrize("window", [1, 4, 16])
async def test_stream_backpressure_keeps_producer_a_window_ahead(window: int) -> None:
    service = Service()
    async with memory_pair(service) as (_, client):
        ahead = []
        async with client.bootstrap().stream("forever", window=window) as items:
            consumed = 0
            async for _ in items:
                consumed += 1
                # Let the producer run as far as its credit allows.
                await trio.testing.wait_all_tasks_blocked()
                ahead.append(service.produced - consumed)
                if consumed == 5 * window:
                    break
        assert max(ahead) == window  # it does run ahead, by the window ...
        assert all(0 <= a <= window for a in ahead)  # ... and never further
        with trio.fail_after(5):
            await service.stream_closed.wait()


async def test_leaving_a_stream_early_cancels_the_generator() -> None:
    service = Service()
    async with memory_pair(service) as (server, client):
        async with client.bootstrap().stream("forever") as items:
            assert await items.__anext__() == 1
            assert await items.__anext__() == 2
        with trio.fail_after(5):
            await service.stream_closed.wait()
        # the connection carries on, and the stream's answer entry is gone
        assert await client.bootstrap().fast() == "fast"
        await trio.testing.wait_all_tasks_blocked()
        assert server._answers == {}


async def test_capabilities_in_unconsumed_stream_items_are_released() -> None:
    service = Service()
    async with memory_pair(service) as (server, client):
        async with client.bootstrap().stream("counters", 8, window=8) as items:
            first = await items.__anext__()
            await trio.testing.wait_all_tasks_blocked()  # the other items have arrived
        await first.release()
        await client.bootstrap().fast()
        assert server.export_count() == 0
        assert client.import_count() == 0


async def test_serve_connection_returns_when_peer_leaves() -> None:
    left, right = trio.testing.memory_stream_pair()
    service = Service()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def serve() -> None:
            await serve_connection(left, service)
            done.set()

        nursery.start_soon(serve)
        async with Connection.open(right) as client:
            assert await client.bootstrap().fast() == "fast"
        with trio.fail_after(5):
            await done.wait()


async def test_on_release_runs_once_after_the_last_connection_drops_the_object() -> None:
    service = Service()
    async with memory_pair(service) as (server_1, client_1):
        async with memory_pair(service) as (server_2, client_2):
            on_1 = await client_1.bootstrap().get_counter()
            on_2 = await client_2.bootstrap().get_counter()
            await on_1.release()
            await client_1.bootstrap().fast()
            assert server_1.export_count() == 0
            assert not service.counter.released.is_set()
            assert await on_2.inc() == 1
        # The second connection closed: now the object is released, once.
        with trio.fail_after(5):
            await service.counter.released.wait()
        assert service.counter.release_calls == 1
        assert server_2.export_count() == 0


async def test_call_cancelled_before_it_starts_never_runs_and_workers_carry_on() -> None:
    service = Service()
    async with memory_pair(service) as (server, client):
        ref = client.bootstrap()
        # Call and Cancel leave in one write, so the server reads both before the call runs.
        with trio.CancelScope() as scope:
            scope.cancel()
            await ref.slow()
        with trio.fail_after(5):
            await service.slow_cancelled.wait()
        # Workers that ran cancelled calls serve the next ones normally.
        for i in range(20):
            assert await ref.add(i, 1) == i + 1
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(ref.fast)
        await trio.testing.wait_all_tasks_blocked()
        assert server._answers == {}


async def test_consumer_can_time_out_waiting_for_an_item_and_carry_on() -> None:
    class Gated(Capability):
        def __init__(self) -> None:
            self.gate = trio.Event()

        async def items(self) -> AsyncIterator[str]:
            yield "first"
            await self.gate.wait()
            yield "second"

        async def open(self) -> None:
            self.gate.set()

    async with memory_pair(Gated()) as (_, client):
        ref = client.bootstrap()
        async with ref.stream("items") as items:
            assert await items.__anext__() == "first"
            with trio.move_on_after(0.05) as waited:
                await items.__anext__()
            assert waited.cancelled_caught
            await ref.open()
            assert await items.__anext__() == "second"
            with pytest.raises(StopAsyncIteration):
                await items.__anext__()
            with pytest.raises(StopAsyncIteration):  # the end stays the end
                await items.__anext__()


async def test_leaving_a_relayed_stream_early_cancels_the_origin_generator() -> None:
    """B iterates C's stream through A's forwarder and stops early: C's generator closes."""
    c_service = Service()
    ac_left, ac_right = trio.testing.memory_stream_pair()
    ab_left, ab_right = trio.testing.memory_stream_pair()

    class Reader(Capability):
        async def take(self, ref: Ref, n: int) -> list[int]:
            async with ref.stream("forever", window=4) as items:
                got = []
                async for x in items:
                    got.append(x)
                    if len(got) == n:
                        return got
            return got

    async with (
        Connection.open(ac_left, c_service) as c_side,
        Connection.open(ac_right) as a_to_c,
        Connection.open(ab_left, Reader()),
        Connection.open(ab_right) as a_to_b,
    ):
        assert await a_to_b.bootstrap().take(a_to_c.bootstrap(), 3) == [1, 2, 3]
        with trio.fail_after(5):
            await c_service.stream_closed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert c_side._answers == {}
        # A producer never ran more than a window or two ahead of the far consumer.
        assert c_service.produced <= 3 + 2 * 4
