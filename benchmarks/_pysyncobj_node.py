"""One PySyncObj replica as an OS process, serving the same client protocol as _raft_node.py.

    python benchmarks/_pysyncobj_node.py --id 1 --data-dir DIR --raft-port P

PySyncObj binds its own raft port, so the parent picks a free one and passes it in; the peer
list arrives on stdin (the handshake of _tcp_transport.py). The journal is on (`journalFile`),
PySyncObj's durable mode: its FileJournal writes each record into an mmap of the journal file
and never calls fsync or msync while running (only on shutdown), and its metadata (term, vote)
is written to a temp file and renamed without fsync. Records therefore survive a process crash
(the page cache has them) but not a power loss or kernel crash. ww.raft's DiskStorage fsyncs
before any message that depends on the write leaves, which is the stronger guarantee.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import trio
from _tcp_transport import (
    ReplyFn,
    exit_when_stdin_closes,
    handshake,
    node_arguments,
    run_profiled,
    serve_clients,
)
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated


class CountingLog(SyncObj):  # type: ignore[misc]
    """The replicated state: how many commands were applied (the same as the ww.raft node)."""

    def __init__(self, self_addr: str, others: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, others, conf)
        self.applied = 0

    @replicated  # type: ignore[untyped-decorator]
    def put(self, data: bytes) -> int:
        self.applied += 1
        return self.applied


class PySyncObjHandler:
    def __init__(self, node_id: int, obj: CountingLog, ids: dict[str, int]) -> None:
        self._id = node_id
        self._obj = obj
        self._ids = ids  # "host:port" -> node id
        self._token = trio.lowlevel.current_trio_token()

    def put(self, data: bytes, reply: ReplyFn) -> None:
        token = self._token

        def done(result: Any, error: Any) -> None:  # runs on PySyncObj's thread
            if error == FAIL_REASON.SUCCESS:
                token.run_sync_soon(reply, "ok", result)
            elif error == FAIL_REASON.NOT_LEADER:
                token.run_sync_soon(reply, "redirect", self._leader_id())
            else:
                token.run_sync_soon(reply, "err", f"pysyncobj failure {error}")

        self._obj.put(data, callback=done)

    def _leader_id(self) -> int:
        leader = self._obj._getLeader()
        return 0 if leader is None else self._ids.get(str(leader.id), 0)

    def status(self) -> dict[str, Any]:
        state = self._obj.getStatus()["state"]
        role = {0: "follower", 1: "candidate", 2: "leader"}.get(state, "?")
        return {
            "id": self._id,
            "role": role,
            "leader": self._leader_id(),
            "applied": self._obj.applied,
        }


async def _serve(args: argparse.Namespace) -> None:
    client_listener = (await trio.open_tcp_listeners(args.client_port, host=args.host))[0]
    client_port = client_listener.socket.getsockname()[1]
    peers = await handshake(args.raft_port, client_port)
    addrs = {i: f"{h}:{p}" for i, (h, p) in peers.items()}
    me = addrs[args.id]
    os.makedirs(args.data_dir, exist_ok=True)
    conf = SyncObjConf(journalFile=os.path.join(args.data_dir, "journal"))
    obj = CountingLog(me, [a for i, a in addrs.items() if i != args.id], conf)
    handler = PySyncObjHandler(args.id, obj, {a: i for i, a in addrs.items()})
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_clients, client_listener, handler)
            nursery.start_soon(exit_when_stdin_closes, nursery.cancel_scope.cancel)
    finally:
        obj.destroy()


def main() -> None:
    args = node_arguments("one PySyncObj replica with the benchmark's client port")
    run_profiled(lambda: _serve(args), args.profile)


if __name__ == "__main__":
    main()
