"""The replicated queue on Raft, from any machine that can dial one host.

    ww run roms/raft start [--replicas 3] [--hosts ID,...]   spawn the replicas (once)
    ww run roms/raft status                                 members, leader, term, lag
    ww run roms/raft put TOPIC ITEM... [--key]              ITEMs as payloads (--key: unique)
    ww run roms/raft claim TOPIC [--max N] [--lease S]      print the claimed items
    ww run roms/raft complete ID...                         acknowledge claimed items
    ww run roms/raft stats [TOPIC]                          one topic, or every topic
    ww run roms/raft add HOST | remove HOST | transfer HOST  change the group
    ww run roms/raft stop                                   stop every replica (data stays)

`start` spawns this ROM's inner replica ROM at `/<peer id>/raft/v1` on each chosen host with a
durable volume and restart="on-failure", so a crashed replica, or its restarted host, comes
back on its data. Run again, it reports the group that exists.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from ww.queue.client import Item, QueueClient, QueueError
from ww.queue.replica import GROUP
from ww.rom.guest import rom_data

CONSUMER = "cli"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ww run roms/raft", exit_on_error=False)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="spawn the replicas on distinct hosts")
    s.add_argument("--replicas", type=int, default=3)
    s.add_argument("--hosts", default="", help="comma-separated peer ids (default: from the view)")
    s.add_argument("--tick", type=float, default=None, help="seconds per Raft tick")
    s.add_argument("--election-ticks", type=int, default=None)
    s.add_argument("--clock", type=float, default=None, help="seconds between lease ticks")
    s.add_argument("--snapshot-interval", type=int, default=None)
    s.add_argument("--no-fsync", action="store_true", help="for experiments only")
    sub.add_parser("status", help="members, leader, term, commit, applied, lag")
    s = sub.add_parser("put", help="put items (their text as payload)")
    s.add_argument("topic")
    s.add_argument("items", nargs="+")
    s.add_argument("--key", action="store_true", help="each item is also its unique key")
    s = sub.add_parser("claim", help="claim items and print them")
    s.add_argument("topic")
    s.add_argument("--max", type=int, default=1)
    s.add_argument("--lease", type=float, default=60.0)
    s.add_argument("--consumer", default=CONSUMER)
    s = sub.add_parser("complete", help="complete claimed items")
    s.add_argument("ids", nargs="+", type=int)
    s.add_argument("--consumer", default=CONSUMER)
    s = sub.add_parser("stats", help="counts of one topic, or of every topic")
    s.add_argument("topic", nargs="?")
    for name in ("add", "remove", "transfer"):
        sub.add_parser(name, help=f"{name} the replica on HOST").add_argument("host")
    sub.add_parser("stop", help="stop every replica (their volumes stay)")
    return p


async def main(host: Any, args: list[str]) -> int:
    if host is None:
        print("raft needs a host: run it with `ww run` (without --no-dial)", file=sys.stderr)
        return 2
    try:
        ns = _parser().parse_args(args)
    except (argparse.ArgumentError, SystemExit) as e:
        if isinstance(e, SystemExit):
            return int(e.code or 0)
        print(f"raft: {e}; see `ww run roms/raft --help`", file=sys.stderr)
        return 2
    try:
        return await COMMANDS[ns.command](host, ns)
    except QueueError as e:
        print(f"raft {ns.command}: {e}", file=sys.stderr)
        return 1


# -- start, add, remove, stop: spawning and stopping replicas ------------------------------------


async def _existing(host: Any) -> QueueClient | None:
    try:
        return await QueueClient.connect(host, GROUP, timeout=10)
    except QueueError:
        return None


async def start(host: Any, ns: argparse.Namespace) -> int:
    client = await _existing(host)
    if client is not None:
        print("a raft group exists already:")
        _print_status(await client.status())
        return 0
    me = await host.id()
    live = [h["peer"] for h in await (await host.view()).hosts()]
    if ns.hosts:
        chosen = [p.strip("/") for p in ns.hosts.split(",") if p]
        missing = [p for p in chosen if p not in live]
        if missing:
            print(f"raft start: {missing[0]} is not in the view; see `ww ls`", file=sys.stderr)
            return 1
        if len(set(chosen)) != len(chosen):
            print("raft start: --hosts names a host twice; each replica needs its own host")
            return 1
    else:
        ordered = [me, *sorted(p for p in live if p != me)]
        if len(ordered) < ns.replicas:
            print(
                f"raft start: {ns.replicas} replicas need {ns.replicas} hosts, the view has "
                f"{len(ordered)}; start more hosts or pass --replicas",
                file=sys.stderr,
            )
            return 1
        chosen = ordered[: ns.replicas]
    inner = rom_data("replica.rom")
    argv = ["--voters", ",".join(chosen), *_options(ns)]
    root = await host.root()
    for peer in chosen:
        anchor = await root.walk(f"/{peer}/{GROUP}")
        await anchor.spawn(inner, argv, volume=True, restart="on-failure")
        print(f"spawned a replica at /{peer}/{GROUP}")
    client = await _wait_for_leader(host)
    _print_status(await client.status())
    return 0


def _options(ns: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, value in (
        ("--tick", ns.tick),
        ("--election-ticks", ns.election_ticks),
        ("--clock", ns.clock),
        ("--snapshot-interval", ns.snapshot_interval),
    ):
        if value is not None:
            out += [flag, str(value)]
    if ns.no_fsync:
        out.append("--no-fsync")
    return out


async def _wait_for_leader(host: Any, timeout: float = 30.0) -> QueueClient:
    with trio.move_on_after(timeout):
        while True:
            client = await _existing(host)
            if client is not None and (await client.status()).get("leader"):
                return client
            await trio.sleep(0.2)
    raise QueueError(f"no leader was elected within {timeout:g} s; see `ww ps` and `ww logs`")


async def add(host: Any, ns: argparse.Namespace) -> int:
    peer = ns.host.strip("/")
    client = await _connect(host)
    status = await client.status()
    if peer in status.get("voters", []):
        print(f"{peer} is a voter already")
        return 0
    root = await host.root()
    if peer not in status["replicas"]:
        anchor = await root.walk(f"/{peer}/{GROUP}")
        await anchor.spawn(rom_data("replica.rom"), [], volume=True, restart="on-failure")
        print(f"spawned a replica at /{peer}/{GROUP}; adding it as a learner, then a voter")
    await client.add(peer)
    _print_status(await client.status())
    return 0


async def remove(host: Any, ns: argparse.Namespace) -> int:
    peer = ns.host.strip("/")
    client = await _connect(host)
    await client.remove(peer)
    await _kill(host, peer)
    print(f"removed the replica on {peer} (its volume stays; `ww volumes` lists it)")
    _print_status(await client.status())
    return 0


async def stop(host: Any, ns: argparse.Namespace) -> int:
    client = await _connect(host)
    status = await client.status()
    for peer in sorted(set(status.get("voters", [])) | set(status["replicas"])):
        await _kill(host, peer)
        print(f"stopped the replica on {peer}")
    return 0


async def _kill(host: Any, peer: str) -> None:
    """Stop the replica's process for good (not restarted; its volume stays)."""
    anchor = await (await host.root()).walk(f"/{peer}/{GROUP}")
    process = await anchor.load()
    if process is not None and not isinstance(process, bytes):
        await process.kill()


