"""One queue replica over ww.raft with the plain TCP transport, for queue_throughput.py.

    python benchmarks/_queue_node.py --id 1 --data-dir DIR [--raft-port 0] [--client-port 0]

The same replica as the Raft ROM's (DiskStorage with fsync, RaftDriver with persist_in_thread,
QueueState in DIR/queue.db, the leader's time stamped on each command), but with the TCP
transport and client protocol of _tcp_transport.py instead of ww capabilities: a request
[rid, "put", COMMAND] is answered [rid, "ok", ANSWER] once applied on this node (or
[rid, "redirect", leader] / [rid, "err", "one line"]). Start-up handshake and exit rule as in
_tcp_transport.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
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

from ww.queue.commands import CommandError, stamp
from ww.queue.replica import AppliedState, ReplicaOptions
from ww.queue.state import QueueState
from ww.raft.disk import DiskStorage
from ww.raft.driver import NotLeaderError, RaftDriver, RaftError
from ww.raft.node import Replica
from ww.raft.rawnode import Config
from ww.raft.types import ConfState


class QueueHandler:
    def __init__(self, driver: RaftDriver, nursery: trio.Nursery) -> None:
        self._driver = driver
        self._nursery = nursery

    def put(self, data: bytes, reply: ReplyFn) -> None:
        self._nursery.start_soon(self._propose, data, reply)

    async def _propose(self, data: bytes, reply: ReplyFn) -> None:
        replica = self._driver.replica
        if replica.leader != replica.id:
            reply("redirect", replica.leader)
            return
        try:
            answer = await self._driver.propose(stamp(data, time.time()))
        except CommandError as e:
            reply("err", str(e))
        except NotLeaderError as e:
            reply("redirect", e.leader)
        except RaftError as e:
            reply("err", str(e))
        else:
            reply("ok", answer)

    def status(self) -> dict[str, Any]:
        replica = self._driver.replica
        role = "leader" if replica.leader == replica.id else "follower"
        return {"id": replica.id, "role": role, "leader": replica.leader}


async def serve(args: argparse.Namespace) -> None:
    raft_listener = (await trio.open_tcp_listeners(args.raft_port, host=args.host))[0]
    client_listener = (await trio.open_tcp_listeners(args.client_port, host=args.host))[0]
    peers = await handshake(
        raft_listener.socket.getsockname()[1], client_listener.socket.getsockname()[1]
    )
    data = Path(args.data_dir)
    storage = DiskStorage.open(
        data / "raft",
        node_id=args.id,
        cluster_id="queue-benchmark",
        conf_state=ConfState(voters=tuple(sorted(peers))),
    )
    state = QueueState(data / "queue.db", autocommit=False, autocheckpoint=False)
    # The replica's own commit policy (one commit per Ready, at most every 0.1 s).
    applied = AppliedState(state, None, ReplicaOptions().commit_interval)
    options = ReplicaOptions()
    config = Config(id=args.id, storage=storage, max_committed_size_per_ready=options.apply_bytes)
    replica = Replica(
        config,
        storage,
        applied,
        snapshot_interval=options.snapshot_interval,
        compaction_margin=options.compaction_margin,
        snapshot_bytes=options.snapshot_bytes,
    )
    transport = TcpTransport(
        {i: a for i, a in peers.items() if i != args.id},
        on_unreachable=lambda node_id: driver.report_unreachable(node_id),
    )
    driver = RaftDriver(replica, transport, persist_in_thread=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            nursery.start_soon(transport.run, driver.step, raft_listener)
            nursery.start_soon(serve_clients, client_listener, QueueHandler(driver, nursery))
            nursery.start_soon(exit_when_stdin_closes, nursery.cancel_scope.cancel)
    finally:
        storage.close()
        state.close()


def main() -> None:
    args = node_arguments("one queue replica over ww.raft with a TCP transport")
    run_profiled(lambda: serve(args), args.profile)


if __name__ == "__main__":
    main()
