"""The queue as the state machine of the Raft simulator (tests/raft/sim): clients put, claim,
complete and release through random nodes while messages are dropped, duplicated and delayed,
partitions come and go, and nodes crash and restart from their storage and snapshots.

Checked: every replica's database is equal to every other's at each applied index (a digest
of all rows); every acknowledged put is there (as an item, or completed); nothing takes
effect twice (no item exists twice, no result is appended twice); every acknowledged
complete's results are in the log.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.raft.sim.cluster import Cluster, Request, SimNode, SimOptions, is_leader
from tests.raft.sim.network import Faults
from ww.queue.commands import Command, Item, Query, stamp
from ww.queue.state import QueueState
from ww.raft.errors import RaftError
from ww.raft.node import Replica
from ww.raft.rawnode import Config

TICK = 0.1  # seconds of log time per simulator tick
CLIENTS = 3
HOSTS = ("h1", "h2", "h3")


class TrackedQueue:
    """A node's QueueState, reporting the digest after each entry it applies or installs."""

    def __init__(self, path: Path, on_apply: Callable[[int, bytes], None]) -> None:
        self.state = QueueState(path)
        self._on_apply = on_apply

    def apply(self, index: int, data: bytes) -> Any:
        before = self.state.applied_index
        answer = self.state.apply(index, data)
        if self.state.applied_index > before:
            self._on_apply(index, self.state.digest())
        return answer

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, data: bytes) -> None:
        self.state.restore(data)
        if self.state.applied_index:
            self._on_apply(self.state.applied_index, self.state.digest())


@dataclass
class Client:
    name: str
    seq: int = 0
    answered: set[int] = field(default_factory=set)
    pending: tuple[int, bytes, str, Any] | None = None  # seq, command, kind, what it carries
    in_flight: bool = False
    held: dict[int, bytes] = field(default_factory=dict)  # claimed id -> payload

    @property
    def ack(self) -> int:
        ack = 1
        while ack in self.answered:
            ack += 1
        return ack  # every seq below it is answered


