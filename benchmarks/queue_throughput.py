"""Throughput of the replicated queue: the Raft ROM on three ww hosts, against the same replica
over ww.raft with the plain TCP transport of benchmarks/.

    python benchmarks/queue_throughput.py [--duration 10] [--repeat 3] [--claim-batch 1,16]
    python benchmarks/queue_throughput.py --scale [--keys 1000000]

ww: three `ww start` hosts on loopback, `ww run roms/raft start` (fsync on). The client (this
process) connects to the leader's host and calls the leader's `request` capability there
(client -> host -> replica ROM), following the leader if it changes. TCP: three
`_queue_node.py` processes (the same DiskStorage, RaftDriver, QueueState and commit policy)
with the TCP transport and client protocol of `_tcp_transport.py`; the client talks to the
leader's client port (a leader change there voids the run).

Workloads, each on a fresh group, each client with its own session (client id, sequence,
ack), for `--duration` seconds after a warm-up:

  - put: `--workers` clients putting batches of `--batch` items of 100 bytes with unique keys;
    items/s.
  - cycleB (one per `--claim-batch` B): clients (`--consumers` for B = 1, else
    `--batch-consumers`) claim B items, then complete them all in one command with a 2 KB
    result each appended to a log topic and 10 new 100-byte items each; completed items
    (cycles)/s.

Printed: the rate, the CPU (user + system) of the replica processes per item or cycle (for ww
the hosts and the replica ROMs), the load average, the medians of the runs and ww / TCP.

--scale (ww only, a fourth host spare): put and cycle rates on the empty queue, then after
`--keys` more unique keys, the peak RSS of each replica process, and how long `add` of a
replica on the fourth host takes (it returns once the replica has caught up), and whether it
caught up by snapshot.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio
from raft_throughput import (
    NODE_SCRIPT_OVERRIDE,
    ClientConnection,
    cluster,
    find_leader,
    process_cpu,
    process_tree,
    run_bounded,
)

from ww.queue.commands import Command, Item

HERE = Path(__file__).resolve().parent
ROM = HERE.parent / "roms" / "raft"
LISTENING = re.compile(r"host (\S+) listening on (\S+?):(\d+)\b")
RESULT = b"r" * 2048

RUN = (sys.executable, "-m", "ww", "run")

Submit = Callable[[bytes], Awaitable[dict[str, Any]]]


# -- the two systems ---------------------------------------------------------------------------


@dataclass(slots=True)
class System:
    name: str
    submit: Submit
    pids: list[int]
    rom_pids: list[int] = field(default_factory=list)
    hosts: list[tuple[str, str]] = field(default_factory=list)  # (peer, address), spares last
    tmp: Path | None = None
    elections: list[int] = field(default_factory=lambda: [0])  # requests sent to a new leader


async def _start_host(tmp: Path, name: str, peer: str | None) -> tuple[trio.Process, str, str]:
    argv = [sys.executable, "-m", "ww", "start", "--listen", "127.0.0.1:0"]
    argv += ["--data-dir", str(tmp / name), "--ttl", "3", "--heartbeat", "0.5"]
    if peer:
        argv += ["--peer", peer]
    log = open(tmp / f"{name}.log", "wb+")  # noqa: SIM115 (kept open while the host runs)
    proc = await trio.lowlevel.open_process(argv, stdout=log, stderr=log)
    with trio.fail_after(20):
        while True:
            await trio.sleep(0.1)
            log.seek(0)
            if m := LISTENING.search(log.read().decode(errors="replace")):
                return proc, m[1], f"{m[2]}:{m[3]}"


async def _open(addr: str) -> trio.SocketStream:
    host, port = addr.rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


@asynccontextmanager
async def ww_system(spare: int = 0, options: tuple[str, ...] = ()) -> AsyncIterator[System]:
    """Three hosts with the Raft ROM (`options` go to `start`), and `spare` hosts more."""
    from ww.rpc import Connection

    tmp = Path(tempfile.mkdtemp(prefix="queuebench-ww-"))
    procs: list[trio.Process] = []
    try:
        hosts = []
        for i in range(3 + spare):
            proc, peer, addr = await _start_host(tmp, f"h{i}", hosts[0][1] if hosts else None)
            procs.append(proc)
            hosts.append((peer, addr))
        await trio.sleep(2.0)  # the views fill
        members = ",".join(peer for peer, _ in hosts[:3])
        started = await trio.run_process(
            [*RUN, "--dial", hosts[0][1], str(ROM), "start", "--hosts", members, *options],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if started.returncode != 0:
            raise RuntimeError(f"raft start failed: {started.stderr.decode()}")
        leader = re.findall(r"^leader (\S+)", started.stdout.decode(), re.M)[0]
        addr = dict(hosts)[leader]
        stream = await _open(addr)
        async with stream, Connection.open(stream) as conn:
            host = conn.bootstrap()
            request = await (await (await host.root()).walk(f"/{leader}/raft/v1/request")).load()
            rom_pids = []
            for _, a in hosts:
                s2 = await _open(a)
                async with s2, Connection.open(s2) as c2:
                    rom_pids += [p["pid"] for p in await c2.bootstrap().ps()]

            current = [request]
            elections = [0]

            async def submit(data: bytes) -> dict[str, Any]:
                """The leader's answer; after a leader change the same bytes go to the new
                leader (the session makes a repeat take effect once)."""
                with trio.fail_after(30):
                    while True:
                        ref = current[0]
                        answer: dict[str, Any] = await ref.submit(data)
                        if not answer.get("retry"):
                            return answer
                        await trio.sleep(0.1)
                        if ref is current[0] and isinstance(answer.get("leader"), str):
                            root = await host.root()
                            path = f"/{answer['leader']}/raft/v1/request"
                            current[0] = await (await root.walk(path)).load()
                            elections[0] += 1

            pids = [p.pid for p in procs]  # each host's process tree holds its replica ROM
            yield System("ww", submit, pids, rom_pids, hosts, tmp, elections)
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                proc.terminate()
            for proc in procs:
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
            shutil.rmtree(tmp, ignore_errors=True)


class _Pipelined:
    """Many tasks' requests over one pipelined client connection."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.lock = trio.Lock()
        self.waiting: dict[int, tuple[trio.Event, list[Any]]] = {}

    async def read(self) -> None:
        while True:
            for rid, code, value in await self.conn.replies():
                event, slot = self.waiting.pop(rid)
                slot.append((code, value))
                event.set()

    async def submit(self, data: bytes) -> dict[str, Any]:
        rid = self.conn.next_rid()
        event, slot = trio.Event(), []  # type: ignore[var-annotated]
        self.waiting[rid] = (event, slot)
        async with self.lock:
            await self.conn.stream.send_all(msgpack.packb([rid, "put", data]))
        await event.wait()
        code, value = slot[0]
        if code != "ok":
            return {"error": f"{code}: {value}"}
        return value  # type: ignore[no-any-return]


