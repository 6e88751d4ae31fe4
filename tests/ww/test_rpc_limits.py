"""Hostile peers: an oversized or malformed frame closes that one connection, logged; the
server keeps serving everyone else."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
    RemoteError,
    serve_connection,
    sink,
)
from ww.rpc.wire import encode_frame

MAX_FRAME = 1024


class Echo(Capability):
    async def echo(self, value: object) -> object:
        return value

    async def big(self, n: int) -> bytes:
        return b"x" * n


@asynccontextmanager
async def server() -> AsyncIterator[int]:
    async def handler(stream: trio.SocketStream) -> None:
        await serve_connection(stream, Echo(), max_frame=MAX_FRAME)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def read_until_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            data += chunk
    return data


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ((MAX_FRAME + 1).to_bytes(4, "big"), "exceeds the limit of 1024 bytes"),
        ((2**32 - 1).to_bytes(4, "big") + b"x" * 100, "frame of 4294967295 bytes"),
        (encode_frame(b"\xc1\xc1\xc1"), "undecodable message"),
        (encode_frame(msgpack.packb({"not": "a message"})), "not a non-empty array"),
        (encode_frame(msgpack.packb([0, 1, 0, "echo", "args?"])), "bad arguments"),
        (encode_frame(msgpack.packb([3, 12345, 1])), "release of unknown capability 12345"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "exceeds the limit"),
    ],
)
async def test_bad_frame_closes_only_that_connection(
    payload: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ww.rpc")
    async with server() as port:
        good_stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with Connection.open(good_stream) as good:
            assert await good.bootstrap().echo("before") == "before"
            bad = await trio.open_tcp_stream("127.0.0.1", port)
            await bad.send_all(payload)
            assert await read_until_eof(bad) == b""
            await bad.aclose()
            assert any(
                r.name == "ww.rpc" and reason in r.getMessage() and r.levelno == logging.WARNING
                for r in caplog.records
            ), [r.getMessage() for r in caplog.records]
            # The other connection and new ones are still served.
            assert await good.bootstrap().echo("after") == "after"
            again = await trio.open_tcp_stream("127.0.0.1", port)
            async with Connection.open(again) as conn:
                assert await conn.bootstrap().echo(1) == 1


async def test_peer_vanishing_mid_frame_is_logged_and_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ww.rpc")
    async with server() as port:
        bad = await trio.open_tcp_stream("127.0.0.1", port)
        await bad.send_all((100).to_bytes(4, "big") + b"partial")
        await bad.send_eof()
        assert await read_until_eof(bad) == b""
        assert any("middle of a frame" in r.getMessage() for r in caplog.records)
        async with Connection.open(await trio.open_tcp_stream("127.0.0.1", port)) as conn:
            assert await conn.bootstrap().echo("ok") == "ok"


async def test_sender_refuses_a_message_over_the_frame_limit() -> None:
    async with server() as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with Connection.open(stream, max_frame=MAX_FRAME) as conn:
            with pytest.raises(CapabilityError, match="exceeds the frame limit of 1024"):
                await conn.bootstrap().echo(b"x" * 2000)
            assert await conn.bootstrap().echo(b"x" * 500) == b"x" * 500
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with Connection.open(stream) as conn:
            # The server refuses an oversize answer the same way, as an error to the caller.
            with pytest.raises(RemoteError, match="exceeds the frame limit of 1024"):
                await conn.bootstrap().big(2000)
            assert await conn.bootstrap().big(10) == b"x" * 10


class Slow(Capability):
    def __init__(self) -> None:
        self.gate = trio.Event()

    async def wait(self) -> str:
        await self.gate.wait()
        return "done"

    async def open(self) -> None:
        self.gate.set()


async def test_too_many_concurrent_calls_get_an_error_not_a_crash() -> None:
    left, right = trio.testing.memory_stream_pair()
    slow = Slow()
    async with (
        Connection.open(left, slow, max_answers=2),
        Connection.open(right) as client,
        trio.open_nursery() as nursery,
    ):
        results: list[str] = []

        async def wait() -> None:
            results.append(await client.bootstrap().wait())

        nursery.start_soon(wait)
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RemoteError, match=r"too many concurrent calls \(limit 2\)"):
            await client.bootstrap().wait()
        slow.gate.set()
    assert results == ["done", "done"]


async def test_stream_items_beyond_credit_close_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A producer that ignores the credit window is a protocol error at the consumer."""
    caplog.set_level(logging.INFO, logger="ww.rpc")
    left, right = trio.testing.memory_stream_pair()
    async with (
        Connection.open(right) as client,
        client.bootstrap().stream("anything", window=2) as items,
    ):
        request = await left.receive_some()
        qid = msgpack.unpackb(request[4:])[1]
        await left.send_all(encode_frame(msgpack.packb([5, qid, [1, 2, 3]])))
        with pytest.raises(ConnectionLost, match="more items than its credit"):
            async for _ in items:
                pass
    assert any("more items than its credit" in r.getMessage() for r in caplog.records)


