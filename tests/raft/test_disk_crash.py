"""DiskStorage under `kill -9`: a child process saves in a loop and reports each operation once
it has returned; the test kills it at a random instant, reopens the storage, and checks that it
holds exactly the state after the last reported operation, or after the one in flight.

Run as a script, this file is the child: `python test_disk_crash.py DIR SEED ROUND`.
"""

from __future__ import annotations

import copy
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage_probe import observe

from ww.raft.disk import DiskStorage
from ww.raft.memory import MemoryStorage
from ww.raft.storage import LogStorage
from ww.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata

SEED = 20260
ROUNDS = 9
CONF = ConfState(voters=(1, 2, 3))
SEGMENT_SIZE = 16 * 1024  # small, so rolls and compactions happen under the kills


def open_storage(path: str | Path) -> DiskStorage:
    return DiskStorage.open(
        path, node_id=1, cluster_id="crash", conf_state=CONF, segment_size=SEGMENT_SIZE
    )


def operation(rng: random.Random, s: LogStorage) -> None:
    """One durable call, chosen from the storage's state: a save (sometimes replacing a
    conflicting suffix), a snapshot, a compaction, or a snapshot installed from a leader."""
    first, last = s.first_index(), s.last_index()
    hs = s.initial_state()[0]
    term = max(hs.term, s.term(last), 1)
    snap_index = s.snapshot().metadata.index
    r = rng.random()
    if r < 0.04 and hs.commit > max(snap_index, first - 1):
        s.create_snapshot(hs.commit, CONF, rng.randbytes(rng.randint(0, 4000)))
    elif r < 0.08 and snap_index - 10 >= first:
        s.compact(snap_index - 10)
    elif r < 0.09:
        index = max(last, snap_index + 1) + rng.randint(0, 3)
        snap = Snapshot(rng.randbytes(2000), SnapshotMetadata(index, term + 1, CONF))
        after = [Entry(term + 1, index + i, data=rng.randbytes(50)) for i in range(1, 3)]
        s.save(HardState(term + 1, 0, index), after[: rng.randint(0, 2)], snap)
    else:
        start = last + 1
        if rng.random() < 0.1 and last > hs.commit:
            term += 1
            start = rng.randint(max(first, hs.commit + 1), last)
        n = rng.randint(1, 8)
        entries = [
            Entry(term, start + i, data=rng.randbytes(rng.randint(0, 400))) for i in range(n)
        ]
        commit = max(hs.commit, min(start - 1, hs.commit + rng.randint(0, 8)))
        s.save(HardState(term, 1, commit), entries, None)


def child(path: str, seed: int, round_: int) -> None:
    storage = open_storage(path)
    rng = random.Random(f"{seed}/{round_}")
    done = 0
    print(done, flush=True)
    while True:
        operation(rng, storage)
        done += 1
        print(done, flush=True)


def run_and_kill(path: Path, round_: int, rng: random.Random) -> int:
    """Start the child, kill -9 it at a random instant, return how many operations it reported
    as done."""
    proc = subprocess.Popen(
        [sys.executable, __file__, str(path), str(SEED), str(round_)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    if round_ % 3 == 0:
        # At a random time from the start: during startup, recovery or the loop.
        time.sleep(rng.uniform(0.0, 0.5))
    elif round_ % 3 == 1:
        # At a random time once the storage is open.
        lines = [proc.stdout.readline()]
        time.sleep(rng.uniform(0.0, 0.5))
    else:
        # Some operations in, at whatever the child is doing when the signal lands.
        lines = [proc.stdout.readline() for _ in range(rng.randint(1, 150))]
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the child failed by itself:\n{err}"
    lines = (" ".join(lines) + out).split()
    return int(lines[-1]) if lines else 0


def test_kill_9_at_random_instants_loses_nothing_reported(tmp_path: Path) -> None:
    path = tmp_path / "data"
    rng = random.Random(SEED)
    model = MemoryStorage(CONF)  # the state the operations the child reported lead to
    for round_ in range(ROUNDS):
        reported = run_and_kill(path, round_, rng)
        ops = random.Random(f"{SEED}/{round_}")
        for _ in range(reported):
            operation(ops, model)
        in_flight = copy.deepcopy(model)
        operation(ops, in_flight)  # the one the child may have finished without reporting
        with open_storage(path) as disk:
            got = observe(disk)
        if got == observe(in_flight):
            model = in_flight
        else:
            assert got == observe(model), (
                f"round {round_}: after {reported} reported operations the storage holds "
                f"{got[1:3]} (first, last index), expected {observe(model)[1:3]}"
            )
    assert model.last_index() > 50, "the child should have made progress"


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