async def transfer(host: Any, ns: argparse.Namespace) -> int:
    client = await _connect(host)
    await client.transfer(ns.host.strip("/"))
    _print_status(await client.status())
    return 0


# -- the queue ---------------------------------------------------------------------------------


async def _connect(host: Any) -> QueueClient:
    client = await _existing(host)
    if client is None:
        raise QueueError("no raft group in this cluster; start one with `ww run roms/raft start`")
    return client


async def status(host: Any, ns: argparse.Namespace) -> int:
    _print_status(await (await _connect(host)).status())
    return 0


async def put(host: Any, ns: argparse.Namespace) -> int:
    items = [Item(text.encode(), key=text if ns.key else None) for text in ns.items]
    result = await (await _connect(host)).put(ns.topic, items)
    print(f"added {result.added}, duplicates {result.duplicates}")
    return 0


async def claim(host: Any, ns: argparse.Namespace) -> int:
    claimed = await (await _connect(host)).claim(ns.topic, ns.consumer, ns.max, ns.lease)
    for item in claimed:
        text = item.payload.decode(errors="backslashreplace")
        print(f"{item.id}\t{item.attempts}\t{text}")
    return 0


async def complete(host: Any, ns: argparse.Namespace) -> int:
    answer = await (await _connect(host)).complete(ns.consumer, ns.ids)
    print(f"completed {answer.get('done', 0)}")
    return 0


async def stats(host: Any, ns: argparse.Namespace) -> int:
    client = await _connect(host)
    topics = [ns.topic] if ns.topic else await client.topics()
    columns = ("kind", "ready", "leased", "delayed", "done", "dead", "seen", "appended")
    print("\t".join(("topic", *columns)))
    for topic in topics:
        s = await client.stats(topic)
        print("\t".join([topic, *(str(s.get(c, "")) for c in columns)]))
    return 0


def _print_status(status: dict[str, Any]) -> None:
    leader = status.get("leader")
    print(
        f"leader {leader or '(none)'}  term {status.get('term', '-')}  "
        f"commit {status.get('commit', '-')}"
    )
    print("peer\trole\tterm\tcommit\tapplied\tlag")
    replicas = dict(status.get("replicas", {}))
    for peer in status.get("voters", []):
        replicas.setdefault(peer, {"error": "no replica found at its anchor"})
    for peer, s in sorted(replicas.items()):
        if "error" in s:
            print(f"{peer}\tunreachable\t-\t-\t-\t-  ({s['error']})")
        else:
            role = s["role"] + ("" if peer in status.get("voters", [peer]) else " (learner)")
            print(
                f"{peer}\t{role}\t{s['term']}\t{s['commit']}\t{s['applied']}\t{s.get('lag', '-')}"
            )


COMMANDS = {
    "start": start,
    "status": status,
    "put": put,
    "claim": claim,
    "complete": complete,
    "stats": stats,
    "add": add,
    "remove": remove,
    "transfer": transfer,
    "stop": stop,
}