@asynccontextmanager
async def tcp_system() -> AsyncIterator[System]:
    os.environ[NODE_SCRIPT_OVERRIDE] = str(HERE / "_queue_node.py")
    async with cluster("ww.raft") as c:
        leader = await find_leader(c)
        conn = await ClientConnection.connect(leader.client_address)
        pipe = _Pipelined(conn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe.read)
            yield System("tcp", pipe.submit, [n.proc.pid for n in c.nodes.values()])
            nursery.cancel_scope.cancel()
        await conn.aclose()


# -- the workloads -----------------------------------------------------------------------------


class Session:
    def __init__(self, submit: Submit) -> None:
        self.submit_raw = submit
        self.client = uuid.uuid4().hex
        self.seq = 0

    async def __call__(self, command: Command) -> dict[str, Any]:
        self.seq += 1
        answer = await self.submit_raw(
            command.encode(client=self.client, seq=self.seq, ack=self.seq - 1)
        )
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer


_unique = iter(range(1 << 62))


def items(n: int, size: int = 100) -> list[Item]:
    out = []
    for _ in range(n):
        key = f"k{next(_unique)}"
        out.append(Item(key.encode().ljust(size, b"."), key=key))
    return out


@dataclass(slots=True)
class Result:
    system: str
    workload: str
    count: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / max(1, self.count) * 1e6


