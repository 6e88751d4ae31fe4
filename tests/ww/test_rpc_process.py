"""RPC between two real OS processes over TCP loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from ww.rpc import Capability, Connection, ConnectionLost, Ref

CHILD = textwrap.dedent(
    """
    import functools
    import trio
    from ww.rpc import Capability, serve_connection

    class Service(Capability):
        async def double(self, x):
            return 2 * x

        async def count(self, n):
            for i in range(n):
                yield i

        async def call_back(self, ref, value):
            return await ref.call("take", value)

        async def keep(self, ref):
            self.kept = ref

        async def hang(self):
            await trio.sleep_forever()

    async def main():
        async def handler(stream):
            await serve_connection(stream, Service())

        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            print(listeners[0].socket.getsockname()[1], flush=True)

    trio.run(main)
    """
)


class Sink(Capability):
    def __init__(self) -> None:
        self.taken: list[object] = []
        self.released = trio.Event()

    async def take(self, value: object) -> str:
        self.taken.append(value)
        return "taken"

    async def _on_release(self) -> None:
        self.released.set()


@asynccontextmanager
async def child_server() -> AsyncIterator[tuple[trio.Process, int]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(100)
                assert chunk, "child exited before listening"
                line += chunk
        yield process, int(line)
    finally:
        process.kill()
        await process.wait()


async def test_calls_streams_and_callbacks_across_processes() -> None:
    async with child_server() as (_process, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        sink = Sink()
        async with Connection.open(stream) as conn:
            child = conn.bootstrap()
            assert await child.double(21) == 42
            async with child.stream("count", 50) as items:
                assert [x async for x in items] == list(range(50))
            assert await child.call_back(sink, {"k": b"v"}) == "taken"
            assert sink.taken == [{"k": b"v"}]
            # The child dropped its reference when its call ended.
            await child.double(0)
            assert conn.export_count() == 0
            with trio.fail_after(5):
                await sink.released.wait()


async def test_killed_peer_fails_outstanding_calls_and_releases_exports() -> None:
    async with child_server() as (process, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        sink = Sink()
        async with Connection.open(stream) as conn:
            child: Ref = conn.bootstrap()
            await child.keep(sink)
            assert conn.export_count() == 1
            failures: list[BaseException] = []

            async def hang() -> None:
                try:
                    await child.hang()
                except ConnectionLost as e:
                    failures.append(e)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hang)
                await trio.testing.wait_all_tasks_blocked()
                process.send_signal(signal.SIGKILL)
                with trio.fail_after(10):
                    await conn.closed.wait()
            assert len(failures) == 1
            assert conn.export_count() == 0
            assert sink.released.is_set()