class QueueCluster(Cluster):
    def __init__(self, seed: int, options: SimOptions, workdir: Path, faults: Faults) -> None:
        self.queue_rng = random.Random(seed ^ 0xC0FFEE)
        self.clients = [Client(f"client-{i}") for i in range(CLIENTS)]
        self.acked_puts: set[bytes] = set()
        self.acked_done: set[bytes] = set()
        self.serial = 0
        super().__init__(seed, options, workdir, faults)

    def start(self, node: SimNode) -> None:
        assert node.replica is None
        if node.path is not None:
            from ww.raft.disk import DiskStorage

            node.storage = DiskStorage.open(node.path, node_id=node.id, cluster_id=1, sync=False)
        hard_state, _ = node.storage.initial_state()
        node.commit, node.term = hard_state.commit, hard_state.term
        node.sm = TrackedQueue(self.workdir / f"queue-{node.id}.db", self._check_digest)  # type: ignore[assignment]
        config = Config(
            id=node.id,
            election_tick=10,
            heartbeat_tick=1,
            storage=node.storage,
            max_size_per_msg=self.options.max_size_per_msg,
            max_inflight_msgs=self.options.max_inflight_msgs,
            check_quorum=True,
            pre_vote=True,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node.replica = Replica(
            config,
            node.storage,
            node.sm,  # type: ignore[arg-type]
            snapshot_interval=self.options.snapshot_interval,
            compaction_margin=self.options.compaction_margin,
            rng=random.Random(self.rng.getrandbits(64)),
        )

    def crash(self, node: SimNode) -> None:
        super().crash(node)
        node.sm.state.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        for node in self.nodes.values():
            if node.replica is not None:
                node.sm.state.close()  # type: ignore[attr-defined]
        super().close()

    # -- clients ----------------------------------------------------------------------------

    def propose(self, node: SimNode, client: int, data: bytes) -> bool:
        assert node.replica is not None
        try:
            request_id = node.replica.propose(stamp(data, self.now * TICK))
        except RaftError:
            return False
        self.requests[(node.id, request_id)] = Request(
            client, node.id, request_id, "queue", "", None, 0, self.now + 60
        )
        return True

    def client_turn(self) -> None:
        rng = self.queue_rng
        for i, client in enumerate(self.clients):
            if client.in_flight or rng.random() > 0.4:
                continue
            if client.pending is None:
                client.pending = self.next_command(client)
            node = self.nodes[rng.choice(sorted(self.nodes))]
            if node.replica is not None and self.propose(node, i, client.pending[1]):
                client.in_flight = True  # a retry sends the same (client, seq) again
        leader = self.leader()
        if leader is not None and self.now % 10 == 0:
            self.propose(leader, -1, Command.tick().encode())

    def next_command(self, client: Client) -> tuple[int, bytes, str, Any]:
        rng = self.queue_rng
        client.seq += 1
        session = {"client": client.name, "seq": client.seq, "ack": client.ack}
        r = rng.random()
        if client.held and r < 0.35:
            ids = sorted(client.held)[: rng.randint(1, 3)]
            results = [client.held[i] for i in ids]
            fresh = self.fresh_items(rng.randint(0, 2))
            command = Command.complete(
                client.name, ids, append={"results": results}, put={"urls": fresh}
            )
            return client.seq, command.encode(**session), "complete", (ids, results, fresh)
        if client.held and r < 0.4:
            ids = sorted(client.held)[:1]
            command = Command.release(client.name, ids, rng.choice((0.0, 0.5)))
            return client.seq, command.encode(**session), "release", ids
        if r < 0.7:
            fresh = self.fresh_items(rng.randint(1, 3))
            return client.seq, Command.put("urls", fresh).encode(**session), "put", fresh
        command = Command.claim("urls", client.name, rng.randint(1, 3), 2.0)
        return client.seq, command.encode(**session), "claim", None

    def fresh_items(self, n: int) -> list[Item]:
        out = []
        for _ in range(n):
            self.serial += 1
            key = f"k{self.serial}" if self.serial % 2 else None
            out.append(Item(b"p%d" % self.serial, key, self.queue_rng.choice(HOSTS)))
        return out

    def _record(self, req: Request, result: Any) -> None:
        if req.client < 0:
            return
        client = self.clients[req.client]
        client.in_flight = False
        assert client.pending is not None
        seq, _, kind, what = client.pending
        client.pending = None
        client.answered.add(seq)
        if "error" in result:
            if kind in ("complete", "release") and "lost" in result:
                for i in result["lost"]:
                    client.held.pop(i, None)
                return
            raise AssertionError(f"{kind} refused: {result}")
        if kind == "put":
            assert result == {"added": len(what), "duplicates": 0}, result
            self.acked_puts.update(item.payload for item in what)
        elif kind == "claim":
            for c in result["items"]:
                client.held[c["id"]] = c["payload"]
        elif kind == "complete":
            ids, results, fresh = what
            assert result["done"] == len(ids) and result["added"] == len(fresh), result
            self.acked_done.update(results)
            self.acked_puts.update(item.payload for item in fresh)
            for i in ids:
                client.held.pop(i)
        elif kind == "release":
            for i in what:
                client.held.pop(i)

    def _give_up(self, req: Request) -> None:
        if req.client >= 0:
            self.clients[req.client].in_flight = False  # retried on the next turn


def run(seed: int, workdir: Path, chaos_ticks: int = 250) -> dict[str, int]:
    rng = random.Random(seed)
    faults = Faults(
        drop=rng.choice((0.0, 0.05)),
        duplicate=rng.choice((0.0, 0.05)),
        max_delay=rng.choice((0, 3)),
    )
    options = SimOptions(nodes=3, disk=seed % 2 == 0, snapshot_interval=rng.choice((5, 20)))
    c = QueueCluster(seed, options, workdir, faults)
    crashes = 0
    try:
        for _ in range(chaos_ticks):
            r = rng.random()
            alive = c.alive()
            if r < 0.015 and len(alive) > 1:
                c.crash(rng.choice(alive))
                crashes += 1
            elif r < 0.05:
                down = [n for n in c.nodes.values() if n.replica is None]
                if down:
                    c.start(rng.choice(down))
            elif r < 0.06:
                ids = sorted(c.nodes)
                rng.shuffle(ids)
                c.net.partition([ids[: rng.randint(1, len(ids) - 1)]])
            elif r < 0.08:
                c.net.heal()
            c.client_turn()
            c.tick()
        # heal: everything up, a reliable network, until every client has its answers
        c.net.heal()
        c.net.faults = Faults.reliable()
        for node in c.nodes.values():
            if node.replica is None:
                c.start(node)
        for _ in range(3000):
            c.client_turn() if any(cl.pending for cl in c.clients) else None
            c.tick()
            done = not any(cl.pending for cl in c.clients)
            applied = {n.replica.applied for n in c.alive() if n.replica is not None}
            if done and len(applied) == 1 and c.leader() is not None:
                break
        else:
            raise AssertionError(f"seed {seed}: did not settle")
        leader = c.leader()
        assert leader is not None and leader.replica is not None and is_leader(leader.replica)
        states = [n.sm.state for n in c.nodes.values()]  # type: ignore[attr-defined]
        assert len({s.digest() for s in states}) == 1, "replicas differ at the same index"
        check_final(c, states[0])
        return {"crashes": crashes, "puts": len(c.acked_puts), "done": len(c.acked_done)}
    finally:
        c.close()


def check_final(c: QueueCluster, state: QueueState) -> None:
    conn = state._conn
    items = [p for (p,) in conn.execute("SELECT payload FROM items")]
    stats = state.query(Query.stats("results"))
    records = state.query(Query.read("results", 0, 10_000))["records"] if "kind" in stats else []
    results = [r for _, r in records]
    assert len(results) == len(set(results)), "a result was appended twice"
    assert len(items) == len(set(items)), "an item exists twice"
    assert not set(items) & set(results), "a completed item is still queued"
    assert c.acked_done <= set(results), "an acknowledged complete lost its results"
    missing = c.acked_puts - set(items) - set(results)
    assert not missing, f"acknowledged puts lost: {sorted(missing)[:5]}"


SEEDS = int(os.environ.get("QUEUE_SIM_SEEDS", 12))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_queue_under_raft_faults_loses_nothing_and_does_nothing_twice(seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"queue-sim-{seed}-") as tmp:
        stats = run(seed, Path(tmp))
    assert stats["puts"] > 0 and stats["done"] > 0, stats
