"""ww.rpc between two processes over TCP loopback, against a bare trio TCP peer.

    python benchmarks/rpc_raw.py [--count 50000] [--rtt-count 3000] [--inflight 64] [--repeat 3]
                                 [--tls]

A child process serves an RPC capability and, on another port, a bare trio TCP server. For
100-byte and 10 KB payloads this measures:

  - one way, calls: `--count` calls `take(payload)` from `--inflight` concurrent tasks; each
    call carries one payload to the server (its answer is a few bytes).
  - one way, sink: the client pushes `--count` payloads into the server's sink `absorb`
    (sends do not wait for answers; the default credit window holds them back).
  - one way, stream: the server streams `--count` payloads to the client through a credit
    window (a subscription's path).
  - round trip: `--rtt-count` calls `echo(payload)` one at a time; p50 and p99.

Bare TCP: the same one-way count of length-prefixed messages (one `send_all` per message from
one task, the server parsing frames and answering a final flush with the count), and the same
ping-pong round trips. Medians of `--repeat` runs, with the ratio ww.rpc / TCP. With `--tls`
the RPC runs over mutual TLS with a throwaway cluster key (the bare peer stays plain TCP).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from time import perf_counter

import trio

from ww.auth import (
    Identity,
    generate_cluster_key,
    load_cluster_key,
    open_client_stream,
    server_stream_wrapper,
)
from ww.rpc import Capability, Connection, serve_connection, sink

HOST = "127.0.0.1"
SIZES = (100, 10_000)
_LEN = struct.Struct(">I")


class Bench(Capability):
    def __init__(self) -> None:
        self.sunk = 0

    async def take(self, payload: bytes) -> None:
        self.sunk += 1

    @sink
    async def absorb(self, payloads: AsyncIterator[bytes]) -> int:
        n = 0
        async for _ in payloads:
            n += 1
        return n

    async def echo(self, payload: bytes) -> bytes:
        return payload

    async def flush(self) -> int:
        n, self.sunk = self.sunk, 0
        return n

    async def produce(self, size: int, count: int) -> AsyncIterator[bytes]:
        payload = b"x" * size
        for _ in range(count):
            yield payload


# -- the child process ------------------------------------------------------------------------


async def tcp_peer(stream: trio.SocketStream) -> None:
    """Bare TCP: frames tagged S (count), E (echo back), F (answer the count)."""
    buf = bytearray()
    count = 0
    try:
        while data := await stream.receive_some(256 * 1024):
            buf += data
            pos = 0
            while len(buf) - pos >= 4:
                (n,) = _LEN.unpack_from(buf, pos)
                if len(buf) - pos - 4 < n:
                    break
                tag = buf[pos + 4]
                if tag == ord("E"):
                    await stream.send_all(bytes(buf[pos : pos + 4 + n]))
                elif tag == ord("F"):
                    await stream.send_all(_LEN.pack(8) + count.to_bytes(8, "big"))
                    count = 0
                else:
                    count += 1
                pos += 4 + n
            del buf[:pos]
    except trio.BrokenResourceError:
        pass


async def serve(key_path: str | None) -> None:
    key = None if key_path is None else load_cluster_key(key_path)
    wrap = server_stream_wrapper(key, Identity.generate())

    async def rpc_handler(tcp: trio.SocketStream) -> None:
        await serve_connection(await wrap(tcp), Bench())

    async with trio.open_nursery() as nursery:
        rpc = await nursery.start(trio.serve_tcp, rpc_handler, 0)
        tcp = await nursery.start(trio.serve_tcp, tcp_peer, 0)
        ports = (rpc[0].socket.getsockname()[1], tcp[0].socket.getsockname()[1])
        print(*ports, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        nursery.cancel_scope.cancel()


# -- measurements -------------------------------------------------------------------------------


async def rpc_one_way(conn: Connection, size: int, count: int, inflight: int) -> float:
    ref = conn.bootstrap()
    payload = b"x" * size
    per_task = count // inflight

    async def sender() -> None:
        for _ in range(per_task):
            await ref.take(payload)

    start = perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(inflight):
            nursery.start_soon(sender)
    got: int = await ref.flush()
    assert got == per_task * inflight, got
    return got / (perf_counter() - start)


async def rpc_sink(conn: Connection, size: int, count: int) -> float:
    payload = b"x" * size
    start = perf_counter()
    async with conn.bootstrap().sink("absorb") as tx:
        for _ in range(count):
            await tx.send(payload)
    assert tx.result == count, tx.result
    return count / (perf_counter() - start)


async def rpc_stream(conn: Connection, size: int, count: int) -> float:
    start = perf_counter()
    n = 0
    async with conn.bootstrap().stream("produce", size, count, window=64) as items:
        async for _ in items:
            n += 1
    assert n == count
    return n / (perf_counter() - start)


async def rpc_rtt(conn: Connection, size: int, count: int) -> list[float]:
    ref = conn.bootstrap()
    payload = b"x" * size
    times = []
    for _ in range(count):
        t = perf_counter()
        await ref.echo(payload)
        times.append(perf_counter() - t)
    return times


async def tcp_one_way(stream: trio.SocketStream, size: int, count: int) -> float:
    frame = _LEN.pack(size) + b"S" + b"x" * (size - 1)
    start = perf_counter()
    for _ in range(count):
        await stream.send_all(frame)
    await stream.send_all(_LEN.pack(1) + b"F")
    reply = await receive_exactly(stream, 12)
    assert int.from_bytes(reply[4:], "big") == count
    return count / (perf_counter() - start)


async def tcp_rtt(stream: trio.SocketStream, size: int, count: int) -> list[float]:
    frame = _LEN.pack(size) + b"E" + b"x" * (size - 1)
    times = []
    for _ in range(count):
        t = perf_counter()
        await stream.send_all(frame)
        await receive_exactly(stream, len(frame))
        times.append(perf_counter() - t)
    return times


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError("peer closed")
        buf += data
    return buf


def pct(times: list[float], p: float) -> float:
    times = sorted(times)
    return times[min(len(times) - 1, int(p * len(times)))] * 1e6


async def run(args: argparse.Namespace) -> None:
    key = None
    tls_args: list[str] = []
    key_dir = tempfile.mkdtemp(prefix="rpc-raw-")
    if args.tls:
        key = generate_cluster_key(os.path.join(key_dir, "cluster.key"))
        tls_args = ["--key", str(key.path)]
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", *tls_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = await trio.to_thread.run_sync(child.stdout.readline)
        rpc_port, tcp_port = map(int, line.split())
        print(
            f"rpc_raw: {os.cpu_count()} cpus, python {sys.version.split()[0]}, "
            f"trio {trio.__version__}"
        )
        print(
            f"count {args.count}, inflight {args.inflight}, rtt-count {args.rtt_count}, "
            f"repeat {args.repeat}"
        )
        print(f"rpc transport: {'mutual TLS 1.3' if key else 'plain TCP'}; bare peer: plain TCP")
        rpc_stream_ = await open_client_stream(HOST, rpc_port, cluster_key=key)
        tcp = await trio.open_tcp_stream(HOST, tcp_port)
        async with rpc_stream_, tcp, Connection.open(rpc_stream_) as conn:
            for size in SIZES:
                count = args.count if size <= 1000 else max(1000, args.count // 5)
                calls, sinks, streams, tcps, rtts, tcp_rtts = [], [], [], [], [], []
                for _ in range(args.repeat):
                    calls.append(await rpc_one_way(conn, size, count, args.inflight))
                    sinks.append(await rpc_sink(conn, size, count))
                    streams.append(await rpc_stream(conn, size, count))
                    tcps.append(await tcp_one_way(tcp, size, count))
                    rtts += await rpc_rtt(conn, size, args.rtt_count)
                    tcp_rtts += await tcp_rtt(tcp, size, args.rtt_count)
                c, k, s, t = (statistics.median(x) for x in (calls, sinks, streams, tcps))
                print(f"\n{size} B payloads ({count} messages)")
                print(f"  one way  rpc calls {c:>10,.0f} msg/s   ratio to tcp {c / t:.2f}")
                print(f"  one way  rpc sink  {k:>10,.0f} msg/s   ratio to tcp {k / t:.2f}")
                print(f"  one way  rpc stream{s:>10,.0f} msg/s   ratio to tcp {s / t:.2f}")
                print(f"  one way  bare tcp  {t:>10,.0f} msg/s")
                print(
                    f"  round trip rpc  p50 {pct(rtts, 0.5):7.1f} us  p99 {pct(rtts, 0.99):7.1f} us"
                    f"   ratio to tcp (p50) {pct(rtts, 0.5) / pct(tcp_rtts, 0.5):.2f}"
                )
                print(
                    f"  round trip tcp  p50 {pct(tcp_rtts, 0.5):7.1f} us  "
                    f"p99 {pct(tcp_rtts, 0.99):7.1f} us"
                )
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=10)
        shutil.rmtree(key_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rtt-count", type=int, default=3_000)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="run the RPC over mutual TLS")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.key)
    else:
        trio.run(run, args)


if __name__ == "__main__":
    main()