async def measure(system: System, workload: str, args: argparse.Namespace) -> Result:
    counted = [0]
    start = trio.current_time() + args.warmup
    end = start + args.duration

    def count(n: int) -> None:
        if trio.current_time() >= start:
            counted[0] += n

    async def put_worker() -> None:
        session = Session(system.submit)
        while True:
            answer = await session(Command.put("bench", items(args.batch)))
            count(answer["added"])

    async def cycle_worker(i: int, batch: int) -> None:
        session = Session(system.submit)
        consumer = f"c{i}-{session.client[:6]}"
        while True:
            claimed = (await session(Command.claim("work", consumer, batch, 60.0)))["items"]
            if not claimed:
                await trio.sleep(0.01)
                continue
            n = len(claimed)
            await session(
                Command.complete(
                    consumer,
                    [item["id"] for item in claimed],
                    append={"results": [RESULT] * n},
                    put={"work": items(10 * n)},
                )
            )
            count(n)

    batch = int(workload[5:] or 1) if workload.startswith("cycle") else 0
    if batch:
        setup = Session(system.submit)
        await setup(Command.create("results", kind="log"))
        for _ in range(4):
            await setup(Command.put("work", items(500)))

    cpu0 = [0.0]

    async def mark_start() -> None:
        await trio.sleep_until(start)
        cpu0[0] = sum(process_cpu(p, tree=True) for p in system.pids)

    with trio.move_on_at(end):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mark_start)
            if workload == "put":
                for _ in range(args.workers):
                    nursery.start_soon(put_worker)
            else:
                for i in range(args.consumers if batch == 1 else args.batch_consumers):
                    nursery.start_soon(cycle_worker, i, batch)
    cpu = sum(process_cpu(p, tree=True) for p in system.pids) - cpu0[0]
    seconds = trio.current_time() - start
    return Result(system.name, workload, counted[0], seconds, cpu)


# -- main --------------------------------------------------------------------------------------


def workloads(args: argparse.Namespace) -> list[str]:
    return ["put"] + [f"cycle{b}" for b in args.claim_batch]


async def run(args: argparse.Namespace) -> None:
    print(f"load average {os.getloadavg()[0]:.1f} at the start; {os.cpu_count()} CPUs")
    results: dict[tuple[str, str], list[Result]] = {}
    systems = {"ww": ww_system, "tcp": tcp_system}
    for _ in range(args.repeat):
        for name in args.systems:
            for workload in workloads(args):
                failed: list[BaseException] = []
                try:
                    async with systems[name]() as system:
                        r = await measure(system, workload, args)
                        elections = system.elections[0]
                except* (RuntimeError, TimeoutError) as group:  # no leader answered: void
                    failed.extend(group.exceptions)
                if failed:
                    print(f"{name:>3} {workload:<7} failed: {failed[0]}", flush=True)
                    continue
                results.setdefault((name, workload), []).append(r)
                unit = "items" if workload == "put" else "cycles"
                print(
                    f"{name:>3} {workload:<7} {r.rate:>9,.0f} {unit}/s  "
                    f"{r.cpu_us:>6.0f} µs CPU per {unit[:-1]}  "
                    f"(load {os.getloadavg()[0]:.1f}"
                    f"{f'; {elections} requests redirected to a new leader' if elections else ''})",
                    flush=True,
                )
    print(f"\nmedians of the runs that completed (of {args.repeat}):")
    for workload in workloads(args):
        if not all((name, workload) in results for name in args.systems):
            continue
        unit, target = ("items", 50_000) if workload == "put" else ("cycles", 3_000)
        line = [f"{workload:<7}"]
        for name in args.systems:
            rate = statistics.median(r.rate for r in results[(name, workload)])
            cpu = statistics.median(r.cpu_us for r in results[(name, workload)])
            line.append(f"{name} {rate:,.0f} {unit}/s ({cpu:.0f} µs CPU each)")
        if len(args.systems) == 2:
            a, b = (statistics.median(r.rate for r in results[(n, workload)]) for n in args.systems)
            line.append(f"{args.systems[0]}/{args.systems[1]} {a / b:.2f}")
        line.append(f"target {target:,}")
        print(", ".join(line))


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size in MB of the largest process of `pid`'s tree (for a
    ROM, the ROM's own process, below its two small waiters), from /proc."""
    sizes = []
    for member in process_tree(pid):
        fields = {}
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value
        sizes.append(
            (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)
        )
    return max(sizes, key=lambda size: size[1])


async def fill(system: System, keys: int, workers: int = 8, batch: int = 1000) -> None:
    """Put 100-byte items with unique keys until `keys` were added."""
    added = [0]

    async def worker() -> None:
        session = Session(system.submit)
        while added[0] < keys:
            answer = await session(Command.put("bench", items(batch)))
            added[0] += answer["added"]

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)


