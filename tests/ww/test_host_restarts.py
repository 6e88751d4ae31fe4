"""Volumes and restart policies, with real hosts and real ROM processes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.ww.conftest import HostFactory, wait_for
from ww.rom import build_rom
from ww.rpc import RemoteError

# Appends "<pid> <time>" to volume()/starts, records home(), then acts on args[0]:
# "crash" exits 1, "done" exits 0, "sleep" runs until killed.
BODY = """
import os, sys, time
import trio
from ww.rom.guest import home, volume

async def main(host, args):
    v = volume()
    if v is not None:
        with open(v / "starts", "a") as f:
            f.write(f"{os.getpid()} {time.time()} {home()}\\n")
    if args[0] == "crash":
        return 1
    if args[0] == "done":
        return 0
    await trio.sleep_forever()
"""


def rom_bytes(tmp_path: Path, body: str = BODY) -> bytes:
    src = tmp_path / "rom-src"
    src.mkdir(exist_ok=True)
    (src / "rom.toml").write_text('name = "t"\nversion = "1"\nentry = "t:main"\n')
    (src / "t.py").write_text(textwrap.dedent(body))
    return build_rom(src)


def starts(data_dir: Path, name: str) -> list[list[str]]:
    path = data_dir / "volumes" / name / "starts"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def anchor_at(host: Any, peer: str, path: str) -> Any:
    return await (await host.root()).walk(f"/{peer}/{path}")


def ww(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ww", *args], capture_output=True, text=True, timeout=30
    )


async def test_volume_survives_a_restart_of_the_process_and_of_the_host(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start(name="h")
    async with h.connect() as host:
        anchor = await anchor_at(host, h.peer, "raft/v1")
        process = await anchor.spawn(rom_bytes(tmp_path), ["sleep"], volume=True, restart="always")
        info = await process.info()
        assert info["anchor"] == f"/{h.peer}/raft/v1"
        assert info["volume"] == str(h.data_dir / "volumes" / "raft+v1")
        await wait_for(lambda: len(starts(h.data_dir, "raft+v1")) == 1)
        first_pid = info["pid"]
        os.kill(first_pid, 9)  # the process dies: restarted, same volume, same anchor
        await wait_for(lambda: len(starts(h.data_dir, "raft+v1")) == 2)
        rows = await host.ps()
        assert [r["restarts"] for r in rows] == [1]
        assert rows[0]["pid"] != first_pid
    h.kill()
    await h.process.wait()
    h2 = await host_factory.start(name="h2", data_dir=h.data_dir)
    assert h2.peer == h.peer
    await wait_for(lambda: len(starts(h.data_dir, "raft+v1")) == 3)
    lines = starts(h.data_dir, "raft+v1")
    assert {line[2] for line in lines} == {f"/{h.peer}/raft/v1"}
    async with h2.connect() as host:
        (row,) = await host.ps()
        assert row["anchor"] == f"/{h.peer}/raft/v1" and row["state"] == "running"
        assert row["args"] == ["sleep"] and row["restart"] == "always"
        assert await (await anchor_at(host, h.peer, "raft")).ls() == ["v1"]


async def test_on_failure_restarts_a_crashing_rom_with_backoff(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        anchor = await anchor_at(host, h.peer, "crash")
        await anchor.spawn(rom_bytes(tmp_path), ["crash"], volume=True, restart="on-failure")
        await wait_for(lambda: len(starts(h.data_dir, "crash")) >= 4, timeout=30)
        times = [float(line[1]) for line in starts(h.data_dir, "crash")[:4]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, delay in zip(gaps, (0.1, 0.2, 0.4), strict=True):
            assert gap >= delay
        (row,) = await host.ps()
        assert row["restarts"] >= 3 and row["restart"] == "on-failure"
    out = await trio.to_thread.run_sync(ww, "ps", "--dial", h.address)
    assert out.returncode == 0, out.stderr
    header, line = out.stdout.splitlines()
    assert header.split() == ["PID", "NAME", "STATE", "EXIT_CODE", "RESTART", "RESTARTS"]
    assert line.split()[4] == "on-failure" and int(line.split()[5]) >= 3


async def test_exit_0_is_not_restarted_under_on_failure(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        anchor = await anchor_at(host, h.peer, "once")
        process = await anchor.spawn(
            rom_bytes(tmp_path), ["done"], volume=True, restart="on-failure"
        )
        assert await process.wait() == 0
        (row,) = await host.ps()
        assert row["restarts"] == 0 and row["state"] == "exited"
    assert os.listdir(h.data_dir / "restarts") == []  # nothing to start after a host restart
    assert len(starts(h.data_dir, "once")) == 1


async def test_a_killed_process_is_not_restarted_even_after_a_host_restart(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start(name="h")
    async with h.connect() as host:
        anchor = await anchor_at(host, h.peer, "k")
        process = await anchor.spawn(rom_bytes(tmp_path), ["sleep"], volume=True, restart="always")
        await wait_for(lambda: len(starts(h.data_dir, "k")) == 1)
        pid = (await process.info())["pid"]
    out = await trio.to_thread.run_sync(ww, "kill", "--dial", h.address, str(pid))
    assert out.returncode == 0, out.stderr
    async with h.connect() as host:
        assert await process_wait(host, pid) == -15
    assert os.listdir(h.data_dir / "restarts") == []
    h.kill()
    await h.process.wait()
    h2 = await host_factory.start(name="h2", data_dir=h.data_dir)
    async with h2.connect() as host:
        assert await host.ps() == []
    assert len(starts(h.data_dir, "k")) == 1


async def process_wait(host: Any, pid: int) -> int:
    async def exited() -> bool:
        rows = [r for r in await host.ps() if r["pid"] == pid]
        return bool(rows) and rows[0]["state"] in ("exited", "killed")

    await wait_for(exited)
    (row,) = [r for r in await host.ps() if r["pid"] == pid]
    code: int = row["exit_code"]
    return code


async def test_a_second_holder_of_a_volume_is_refused(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        anchor = await anchor_at(host, h.peer, "db")
        process = await anchor.spawn(rom_bytes(tmp_path), ["sleep"], volume=True)
        pid = (await process.info())["pid"]
        await wait_for(lambda: len(starts(h.data_dir, "db")) == 1)
        with pytest.raises(RemoteError, match=f"held by pid {pid}"):
            await anchor.spawn(rom_bytes(tmp_path), ["sleep"], volume=True)
        with pytest.raises(RemoteError, match="a volume belongs to an anchor"):
            await host.spawn(rom_bytes(tmp_path), ["sleep"], volume=True)
        await process.kill()
        assert await process.wait() == -15
        again = await anchor.spawn(rom_bytes(tmp_path), ["done"], volume=True)
        assert await again.wait() == 0
        assert len(starts(h.data_dir, "db")) == 2


async def test_ww_volumes_lists_and_removes(host_factory: HostFactory, tmp_path: Path) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        busy = await (await anchor_at(host, h.peer, "a/busy")).spawn(
            rom_bytes(tmp_path), ["sleep"], volume=True
        )
        idle = await (await anchor_at(host, h.peer, "a/idle")).spawn(
            rom_bytes(tmp_path), ["done"], volume=True
        )
        assert await idle.wait() == 0
        busy_pid = (await busy.info())["pid"]
        await wait_for(lambda: len(starts(h.data_dir, "a+busy")) == 1)
    out = await trio.to_thread.run_sync(ww, "volumes", "--dial", h.address)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0] == ["ANCHOR", "SIZE", "PID", "PATH"]
    assert rows[1][0] == f"/{h.peer}/a/busy" and rows[1][2] == str(busy_pid)
    assert rows[2][0] == f"/{h.peer}/a/idle" and rows[2][2] == "-"
    assert int(rows[2][1]) > 0 and rows[2][3] == str(h.data_dir / "volumes" / "a+idle")

    out = await trio.to_thread.run_sync(
        ww, "volumes", "rm", "--dial", h.address, f"/{h.peer}/a/busy"
    )
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and f"in use by pid {busy_pid}" in out.stderr
    out = await trio.to_thread.run_sync(
        ww, "volumes", "rm", "--dial", h.address, f"/{h.peer}/a/idle"
    )
    assert out.returncode == 0, out.stderr
    assert not (h.data_dir / "volumes" / "a+idle").exists()
    assert (h.data_dir / "volumes" / "a+busy").exists()
    async with h.connect() as host:
        with pytest.raises(RemoteError, match="is not on this host"):
            await host.remove_volume("/someone/else")
        with pytest.raises(RemoteError, match=r"uses '\.\.'"):
            await host.remove_volume(f"/{h.peer}/../x")


async def test_a_damaged_restart_record_is_skipped_and_the_host_starts(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start(name="h")
    async with h.connect() as host:
        anchor = await anchor_at(host, h.peer, "good")
        await anchor.spawn(rom_bytes(tmp_path), ["sleep"], volume=True, restart="always")
    h.kill()
    await h.process.wait()
    records = h.data_dir / "restarts"
    (records / "00000000000000aa.json").write_bytes(b"{not json")
    (records / "00000000000000bb.json").write_text(json.dumps({"format": 1, "cid": "x"}))
    h2 = await host_factory.start(name="h2", data_dir=h.data_dir)
    async with h2.connect() as host:
        await wait_for(lambda: len(starts(h.data_dir, "good")) == 2)
        (row,) = await host.ps()
        assert row["anchor"] == f"/{h.peer}/good"
    skipped = [line for line in h2.lines if "skipping restart record" in line]
    assert len(skipped) == 2
    assert any("00000000000000aa.json: not JSON" in line for line in skipped)


async def test_a_remote_anchor_spawns_with_a_volume_on_its_own_host(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    a, b = await host_factory.cluster(2)
    async with a.connect() as host:
        anchor = await anchor_at(host, b.peer, "raft/v1")
        process = await anchor.spawn(rom_bytes(tmp_path), ["crash"], volume=True, restart="no")
        assert await process.wait() == 1
        info = await process.info()
        assert info["anchor"] == f"/{b.peer}/raft/v1" and info["restart"] == "no"
    (line,) = starts(b.data_dir, "raft+v1")
    assert line[2] == f"/{b.peer}/raft/v1"
    assert not (a.data_dir / "volumes" / "raft+v1").exists()


async def test_the_rom_of_a_recorded_process_stays_cached_past_the_limit(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    no_cache = ["--rom-cache-limit", "0"]
    h = await host_factory.start(name="h", args=no_cache)
    async with h.connect() as host:
        anchor = await anchor_at(host, h.peer, "pinned")
        await anchor.spawn(rom_bytes(tmp_path), ["sleep"], volume=True, restart="always")
        await wait_for(lambda: len(starts(h.data_dir, "pinned")) == 1)
    h.kill()
    await h.process.wait()
    # A cache of 0 bytes keeps only ROMs in use; at start nothing runs yet, but the record's
    # ROM is pinned, so the host can start the process again.
    h2 = await host_factory.start(name="h2", data_dir=h.data_dir, args=no_cache)
    await wait_for(lambda: len(starts(h.data_dir, "pinned")) == 2)
    assert not any("cannot start recorded process" in line for line in h2.lines)
