"""One replica of the queue: ww.raft with the queue's state machine, served at anchors.

A replica lives at its home anchor `/<peer id>/<group>` (the Raft ROM's is `/<peer>/raft/v1`)
and keeps its state in a volume: `raft/` (ww.raft.disk.DiskStorage) and `queue.db`
(QueueState, SQLite with its own applied index, so a restart replays only the entries after
it). It hangs three capabilities below its home:

- `rpc` — Raft messages from the other replicas (`ww.queue.transport.RaftRpc`);
- `request` — clients: `submit(command) -> answer`, `query(request) -> answer`, `status()`,
  and the membership operations `add(peer)`, `remove(peer)`, `transfer(peer)`, `stop()`;
- `response` — readers: the stream `follow(topic, offset)` yields `[offset, record]` of a log
  topic as records commit.

Only the leader serves `submit` and `query`; the others answer
`{"error": "not leader", "leader": PEER_ID_OR_NONE}`. The leader stamps "time" on each command
just before proposing it, proposes a `tick` every `clock_interval` seconds (so leases expire on
time when the queue is idle), and answers a query after a ReadIndex, from its own database.
Every refusal is an answer `{"error": "one line"}` (with `"retry": true` when the same request
may succeed later, e.g. after an election); a malformed request never stops the replica.

The Raft node id of a replica is derived from its peer id (`node_id_of`). The initial voters
are given when the group is created (`voters`, peer ids: each of them bootstraps with the same
configuration; the first of them campaigns as soon as a quorum of them serve, instead of
waiting out an election timeout); a replica started without them starts empty and waits to
be added (as a learner, then a voter: `add`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ww.queue.client import load_at
from ww.queue.commands import GROUP, OPS, QUERIES, Command, CommandError, decode, one_line, stamp
from ww.queue.snapshots import Marker, SnapshotFileError, SnapshotFiles
from ww.queue.transport import RaftRpc, WwTransport, node_id_of
from ww.raft.disk import DiskStorage
from ww.raft.driver import RaftDriver, RequestTimeoutError
from ww.raft.node import NotLeaderError, RaftError, Replica, StateMachine
from ww.raft.rawnode import Config
from ww.raft.types import ConfChange, ConfChangeSingle, ConfChangeType, ConfState
from ww.rpc import Capability

logger = logging.getLogger(__name__)

__all__ = ["GROUP", "AppliedState", "QueueReplica", "ReplicaOptions", "node_id_of"]

CHECKPOINT_INTERVAL = 1.0
"""A replica copies its WAL into the database (in a worker thread) at most this often
(seconds), after a commit."""
MEMBERS_FILE = "members.json"


@dataclass(slots=True, frozen=True)
class ReplicaOptions:
    """How a replica runs. Raft times are in ticks of `tick_interval` seconds."""

    tick_interval: float = 0.05
    election_tick: int = 10
    heartbeat_tick: int = 1
    clock_interval: float = 1.0
    """The leader proposes a `tick` this often."""
    request_timeout: float = 5.0
    snapshot_interval: int = 10_000
    compaction_margin: int = 1_000
    snapshot_bytes: int | None = 16 << 20
    """A snapshot is also taken once the entries applied since the last one hold this many
    bytes, and at most a quarter of that stays in the log behind it (the log is held in
    memory: this bounds it when entries are large). The log is a replica's largest holder of
    memory under large entries: at 64 MiB a replica peaked near 150 MB RSS, at 16 MiB near
    100 MB. Taking a snapshot copies nothing (`ww.queue.snapshots`)."""
    fsync: bool = True
    persist_in_thread: bool = True
    direct: bool = True
    """Dial the other replicas' hosts rather than relay through this one."""
    catch_up_timeout: float = 60.0
    """How long `add` waits for a new learner to catch up before making it a voter."""
    chunk_size: int = 1 << 20
    """Snapshots (and any larger message) travel in chunks of this many bytes."""
    apply_bytes: int = 256 << 10
    """At most this many bytes of committed entries are applied per Ready (at least one entry),
    so the loop answers heartbeats between them rather than stalling past an election
    timeout on a large backlog."""
    commit_interval: float = 0.1
    """The database commits the entries applied since its last commit at the end of a Ready
    once this many seconds have passed (0: every Ready). The Raft log is the durable record:
    after a crash the entries not committed are applied again from it."""