async def scale(args: argparse.Namespace) -> None:
    """Empty queue, then `--keys` unique keys: put and claim+complete rates, RSS per replica,
    and the time a new replica on a fourth host takes to catch up (by snapshot)."""
    print(f"load average {os.getloadavg()[0]:.1f} at the start; {os.cpu_count()} CPUs")
    cycle = f"cycle{args.claim_batch[-1]}"
    options = ("--snapshot-interval", str(args.snapshot_interval))
    async with ww_system(spare=1, options=options) as system:
        assert system.tmp is not None
        rates: dict[str, list[Result]] = {}
        for label in ("empty", "full"):
            if label == "full":
                start = trio.current_time()
                await fill(system, args.keys)
                print(f"put {args.keys:,} more keys in {trio.current_time() - start:.0f} s")
            for workload in ("put", cycle):
                r = await measure(system, workload, args)
                rates.setdefault(workload, []).append(r)
                unit = "items" if workload == "put" else "cycles"
                print(
                    f"{label:<5} {workload:<7} {r.rate:>9,.0f} {unit}/s  {r.cpu_us:>6.0f} µs CPU "
                    f"per {unit[:-1]}  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        if system.elections[0]:
            print(f"({system.elections[0]} requests were redirected to a new leader)")
        peer, _ = system.hosts[3]
        start = trio.current_time()
        added = await trio.run_process(
            [*RUN, "--dial", system.hosts[0][1], str(ROM), "add", peer],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        catch_up = trio.current_time() - start
        if added.returncode != 0:
            print(f"add failed: {added.stderr.decode().strip()}")
        by_snapshot = any((system.tmp / "h3").rglob("snapshots/snap-*.db"))
        peaks = [rss_mb(pid)[1] for pid in system.rom_pids]
        db = sum(f.stat().st_size for f in (system.tmp / "h0").rglob("queue.db*"))
    print()
    for workload, (empty, full) in rates.items():
        print(
            f"{workload:<7} over {args.keys:,} keys: {full.rate:,.0f}/s "
            f"({full.cpu_us:.0f} µs CPU), empty {empty.rate:,.0f}/s "
            f"({empty.cpu_us:.0f} µs CPU): rate ratio "
            f"{empty.rate / full.rate:.2f}, CPU ratio {full.cpu_us / empty.cpu_us:.2f} "
            "(target: within 2x)"
        )
    print(
        f"peak RSS per replica: {', '.join(f'{p:.0f}' for p in peaks)} MB (target <= 300 MB); "
        f"database {db / 1e6:.0f} MB"
    )
    print(
        f"new replica caught up in {catch_up:.1f} s "
        f"({'by snapshot' if by_snapshot else 'without a snapshot'}; target < 30 s)"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workers", type=int, default=16, help="concurrent clients putting")
    p.add_argument("--consumers", type=int, default=64, help="concurrent clients claiming")
    p.add_argument("--batch", type=int, default=500, help="items per put")
    p.add_argument(
        "--claim-batch",
        type=lambda v: [int(b) for b in v.split(",")],
        default=[1, 16],
        help="items claimed and completed per command, one cycle workload each (1,16)",
    )
    p.add_argument(
        "--batch-consumers",
        type=int,
        default=16,
        help="concurrent clients claiming when the claim batch is over 1",
    )
    p.add_argument("--systems", type=lambda v: v.split(","), default=["ww", "tcp"], help="ww,tcp")
    p.add_argument(
        "--scale",
        action="store_true",
        help="ww only: rates empty and at --keys keys, RSS per replica, catch-up by snapshot",
    )
    p.add_argument("--keys", type=int, default=1_000_000, help="keys for --scale")
    p.add_argument(
        "--snapshot-interval",
        type=int,
        default=10_000,
        help="the replicas' snapshot interval in entries (for --scale; they also snapshot "
        "every 16 MiB of entries)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.scale:
        budget = 4 * (args.duration + args.warmup) + args.keys / 2000 + 300
        run_bounded(lambda: scale(args), budget)
        return
    runs = args.repeat * len(args.systems) * len(workloads(args))
    budget = runs * (args.duration + args.warmup + 40) + 60
    run_bounded(lambda: run(args), budget)


if __name__ == "__main__":
    sys.exit(main())
