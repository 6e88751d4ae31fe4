"""Throughput and round-trip latency through a ww channel, against a bare trio TCP echo.

    python benchmarks/ww_rpc.py [--count 20000] [--rtt-count 1000] [--inflight 64] [--repeat 3]

ww: two hosts (`ww start`, two processes on loopback, joined into one cluster). A ROM process
spawned on host B makes two channels, hangs them at `/<B>/bench/{in,out}` and serves them: it
counts what arrives on `in` and, when asked, echoes to `out` (through the channel's
`send_stream` sink). A second ROM process spawned on host A reaches them in two ways:

  - dialed: it dials host B (`ww.dial`) and walks B's anchor tree over that connection, so a
    message goes ROM A -> host B -> ROM B (and back for a round trip);
  - relayed: it walks `/<B>/bench/...` in its own host's tree, so host A relays every message:
    ROM A -> host A -> host B -> ROM B.

Measured each way:

  - one way: `--count` messages of 100 bytes (a tenth as many, at least 1000, of 10 KB) pushed
    into the `in` channel's `send_stream` sink, then a flush that the server answers with the
    count it saw. msgs/s is the count over the time from the first push to the answer.
  - round trip: `--rtt-count` echoes one at a time (unloaded); p50 and p99.
  - one send call each (dialed only): one way again with one `send` call per message and
    `--inflight` calls at once, each waiting for its answer.
  - CPU: microseconds of CPU (user + system) per message (one way) or per round trip in each
    of the four processes, which says where the time goes however busy the machine is.
    `--profile DIR` also runs both hosts under cProfile (CPU time) for a closer look.

Bare TCP: the same measurements, same framing tags, against a trio TCP server in a child process
(a 4-byte length prefix per message, one `send_all` per message, from one task).

Medians of `--repeat` runs are printed with the ratio ww (dialed) / TCP. Everything is started
and stopped by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import trio
from raft_throughput import process_cpu

HOST = "127.0.0.1"
SIZES = (100, 10_000)
LISTENING = re.compile(r"listening on (\S+):(\d+)")

# Tags: the first byte of a message says what the server does with it.
SINK, ECHO, FLUSH = b"S", b"E", b"F"

# -- the ROM that runs on both hosts ------------------------------------------------------------

ROM_TOML = """\
name = "bench-rpc"
version = "0.1.0"
entry = "bench:main"
requires = ["trio"]
"""

ROM_SOURCE = r'''
"""serve: make channels at /<me>/bench/{in,out} and serve them.
oneway|calls|rtt dial|relay PEER SIZE COUNT INFLIGHT: measure against PEER's server, over a
connection of our own to PEER (dial) or through our host (relay); print JSON."""

import json
import statistics
import time
from contextlib import asynccontextmanager
from time import perf_counter

import trio
from ww.dial import dial

SINK, ECHO, FLUSH = b"S", b"E", b"F"


async def main(host, args):
    if args[0] == "serve":
        await serve(host, int(args[1]))
    else:
        async with route(host, args[1], args[2]) as far:
            await drive(far, args[0], args[2], *map(int, args[3:6]))


@asynccontextmanager
async def route(host, how, peer):
    if how == "dial":
        async with dial(host, peer) as far:
            yield far
    else:
        yield host


async def serve(host, capacity):
    me = await host.id()
    root = await host.root()
    inbox = await host.channel(capacity)
    outbox = await host.channel(capacity)
    await (await root.walk(f"/{me}/bench/out")).store(outbox)
    await (await root.walk(f"/{me}/bench/in")).store(inbox)
    ready = await (await root.walk(f"/{me}/bench/ready")).load()
    await ready.send(b"ready")
    seen = 0
    async with (
        inbox.stream("recv_stream", window=256) as messages,
        outbox.sink("send_stream") as replies,
    ):
        async for message in messages:
            tag = message[:1]
            if tag == SINK:
                seen += 1
            elif tag == ECHO:
                await replies.send(message)
            elif tag == FLUSH:
                await replies.send(str(seen).encode())
                seen = 0


async def drive(host, mode, peer, size, count, inflight):
    root = await host.root()
    inbox = await (await root.walk(f"/{peer}/bench/in")).load()
    outbox = await (await root.walk(f"/{peer}/bench/out")).load()
    async with (
        outbox.stream("recv_stream") as replies,
        inbox.sink("send_stream") as tx,
    ):
        replies = replies.__aiter__()
        cpu = time.process_time()
        if mode == "oneway":  # pushed into the channel's sink
            payload = SINK + bytes(size - 1)
            start = perf_counter()
            for _ in range(count):
                await tx.send(payload)
            await tx.send(FLUSH)
            seen = int(await replies.__anext__())
            result = {"msgs_per_s": count / (perf_counter() - start)}
        elif mode == "calls":  # one `send` call per message, `inflight` at once
            payload = SINK + bytes(size - 1)
            start = perf_counter()
            remaining = count

            async def sender():
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await inbox.send(payload)

            async with trio.open_nursery() as nursery:
                for _ in range(inflight):
                    nursery.start_soon(sender)
            await inbox.send(FLUSH)
            seen = int(await replies.__anext__())
            result = {"calls_msgs_per_s": count / (perf_counter() - start)}
        else:
            echo = ECHO + bytes(size - 1)
            rtts = []
            for _ in range(count):
                t0 = perf_counter()
                await tx.send(echo)
                reply = await replies.__anext__()
                rtts.append(perf_counter() - t0)
                assert len(reply) == size
            rtts.sort()
            seen = count
            result = {
                "p50_ms": statistics.median(rtts) * 1e3,
                "p99_ms": rtts[int(len(rtts) * 0.99) - 1] * 1e3,
            }
        assert seen == count, (seen, count)
        result["cpu_s"] = time.process_time() - cpu
    print(json.dumps(result))
'''


# -- ww: two hosts, two ROM processes -----------------------------------------------------------


@dataclass(slots=True)
class HostProcess:
    address: tuple[str, int]
    pid: int


@asynccontextmanager
async def host_process(
    tmp: Path, name: str, peers: list[str], profile: Path | None = None
) -> AsyncIterator[HostProcess]:
    """A `ww start` child process on a free port; yields it once it is listening."""
    argv = [sys.executable, "-m", "ww"]
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, __file__, "--profiled-host", str(profile / f"host-{name}.prof")]
    argv += ["start", "--listen", f"{HOST}:0"]
    argv += ["--data-dir", str(tmp / name)]
    for peer in peers:
        argv += ["--peer", peer]
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        seen = b""
        with trio.fail_after(20):
            while (match := LISTENING.search(seen.decode(errors="replace"))) is None:
                chunk = await proc.stderr.receive_some()
                if not chunk:
                    raise RuntimeError(f"host {name} exited:\n{seen.decode(errors='replace')}")
                seen += chunk
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, proc.stderr)
            yield HostProcess((match.group(1), int(match.group(2))), proc.pid)
            proc.terminate()
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            await proc.wait()


async def drain(stream: trio.abc.ReceiveStream) -> None:
    async for _ in stream:
        pass


@asynccontextmanager
async def client(address: tuple[str, int]) -> AsyncIterator[Any]:
    from ww.auth import open_client_stream
    from ww.rpc import Connection

    stream = await open_client_stream(*address)
    async with stream, Connection.open(stream) as conn:
        yield conn.bootstrap()


async def bench_ww(args: argparse.Namespace) -> dict[int, list[dict[str, float]]]:
    from ww.rom import build_rom

    results: dict[int, list[dict[str, float]]] = {size: [] for size in SIZES}
    with tempfile.TemporaryDirectory(prefix="ww-bench-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "rom"
        src.mkdir()
        (src / "rom.toml").write_text(ROM_TOML)
        (src / "bench.py").write_text(ROM_SOURCE)
        rom = build_rom(src)
        async with host_process(tmp, "a", [], args.profile) as a:  # noqa: SIM117 (b needs a)
            async with (
                host_process(tmp, "b", [f"{a.address[0]}:{a.address[1]}"], args.profile) as b,
                client(a.address) as host_a,
                client(b.address) as host_b,
            ):
                view_a = await host_a.view()
                with trio.fail_after(20):  # membership is gossip: wait for it to converge
                    while len(await view_a.hosts()) < 2:
                        await trio.sleep(0.05)
                for _ in range(args.repeat):
                    for size in SIZES:
                        result = await one_ww_run(a, b, host_a, host_b, rom, size, args)
                        results[size].append(result)
                        print(f"  ww  {size:>6} B: {fmt(result)}", flush=True)
                        print(f"  relayed {size:>6} B: {fmt(result, 'relay ')}", flush=True)
    return results


async def one_ww_run(
    a: HostProcess,
    b: HostProcess,
    host_a: Any,
    host_b: Any,
    rom: bytes,
    size: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Serve on B, then drive from A: one way, then round trips. CPU per message per process."""
    peer_b = await host_b.id()
    ready = await host_b.channel(1)
    async with ready:
        await (await (await host_b.root()).walk(f"/{peer_b}/bench/ready")).store(ready)
        server = await host_b.spawn(rom, ["serve", str(args.capacity)])
        with trio.fail_after(20):
            await ready.recv()
    server_pid = (await server.info())["pid"]
    count = args.count if size < 1000 else max(args.count // 10, 1000)
    result: dict[str, float] = {}
    runs = [("oneway", "dial", count), ("rtt", "dial", args.rtt_count)]
    runs += [("oneway", "relay", count), ("rtt", "relay", args.rtt_count)]
    if args.inflight:
        runs.append(("calls", "dial", count))
    for mode, how, n in runs:
        pids = {"host A": a.pid, "host B": b.pid, "ROM B": server_pid}
        # A ROM's process runs below two waiters of its own: count the whole tree of ROM B.
        before = {name: process_cpu(pid, tree=name == "ROM B") for name, pid in pids.items()}
        params = [mode, how, peer_b, *map(str, (size, n, args.inflight))]
        driver = await host_a.spawn(rom, params)
        code = await driver.wait()
        after = {name: process_cpu(pid, tree=name == "ROM B") for name, pid in pids.items()}
        out = (await host_a.logs((await driver.info())["pid"])).decode(errors="replace")
        if code != 0:
            raise RuntimeError(f"driver ROM exited with {code}:\n{out}")
        measured = json.loads(out.strip().splitlines()[-1])
        cpu = {"ROM A": measured.pop("cpu_s")} | {k: after[k] - before[k] for k in pids}
        prefix = "" if how == "dial" else "relay "
        result |= {prefix + k: v for k, v in measured.items()}
        result |= {f"{prefix}{mode} cpu_us {k}": v / n * 1e6 for k, v in cpu.items()}
    await server.kill()
    await server.wait()
    return result


# -- bare trio TCP ------------------------------------------------------------------------------

LEN = struct.Struct(">I")


async def read_frames(stream: trio.SocketStream) -> AsyncIterator[bytes]:
    buf = bytearray()
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 4:
            (n,) = LEN.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            yield bytes(buf[4 : 4 + n])
            del buf[: 4 + n]


async def tcp_server() -> None:
    """The baseline peer (a child process): sink, echo or flush each framed message."""

    async def handle(stream: trio.SocketStream) -> None:
        seen = 0
        async for message in read_frames(stream):
            tag = message[:1]
            if tag == SINK:
                seen += 1
            elif tag == ECHO:
                await stream.send_all(LEN.pack(len(message)) + message)
            elif tag == FLUSH:
                reply = str(seen).encode()
                await stream.send_all(LEN.pack(len(reply)) + reply)
                seen = 0

    listeners = await trio.open_tcp_listeners(0, host=HOST)
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)