class AppliedState:
    """The state machine, with an event set after each change (for `follow`).

    A state machine that can copy itself to a file and back (`sync()`, `copy_to(path)`,
    `restore_from(path)`, as QueueState does) gets Raft snapshots that are markers naming a
    file in `files` (`ww.queue.snapshots`); any other hands Raft its bytes. Commits are
    grouped (`commit_interval`) and, for a QueueState opened with autocheckpoint=False, the
    WAL is checkpointed in a worker thread.
    """

    def __init__(
        self, state: StateMachine, files: SnapshotFiles | None, commit_interval: float = 0.0
    ) -> None:
        self.state = state
        self.commit_interval = commit_interval
        self._committed = -math.inf  # time.monotonic() of the last commit
        self.changed = trio.Event()
        to_file = all(hasattr(state, m) for m in ("copy_to", "sync", "restore_from"))
        self.files = files if to_file else None
        self._taken: Marker | None = None  # a snapshot whose older files are not yet pruned
        self._checkpointing: threading.Thread | None = None
        self._checkpointed = time.monotonic()

    @property
    def applied_index(self) -> int:
        index = getattr(self.state, "applied_index", 0)
        return index if isinstance(index, int) else 0

    def apply(self, index: int, data: bytes) -> Any:
        return self.state.apply(index, data)

    def commit(self) -> None:
        """Called by ww.raft once per Ready that applied entries: one SQLite commit for all
        of them, and for those of the Readys before it within `commit_interval`."""
        commit = getattr(self.state, "commit", None)
        now = time.monotonic()
        if commit is not None and now - self._committed >= self.commit_interval:
            commit()
            self._committed = now
            self._maybe_checkpoint(now)
        if self._taken is not None and self.files is not None:
            # Raft's storage names the snapshot taken during this Ready: older files can go.
            self.files.prune(self._taken)
            self._taken = None
        self._wake()

    def _maybe_checkpoint(self, now: float) -> None:
        """Copy the WAL into the database in a worker thread, at most every
        CHECKPOINT_INTERVAL seconds (the replica's QueueState never checkpoints in a commit,
        which would stall the loop)."""
        if not hasattr(self.state, "checkpoint") or now - self._checkpointed < CHECKPOINT_INTERVAL:
            return
        if self._checkpointing is not None and self._checkpointing.is_alive():
            return
        self._checkpointed = now
        self._checkpointing = threading.Thread(
            target=self._checkpoint, name="checkpoint", daemon=True
        )
        self._checkpointing.start()

    def _checkpoint(self) -> None:
        try:
            self.state.checkpoint()  # type: ignore[attr-defined]
        except Exception:  # the next one tries again; the WAL keeps everything meanwhile
            logger.exception("checkpoint failed")

    def join(self) -> None:
        """Wait for a checkpoint running in a worker thread."""
        if self._checkpointing is not None:
            self._checkpointing.join()

    def snapshot(self) -> bytes:
        if self.files is None:
            return self.state.snapshot()
        # Durable before Raft compacts the log behind it. The database is the snapshot: a
        # copy of it is written only when a follower needs one (`SnapshotFiles.ensure`).
        self.state.sync()  # type: ignore[attr-defined]
        self._taken = Marker.for_index(self.applied_index)
        return self._taken.encode()

    def restore(self, data: bytes) -> None:
        self.join()  # no checkpoint of the database being replaced is running
        if self.files is None or data[:16] == b"SQLite format 3\x00":
            self.state.restore(data)  # a snapshot held in memory
        else:
            marker = Marker.decode(data)
            if self.applied_index < marker.index:  # else the database holds it already
                with self.files.lock:  # no copy of the database being replaced is running
                    self.state.restore_from(self.files.path(marker))  # type: ignore[attr-defined]
            self.files.prune(marker)  # Raft's storage names this one now
        self._wake()

    def check_snapshot(self, data: bytes) -> None:
        """On start: refuse, with what to do, a stored snapshot that the database is behind
        and whose file is gone (the replica could not install it)."""
        if self.files is None or data[:16] == b"SQLite format 3\x00":
            return
        marker = Marker.decode(data)
        if self.applied_index < marker.index and not self.files.complete(marker):
            raise SnapshotFileError(
                f"{self.files.path(marker)} is missing and the database is behind it (applied "
                f"index {self.applied_index} < {marker.index}); move the volume away and add "
                "the replica again"
            )

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def _error(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": one_line(message), **extra}


class QueueReplica:
    """One replica: `await nursery.start(replica.run)`; it runs until cancelled, removed or
    stopped (`stop()`), and `run` returns then.

    `host` is a Host capability (a ROM's own, or a client connection's), `home` the anchor
    path (`/<peer id>/raft/v1`; the peer id must be the host's), `volume` the directory of its
    state. `state` is the state machine (by default `QueueState(volume / "queue.db")`).
    """

    def __init__(
        self,
        host: Any,
        home: str,
        volume: Path,
        *,
        voters: Sequence[str] | None = None,
        options: ReplicaOptions | None = None,
        state: StateMachine | None = None,
    ) -> None:
        parts = [p for p in home.split("/") if p]
        if len(parts) < 2:
            raise ValueError(f"a replica's home is /<peer id>/GROUP, not {home!r}")
        self.host = host
        self.peer = parts[0]
        self.group = "/".join(parts[1:])
        self.home = "/" + "/".join(parts)
        self.volume = Path(volume)
        self.voters = list(voters) if voters else []
        self.options = options or ReplicaOptions()
        self.node_id = node_id_of(self.peer)
        self._state_arg = state
        self._members: dict[int, str] = {self.node_id: self.peer}
        self._view: dict[int, str] = {}  # the hosts in the cluster view, by node id
        self._stopped = trio.Event()
        self.driver: RaftDriver | None = None
        self.transport: WwTransport | None = None
        self.state: AppliedState | None = None
        self.storage: DiskStorage | None = None
        self.files: SnapshotFiles | None = None
        self._new_group = False

    # -- running ----------------------------------------------------------------------------

    def _open(self) -> RaftDriver:
        self.volume.mkdir(parents=True, exist_ok=True)
        self._load_members()
        for peer in self.voters:
            self._members[node_id_of(peer)] = peer
        self._save_members()
        conf = ConfState(voters=tuple(sorted(node_id_of(p) for p in self.voters)))
        self.storage = DiskStorage.open(
            self.volume / "raft",
            node_id=self.node_id,
            cluster_id=self.group,
            sync=self.options.fsync,
            conf_state=conf if self.voters else None,
        )
        if self._state_arg is None:
            from ww.queue.state import QueueState

            state: StateMachine = QueueState(
                self.volume / "queue.db", autocommit=False, autocheckpoint=False
            )
        else:
            state = self._state_arg
        hard_state, _ = self.storage.initial_state()
        self._new_group = bool(self.voters) and hard_state.term == 0
        self.files = SnapshotFiles(self.volume / "snapshots", getattr(state, "copy_to", None))
        self.state = AppliedState(state, self.files, self.options.commit_interval)
        snap = self.storage.snapshot()
        if not snap.is_empty():
            self.state.check_snapshot(snap.data)
        o = self.options
        config = Config(
            id=self.node_id,
            storage=self.storage,
            election_tick=o.election_tick,
            heartbeat_tick=o.heartbeat_tick,
            max_committed_size_per_ready=o.apply_bytes,
        )
        replica = Replica(
            config,
            self.storage,
            self.state,
            snapshot_interval=o.snapshot_interval,
            compaction_margin=o.compaction_margin,
            snapshot_bytes=o.snapshot_bytes,
            on_conf_change=self._on_conf_change,
        )
        self.transport = WwTransport(
            self.host,
            self.group,
            self.node_id,
            on_unreachable=lambda n: driver.report_unreachable(n),
            on_snapshot=lambda n, ok: driver.report_snapshot(n, ok),
            direct=o.direct,
            chunk_size=o.chunk_size,
            files=self.state.files,
        )
        self.transport.set_peers(self._members)
        driver = RaftDriver(
            replica,
            self.transport,
            tick_interval=o.tick_interval,
            request_timeout=o.request_timeout,
            persist_in_thread=o.persist_in_thread,
        )
        return driver

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        driver = self.driver = self._open()
        assert self.transport is not None and self.state is not None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.transport.run)
                await nursery.start(driver.run)
                await self._refresh_peers()
                nursery.start_soon(self._watch_view)
                nursery.start_soon(self._clock)
                root = await self.host.root()
                rpc = RaftRpc(driver.step_encoded, self.transport.stats, self.state.files)
                await (await root.walk(f"{self.home}/rpc")).store(rpc)
                await (await root.walk(f"{self.home}/request")).store(RequestService(self))
                await (await root.walk(f"{self.home}/response")).store(ResponseService(self))
                logger.info(
                    "replica %s (node %d) serving at %s", self.peer, self.node_id, self.home
                )
                task_status.started()
                if self._new_group and self.voters[0] == self.peer:
                    nursery.start_soon(self._first_election)
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        if self.state is not None:
            await trio.to_thread.run_sync(self.state.join)  # a checkpoint running
        if self.state is not None:
            close = getattr(self.state.state, "close", None)
            if close is not None:
                close()
        if self.storage is not None:
            self.storage.close()

    def stop(self) -> None:
        """End `run` (the replica's process exits normally, so the host does not restart it)."""
        self._stopped.set()

    async def _watch_view(self) -> None:
        while True:
            await trio.sleep(1.0)
            try:
                await self._refresh_peers()
            except Exception as e:  # the host is going away; the next try tells
                logger.debug("cannot read the cluster view: %s", e)

    async def _first_election(self) -> None:
        """The first voter of a new group campaigns as soon as a quorum of the voters serve,
        rather than after an election timeout. Campaigning is always safe in Raft; if this
        one fails, the election timeouts elect a leader as they would have."""
        driver = self.driver
        assert driver is not None
        others = [p for p in self.voters if p != self.peer]
        needed = len(self.voters) // 2  # besides this one
        root = await self.host.root()

        async def serves(peer: str) -> bool:
            try:
                await load_at(root, f"/{peer}/{self.group}/rpc")
            except Exception:  # its host or the way there is not up yet
                return False
            return True

        def bootstrapped() -> bool:  # the voters' entries of a new log are applied
            status = driver.status()
            return status.applied >= status.hard_state.commit

        with trio.move_on_after(self.options.tick_interval * self.options.election_tick):
            while not bootstrapped() or sum([await serves(p) for p in others]) < needed:
                await trio.sleep(0.02)
            if not driver.replica.leader:  # none elected meanwhile
                await driver.campaign()

    async def _refresh_peers(self) -> None:
        hosts = await (await self.host.view()).hosts()
        self._view = {node_id_of(entry["peer"]): entry["peer"] for entry in hosts}
        self._publish_peers()

    def _publish_peers(self) -> None:
        if self.transport is not None:
            self.transport.set_peers({**self._view, **self._members})

    async def _clock(self) -> None:
        """On the leader: propose a tick every `clock_interval` seconds."""
        while True:
            await trio.sleep(self.options.clock_interval)
            if not self.is_leader:
                continue
            with trio.move_on_after(self.options.request_timeout):
                try:
                    await self._propose(Command.tick().encode(time=time.time()))
                except RaftError as e:
                    logger.debug("tick not proposed: %s", e)

    # -- state ------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.driver is not None and self.driver.replica.leader == self.node_id

    def peer_of(self, node_id: int) -> str | None:
        if node_id == 0:
            return None
        return self._members.get(node_id) or self._view.get(node_id)

    def not_leader(self) -> dict[str, Any]:
        assert self.driver is not None
        return _error("not leader", leader=self.peer_of(self.driver.replica.leader), retry=True)

    def _load_members(self) -> None:
        path = self.volume / MEMBERS_FILE
        try:
            data = json.loads(path.read_text())
            self._members.update({int(k): str(v) for k, v in data.items()})
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError) as e:
            logger.warning("ignoring %s: %s", path, e)

    def _save_members(self) -> None:
        path = self.volume / MEMBERS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self._members.items())}))
        os.replace(tmp, path)

    def _on_conf_change(self, cc: ConfChange, conf: ConfState) -> None:
        # The proposer puts the peer id of the node it adds in the context.
        if cc.context and len(cc.changes) == 1:
            try:
                peer = cc.context.decode()
            except UnicodeDecodeError:
                return
            if (
                node_id_of(peer) == cc.changes[0].node_id
                and self._members.get(cc.changes[0].node_id) != peer
            ):
                self._members[cc.changes[0].node_id] = peer
                self._save_members()
                self._publish_peers()

    async def _propose(self, data: bytes) -> Any:
        assert self.driver is not None
        return await self.driver.propose(data)

    # -- the request service ----------------------------------------------------------------

    async def submit(self, command: Any) -> dict[str, Any]:
        if not isinstance(command, bytes):
            return _error("a command is msgpack bytes; build it with ww.queue.commands.Command")
        try:
            op = decode(command).get("op")
            if op not in OPS:
                raise CommandError(f"unknown op {op!r}; expected one of {', '.join(sorted(OPS))}")
            data = stamp(command, time.time())
        except CommandError as e:
            return _error(str(e))
        if not self.is_leader:
            return self.not_leader()
        try:
            answer = await self._propose(data)
        except NotLeaderError:
            return self.not_leader()
        except RequestTimeoutError as e:
            return _error(str(e), retry=True)
        except RaftError as e:
            return _error(f"not proposed: {e}", retry=True)
        return answer if isinstance(answer, dict) else {"result": answer}

    async def query(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, bytes):
            return _error("a query is msgpack bytes; build it with ww.queue.commands.Query")
        try:
            req = decode(request)
        except CommandError as e:
            return _error(str(e))
        if req.get("op") not in QUERIES:
            return _error(f"unknown query {req.get('op')!r}; expected one of {sorted(QUERIES)}")
        if not self.is_leader:
            return self.not_leader()
        assert self.driver is not None and self.state is not None
        try:
            await self.driver.read_index()
        except NotLeaderError:
            return self.not_leader()
        except RaftError as e:
            return _error(f"read not confirmed: {e}", retry=True)
        return self._query_local(req)

    def _query_local(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.state is not None
        query = getattr(self.state.state, "query", None)
        if query is None:
            return _error("this state machine answers no queries")
        try:
            answer = query(req)
        except Exception as e:  # the state machine must not raise; if it does, say so
            logger.exception("query %r failed", req.get("op"))
            return _error(f"query failed: {e}")
        return answer if isinstance(answer, dict) else {"result": answer}

    def status(self) -> dict[str, Any]:
        assert self.driver is not None and self.storage is not None
        st = self.driver.status()
        replica = self.driver.replica
        conf = st.config
        out: dict[str, Any] = {
            "peer": self.peer,
            "node": self.node_id,
            "role": st.soft_state.raft_state.value,
            "leader": self.peer_of(st.soft_state.lead),
            "term": st.hard_state.term,
            "commit": st.hard_state.commit,
            "applied": replica.applied,
            "last_index": self.storage.last_index(),
            "voters": [self.peer_of(n) or str(n) for n in conf.voters],
            "learners": [self.peer_of(n) or str(n) for n in conf.learners],
        }
        if st.progress:
            last = self.storage.last_index()
            out["lag"] = {
                (self.peer_of(n) or str(n)): last - p.match for n, p in st.progress.items()
            }
        return out

    async def add(self, peer: Any) -> dict[str, Any]:
        """Add the replica on host `peer` (started without voters): as a learner, then, once
        it has caught up, as a voter."""
        if not isinstance(peer, str) or not peer:
            return _error("add takes a peer id")
        if not self.is_leader:
            return self.not_leader()
        assert self.driver is not None and self.storage is not None
        node = node_id_of(peer)
        conf = self.driver.status().config
        try:
            if node not in conf.voters:
                if node not in conf.learners:
                    await self._change(ConfChangeType.ADD_LEARNER, node, peer)
                await self._catch_up(node)
                await self._change(ConfChangeType.ADD_NODE, node, peer)
        except (RaftError, TimeoutError) as e:
            return _error(f"cannot add {peer}: {e}", retry=True)
        return self.status()

    async def _catch_up(self, node: int) -> None:
        assert self.driver is not None and self.storage is not None
        with trio.fail_after(self.options.catch_up_timeout):
            while True:
                progress = self.driver.status().progress.get(node)
                if (
                    progress is not None
                    and progress.match >= self.driver.status().hard_state.commit
                ):
                    return
                if not self.is_leader:
                    raise NotLeaderError(self.driver.replica.leader)
                await trio.sleep(self.options.tick_interval)

    async def _change(self, kind: ConfChangeType, node: int, peer: str) -> None:
        assert self.driver is not None
        cc = ConfChange((ConfChangeSingle(kind, node),), context=peer.encode())
        await self.driver.propose_conf_change(cc)

    async def remove(self, peer: Any) -> dict[str, Any]:
        """Remove the replica on host `peer` from the group. The leader removing itself hands
        leadership on first and answers "not leader" (naming the new one) to be asked again."""
        if not isinstance(peer, str) or not peer:
            return _error("remove takes a peer id")
        if not self.is_leader:
            return self.not_leader()
        assert self.driver is not None
        node = node_id_of(peer)
        conf = self.driver.status().config
        if node not in conf.voters and node not in conf.learners:
            return _error(f"{peer} is not a member of the group")
        if node == self.node_id:
            others = [n for n in conf.voters if n != node]
            if not others:
                return _error("cannot remove the last voter; stop the group instead")
            progress = self.driver.status().progress
            best = max(others, key=lambda n: progress[n].match if n in progress else -1)
            target = self.peer_of(best)
            if target is None:
                return _error(f"no host known for node {best} to hand leadership to", retry=True)
            return await self.transfer(target)
        try:
            await self._change(ConfChangeType.REMOVE_NODE, node, peer)
        except RaftError as e:
            return _error(f"cannot remove {peer}: {e}", retry=True)
        return self.status()

    async def transfer(self, peer: Any) -> dict[str, Any]:
        """Hand leadership to the replica on host `peer`; answers once it leads (or not)."""
        if not isinstance(peer, str) or not peer:
            return _error("transfer takes a peer id")
        if not self.is_leader:
            return self.not_leader()
        assert self.driver is not None
        node = node_id_of(peer)
        if node not in self.driver.status().config.voters:
            return _error(f"{peer} is not a voter of the group")
        if node == self.node_id:
            return self.status()
        await self.driver.transfer_leader(node)
        timeout = 4 * self.options.election_tick * self.options.tick_interval
        with trio.move_on_after(timeout):
            while self.driver.replica.leader != node:
                await trio.sleep(self.options.tick_interval)
        return self.not_leader() if not self.is_leader else _error(f"{peer} did not take over")

    async def follow(self, topic: Any, offset: Any) -> AsyncIterator[list[Any]]:
        """[offset, record] of log topic `topic` from `offset` on, as they are applied here."""
        if not isinstance(topic, str) or isinstance(offset, bool) or not isinstance(offset, int):
            raise ValueError("follow takes a topic name and an offset")
        assert self.state is not None
        while True:
            changed = self.state.changed
            answer = self._query_local({"op": "read", "topic": topic, "offset": offset, "n": 256})
            if "error" in answer:
                raise ValueError(answer["error"])
            for off, record in answer["records"]:
                yield [off, record]
            offset = max(offset, answer.get("next", offset))
            if not answer["records"]:
                await changed.wait()


class RequestService(Capability):
    """The `request` anchor: what clients call (see the module docstring)."""

    def __init__(self, replica: QueueReplica) -> None:
        self._replica = replica

    async def submit(self, command: Any) -> dict[str, Any]:
        return await self._replica.submit(command)

    async def query(self, request: Any) -> dict[str, Any]:
        return await self._replica.query(request)

    async def status(self) -> dict[str, Any]:
        return self._replica.status()

    async def add(self, peer: Any) -> dict[str, Any]:
        return await self._replica.add(peer)

    async def remove(self, peer: Any) -> dict[str, Any]:
        return await self._replica.remove(peer)

    async def transfer(self, peer: Any) -> dict[str, Any]:
        return await self._replica.transfer(peer)

    async def stop(self) -> dict[str, Any]:
        self._replica.stop()
        return {"stopped": self._replica.peer}


class ResponseService(Capability):
    """The `response` anchor: streams for readers."""

    def __init__(self, replica: QueueReplica) -> None:
        self._replica = replica

    async def follow(self, topic: Any, offset: Any) -> AsyncIterator[list[Any]]:
        try:
            async for item in self._replica.follow(topic, offset):
                yield item
        except ValueError as e:
            from ww.rpc import CapabilityError

            raise CapabilityError(one_line(str(e))) from None


# -- the ROM's main --------------------------------------------------------------------------


def parse_args(args: Sequence[str]) -> tuple[list[str] | None, ReplicaOptions]:
    """`[--voters P1,P2,...] [--tick SECONDS] [--election-ticks N] [--clock SECONDS]
    [--snapshot-interval N] [--no-fsync] [--relay]`"""
    import argparse

    defaults = ReplicaOptions()
    p = argparse.ArgumentParser(prog="raft replica", exit_on_error=False)
    p.add_argument("--voters", default="")
    p.add_argument("--tick", type=float, default=defaults.tick_interval)
    p.add_argument("--election-ticks", type=int, default=defaults.election_tick)
    p.add_argument("--clock", type=float, default=defaults.clock_interval)
    p.add_argument("--snapshot-interval", type=int, default=defaults.snapshot_interval)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--relay", action="store_true")
    ns = p.parse_args(list(args))
    if not (math.isfinite(ns.tick) and ns.tick > 0 and ns.clock > 0):
        raise ValueError("--tick and --clock must be positive numbers of seconds")
    voters = [v for v in ns.voters.split(",") if v] or None
    options = ReplicaOptions(
        tick_interval=ns.tick,
        election_tick=ns.election_ticks,
        clock_interval=ns.clock,
        snapshot_interval=ns.snapshot_interval,
        fsync=not ns.no_fsync,
        direct=not ns.relay,
    )
    return voters, options


async def main(host: Any, args: Sequence[str]) -> int:
    """The inner Raft ROM: run the replica at the ROM's home anchor, in its volume."""
    import sys

    from ww.queue.state import QueueStateError
    from ww.raft.storage import StorageError
    from ww.rom import guest

    home, volume = guest.home(), guest.volume()
    if host is None or home is None or volume is None:
        print(
            "the raft replica runs spawned at an anchor with a volume "
            "(anchor.spawn(rom, args, volume=True)); use `ww run roms/raft start`",
            file=sys.stderr,
        )
        return 2
    try:
        voters, options = parse_args(args)
    except (ValueError, SystemExit) as e:
        print(f"raft replica: bad arguments {list(args)}: {e}", file=sys.stderr)
        return 2
    replica = QueueReplica(host, home, volume, voters=voters, options=options)
    try:
        await replica.run()
    except (StorageError, QueueStateError, SnapshotFileError) as e:
        print(f"raft replica at {home}: {one_line(str(e))}", file=sys.stderr)
        return 2
    return 0
