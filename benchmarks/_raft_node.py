"""One ww.raft replica as an OS process, for the benchmarks.

    python benchmarks/_raft_node.py --id 1 --data-dir DIR [--raft-port 0] [--client-port 0]

DiskStorage (fsync on) in --data-dir, the RaftDriver with its default timeouts, the TCP
transport of _tcp_transport.py between replicas, and the benchmark client protocol (also in
_tcp_transport.py): a put is answered when its entry has been applied on this node. The
start-up handshake and the exit-with-stdin rule are described there too.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import trio
from _tcp_transport import (
    ReplyFn,
    TcpTransport,
    exit_when_stdin_closes,
    handshake,
    node_arguments,
    run_profiled,
    serve_clients,
)

from ww.raft.disk import DiskStorage
from ww.raft.driver import NotLeaderError, RaftDriver, RaftError
from ww.raft.node import Replica
from ww.raft.rawnode import Config
from ww.raft.types import ConfState

CLUSTER_ID = "raft-benchmark"


def main() -> None:
    args = node_arguments(
        "one ww.raft replica with a TCP transport and a client port",
        [
            ("--tick-interval", float, None, "seconds per raft tick (driver default)"),
            ("--persist-in-thread", bool, False, "fsync in a worker thread"),
            ("--no-fsync", bool, False, "DiskStorage without fsync (for comparison only)"),
        ],
    )
    run_profiled(lambda: _serve_raft(args), args.profile)


class CountingStateMachine:
    """The replicated state: how many commands were applied (as in the PySyncObj node)."""

    def __init__(self) -> None:
        self.count = 0

    def apply(self, index: int, data: bytes) -> int:
        self.count += 1
        return index

    def snapshot(self) -> bytes:
        return self.count.to_bytes(8, "big")

    def restore(self, data: bytes) -> None:
        self.count = int.from_bytes(data, "big")


class RaftHandler:
    """Client requests against a RaftDriver: each put is one `driver.propose` task."""

    def __init__(self, driver: RaftDriver, nursery: trio.Nursery, transport: TcpTransport) -> None:
        self._driver = driver
        self._nursery = nursery
        self._transport = transport

    def put(self, data: bytes, reply: ReplyFn) -> None:
        self._nursery.start_soon(self._propose, data, reply)

    async def _propose(self, data: bytes, reply: ReplyFn) -> None:
        try:
            index = await self._driver.propose(data)
        except NotLeaderError as e:
            reply("redirect", e.leader)
        except RaftError as e:
            reply("err", str(e))
        else:
            reply("ok", index)

    def status(self) -> dict[str, Any]:
        replica = self._driver.replica
        return {
            "id": replica.id,
            "role": "leader" if replica.leader == replica.id else "follower",
            "leader": replica.leader,
            "applied": replica.applied,
            "transport": dataclasses.asdict(self._transport.stats),
        }


async def _serve_raft(args: argparse.Namespace) -> None:
    raft_listener = (await trio.open_tcp_listeners(args.raft_port, host=args.host))[0]
    client_listener = (await trio.open_tcp_listeners(args.client_port, host=args.host))[0]
    peers = await handshake(
        raft_listener.socket.getsockname()[1], client_listener.socket.getsockname()[1]
    )
    storage = DiskStorage.open(
        args.data_dir,
        node_id=args.id,
        cluster_id=CLUSTER_ID,
        sync=not args.no_fsync,
        conf_state=ConfState(voters=tuple(sorted(peers))),
    )
    config = Config(id=args.id, storage=storage)
    replica = Replica(config, storage, CountingStateMachine())
    transport = TcpTransport(
        {i: a for i, a in peers.items() if i != args.id},
        on_unreachable=lambda node_id: driver.report_unreachable(node_id),
    )
    options: dict[str, Any] = {"persist_in_thread": args.persist_in_thread}
    if args.tick_interval is not None:
        options["tick_interval"] = args.tick_interval
    driver = RaftDriver(replica, transport, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            nursery.start_soon(transport.run, driver.step, raft_listener)
            nursery.start_soon(
                serve_clients, client_listener, RaftHandler(driver, nursery, transport)
            )
            nursery.start_soon(exit_when_stdin_closes, nursery.cancel_scope.cancel)
    finally:
        storage.close()


if __name__ == "__main__":
    main()