async def one_tcp_run(port: int, size: int, args: argparse.Namespace) -> dict[str, float]:
    count = args.count if size < 1000 else max(args.count // 10, 1000)
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        replies = read_frames(stream).__aiter__()
        payload = SINK + bytes(size - 1)
        frame = LEN.pack(len(payload)) + payload
        start = perf_counter()
        for _ in range(count):
            await stream.send_all(frame)
        await stream.send_all(LEN.pack(1) + FLUSH)
        seen = int(await replies.__anext__())
        elapsed = perf_counter() - start
        assert seen == count, (seen, count)
        echo = ECHO + bytes(size - 1)
        echo_frame = LEN.pack(len(echo)) + echo
        rtts = []
        for _ in range(args.rtt_count):
            t0 = perf_counter()
            await stream.send_all(echo_frame)
            await replies.__anext__()
            rtts.append(perf_counter() - t0)
    rtts.sort()
    return {
        "size": size,
        "msgs_per_s": count / elapsed,
        "p50_ms": statistics.median(rtts) * 1e3,
        "p99_ms": rtts[int(len(rtts) * 0.99) - 1] * 1e3,
    }


async def bench_tcp(args: argparse.Namespace) -> dict[int, list[dict[str, float]]]:
    results: dict[int, list[dict[str, float]]] = {size: [] for size in SIZES}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--tcp-server"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(args.repeat):
            for size in SIZES:
                results[size].append(await one_tcp_run(port, size, args))
                print(f"  tcp {size:>6} B: {fmt(results[size][-1])}", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    return results


# -- report -------------------------------------------------------------------------------------


def fmt_cpu(r: dict[str, float], mode: str = "oneway") -> str:
    """CPU microseconds per message (one way) or per round trip (rtt) in each process.

    A round trip is sequential, so on an idle machine its latency is at least the sum."""
    prefix = f"{mode} cpu_us "
    cpu = {k.removeprefix(prefix): v for k, v in r.items() if k.startswith(prefix)}
    unit = "round trip" if mode.endswith("rtt") else "msg one way"
    parts = ", ".join(f"{name} {v:.0f}" for name, v in cpu.items())
    return f"cpu us/{unit}: {parts} (sum {sum(cpu.values()):.0f})"


def fmt(r: dict[str, float], prefix: str = "") -> str:
    text = (
        f"{r[prefix + 'msgs_per_s']:>9,.0f} msgs/s one way   "
        f"rtt p50 {r[prefix + 'p50_ms']:.3f} ms  p99 {r[prefix + 'p99_ms']:.3f} ms"
    )
    if prefix + "calls_msgs_per_s" in r:
        text += f"   one send call each {r['calls_msgs_per_s']:,.0f} msgs/s"
    return text


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


async def run(args: argparse.Namespace) -> None:
    print(
        f"ww_rpc: {os.cpu_count()} cpus, python {sys.version.split()[0]}, trio {trio.__version__}"
    )
    load_before = os.getloadavg()[0]
    tcp = await bench_tcp(args)
    ww = await bench_ww(args)
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"\nmedians of {args.repeat} runs (ww / tcp), {load}:")
    for size in SIZES:
        w, t = median_of(ww[size]), median_of(tcp[size])
        print(f"{size:>6} B  ww  {fmt(w)}")
        print(f"{size:>6} B      {fmt_cpu(w)}")
        print(f"{size:>6} B      {fmt_cpu(w, 'rtt')}")
        print(f"{size:>6} B  ww relayed through host A: {fmt(w, 'relay ')}")
        print(f"{size:>6} B      {fmt_cpu(w, 'relay oneway')}")
        print(f"{size:>6} B      {fmt_cpu(w, 'relay rtt')}")
        print(f"{size:>6} B  tcp {fmt(t)}")
        print(
            f"{size:>6} B  ratio: throughput {w['msgs_per_s'] / t['msgs_per_s']:.3f}, "
            f"rtt p50 {w['p50_ms'] / t['p50_ms']:.1f}x"
        )


def profiled_host(out: Path, ww_args: list[str]) -> None:
    """`ww ARGS` under cProfile counting CPU time (not time spent waiting for the CPU)."""
    import cProfile
    import time

    from ww.cli import main as ww_main

    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        ww_main(ww_args)
    finally:
        profile.disable()
        profile.dump_stats(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="small messages per one-way run")
    parser.add_argument("--rtt-count", type=int, default=1_000, help="round trips per run")
    parser.add_argument(
        "--inflight",
        type=int,
        default=64,
        help="also run one way with one `send` call per message, this many at once (0: skip)",
    )
    parser.add_argument("--capacity", type=int, default=1024, help="channel buffer")
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians are reported")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the hosts under cProfile (CPU time) and write DIR/host-{a,b}.prof",
    )
    parser.add_argument("--tcp-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profiled-host", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.profiled_host:
        profiled_host(args.profiled_host, rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.tcp_server:
        trio.run(tcp_server)
    else:
        trio.run(run, args)


if __name__ == "__main__":
    main()