class Target(Capability):
    async def ping(self, *args: object) -> object:
        return args

    async def items(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @sink
    async def collect(self, items: AsyncIterator[object]) -> int:
        return len([item async for item in items])

    @sink
    async def keep(self, items: AsyncIterator[object]) -> None:
        async for _ in items:
            pass

    def _keep_nowait(self, item: object) -> bool:
        return item is None


_id = st.integers(0, 4) | st.integers(-1, 2**64 - 1)
_cap = st.builds(msgpack.ExtType, st.integers(0, 3), st.binary(min_size=0, max_size=9))
_value = st.none() | st.integers(0, 3) | st.text(max_size=4) | _cap
_name = st.sampled_from(["ping", "items", "collect", "keep", "nope", "_on_release"]) | st.text(
    max_size=4
)
_args = st.lists(_value, max_size=3)
_shaped = st.one_of(
    st.tuples(st.just(0), _id, _id, _name, _args),  # Call
    st.tuples(st.just(1), _id, _value),  # Return
    st.tuples(st.just(2), _id, st.text(max_size=4), st.text(max_size=4)),  # Error
    st.tuples(st.just(3), _id, _id),  # Release
    st.tuples(st.just(4), _id, _id, _name, _args, _id),  # StreamStart
    st.tuples(st.just(5), _id, _args),  # Items
    st.tuples(st.just(6), _id),  # End
    st.tuples(st.just(7), _id, _id),  # Credit
    st.tuples(st.just(8), _id),  # Cancel
    st.tuples(st.just(9), _id, _id, _name, _args, _id),  # SinkStart
    st.tuples(st.just(10), _id, _args),  # Push
    st.tuples(st.just(11), _id, _id),  # Ack
    st.tuples(st.just(12), _id),  # Done
).map(list)
_junk = st.lists(_value | _id | _args, max_size=6)
_message = _shaped | _junk


@settings(max_examples=100, deadline=None)
@given(st.lists(_message, min_size=1, max_size=6))
def test_fuzz_messages_into_a_live_connection(messages: list[list[object]]) -> None:
    """Arbitrary (often nonsensical) messages never make serve_connection raise; a
    connection that survives them still answers a well-formed call."""

    async def scenario() -> None:
        left, right = trio.testing.memory_stream_pair()
        done = trio.Event()

        async def serve() -> None:
            await serve_connection(left, Target())
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            frames = [encode_frame(msgpack.packb(message)) for message in messages]
            probe = encode_frame(msgpack.packb([0, 2**40, 0, "ping", ["probe"]]))
            await right.send_all(b"".join(frames) + probe)
            received = b""
            with trio.fail_after(5):
                while b"probe" not in received:  # until it answers the probe ...
                    data = await right.receive_some()
                    if not data:
                        break  # ... or closes this connection, which is allowed
                    received += data
            await right.aclose()
            with trio.fail_after(5):
                await done.wait()

    errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record)

    handler = Collect(logging.ERROR)
    logger = logging.getLogger("ww.rpc")
    logger.addHandler(handler)
    try:
        trio.run(scenario)
    finally:
        logger.removeHandler(handler)
    assert errors == [], [r.getMessage() for r in errors]
