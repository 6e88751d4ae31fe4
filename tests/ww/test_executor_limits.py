"""The executor's disk limits, with real child processes and real files: capped per-process
logs, pruned old logs, and a ROM cache bounded by size that never evicts a ROM in use."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.ww.conftest import connect
from tests.ww.test_executor import SLEEPER, Probe, make_rom, spawn
from ww.host import HostConfig, run_host
from ww.rom import Rom
from ww.rom.executor import KEEP_LOGS, LOG_LIMIT, ROM_CACHE_LIMIT, Executor, RomCache
from ww.rpc import RemoteError

CHATTY = """
import sys

async def main(host, args):
    for i in range(int(args[0])):
        print(f"line {i:06d} " + "x" * 40)
    print("the end", file=sys.stderr)
"""


def log_files(executor: Executor, pid: int) -> list[Path]:
    return sorted(executor.logs_dir.glob(f"*-{pid}-*"))


def quick_rom(root: Path, n: int) -> Rom:
    """A small ROM, distinct for each `n`, that prints `n`."""
    return make_rom(root / f"r{n}", f"async def main(host, args):\n    print({n})\n")


async def test_a_rom_printing_more_than_the_log_limit_keeps_its_newest_output(
    tmp_path: Path,
) -> None:
    limit = 64 * 1024
    async with Executor(tmp_path / "data", log_limit=limit) as executor:
        handle, _ = await spawn(executor, make_rom(tmp_path, CHATTY), ["20000"])  # ~1 MiB
        assert await handle.wait() == 0
    files = log_files(executor, handle.pid)
    assert [f.name for f in files] == [handle.log_path.name, handle.log_path.name + ".1"]
    assert sum(f.stat().st_size for f in files) <= limit
    logs = handle.read_logs()
    assert logs.endswith(b"line 019999 " + b"x" * 40 + b"\nthe end\n")
    assert len(logs) >= limit // 2
    numbers = [int(n) for n in re.findall(rb"^line (\d+) x{40}$", logs, re.MULTILINE)]
    assert numbers == list(range(numbers[0], 20000))  # the newest lines, none missing
    assert numbers[0] > 0
    assert handle.read_logs(100) == logs[-100:]


async def test_a_grandchild_writing_on_after_the_rom_exits_does_not_hold_up_wait(
    tmp_path: Path,
) -> None:
    rom = make_rom(
        tmp_path,
        """
        import subprocess

        async def main(host, args):
            subprocess.Popen(["yes", "spam"])  # inherits the output pipe and never stops
        """,
    )
    limit = 16 * 1024
    async with Executor(tmp_path / "data", log_limit=limit) as executor:
        handle, _ = await spawn(executor, rom)
        try:
            with trio.fail_after(10):
                assert await handle.wait() == 0
            assert b"spam\nspam\n" in handle.read_logs()
            assert sum(f.stat().st_size for f in log_files(executor, handle.pid)) <= limit
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.pid, signal.SIGKILL)  # `yes`, if it outlived its pipe


async def test_old_logs_are_deleted_but_never_a_running_process_log(tmp_path: Path) -> None:
    async with Executor(tmp_path / "data", keep_logs=2, kill_grace=0.5) as executor:
        sleeper, probe = await spawn(executor, make_rom(tmp_path / "s", SLEEPER))
        await probe.noted.wait()
        quick = []
        for n in range(4):
            handle, _ = await spawn(executor, quick_rom(tmp_path, n))
            assert await handle.wait() == 0
            quick.append(handle)
        on_disk = {p.name for p in executor.logs_dir.iterdir()}
        assert on_disk == {h.log_path.name for h in (sleeper, quick[2], quick[3])}
        assert quick[0].read_logs() == b""
        assert quick[3].read_logs() == b"3\n"
        sleeper.kill()
        assert await sleeper.wait() == -signal.SIGTERM
        on_disk = {p.name for p in executor.logs_dir.iterdir()}
        assert on_disk == {h.log_path.name for h in (quick[3], sleeper)}


def test_logs_from_an_earlier_run_are_pruned_at_start(tmp_path: Path) -> None:
    logs = tmp_path / "data" / "logs"
    logs.mkdir(parents=True)
    for age, name in enumerate(["e.log", "d.log", "c.log", "b.log", "a.log"]):
        for path in (logs / name, logs / f"{name}.1"):
            path.write_bytes(b"old output")
            os.utime(path, ns=(10**18 - age * 10**9,) * 2)
    (logs / "notes.txt").write_text("not a log")
    Executor(tmp_path / "data", keep_logs=2)
    assert sorted(p.name for p in logs.iterdir()) == [
        "d.log",
        "d.log.1",
        "e.log",
        "e.log.1",
        "notes.txt",
    ]


def test_the_rom_cache_evicts_the_least_recently_used_rom_first(tmp_path: Path) -> None:
    a, b, c, d = (quick_rom(tmp_path, n) for n in range(4))
    sizes = {rom.cid: len(rom.data) for rom in (a, b, c, d)}
    assert len(set(sizes.values())) == 1  # builds are deterministic: the same size each time
    limit = sizes[a.cid] + sizes[c.cid] + sizes[d.cid]
    cache = RomCache(tmp_path / "roms", limit, in_use=lambda: ())
    for rom in (a, b, c):
        cache.put(rom)
    assert cache.get(a.cid) is not None  # a use: b is now the least recently used
    cache.put(d)
    assert cache.cids() == [c.cid, a.cid, d.cid]
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(f"{r.cid}.rom" for r in (a, c, d))
    assert cache.size == limit
    assert cache.get(b.cid) is None  # evicted: the caller sends it again
    cache.put(b)
    assert cache.cids() == [a.cid, d.cid, b.cid]
    assert cache.size <= limit

    # The order survives a restart: reopened with room for one ROM, the last one used stays.
    assert cache.get(d.cid) is not None
    reopened = RomCache(tmp_path / "roms", sizes[d.cid], in_use=lambda: ())
    assert reopened.cids() == [d.cid]
    assert [p.name for p in reopened.root.iterdir()] == [f"{d.cid}.rom"]


async def test_the_rom_of_a_running_process_is_never_evicted(tmp_path: Path) -> None:
    async with Executor(tmp_path / "data", rom_cache_limit=0, kill_grace=0.5) as executor:
        sleeper_rom = make_rom(tmp_path / "s", SLEEPER)
        sleeper, probe = await spawn(executor, sleeper_rom)
        await probe.noted.wait()
        a, b = quick_rom(tmp_path, 1), quick_rom(tmp_path, 2)
        executor.cache_put(a)
        executor.cache_put(b)  # a goes: with no room, only ROMs in use and the newest stay
        assert executor.rom_cache.cids() == [sleeper_rom.cid, b.cid]
        assert executor.cache_get(a.cid) is None
        assert executor.cache_path(sleeper_rom.cid).read_bytes() == sleeper_rom.data
        sleeper.kill()
        await sleeper.wait()
        executor.cache_put(a)
        assert executor.rom_cache.cids() == [a.cid]
        assert sorted(executor.roms_dir.iterdir()) == [executor.cache_path(a.cid)]


async def test_a_rom_being_spawned_is_not_evicted_before_its_process_reads_it(
    tmp_path: Path,
) -> None:
    """The bootstrap is made while the child starts up; storing another ROM then (as a
    concurrent spawn would) must leave this one in place for the child to load."""
    other = quick_rom(tmp_path, 9)
    async with Executor(tmp_path / "data", rom_cache_limit=0) as executor:
        probe = Probe()

        def bootstrap(_handle: Any) -> Probe:
            executor.cache_put(other)
            return probe

        rom = make_rom(tmp_path / "t", "async def main(host, args):\n    await host.note('ran')\n")
        handle = await executor.spawn(rom, [], bootstrap)
        assert await handle.wait() == 0, handle.read_logs()
        assert probe.notes == ["ran"]


async def test_a_host_caps_logs_and_asks_for_an_evicted_rom_again(tmp_path: Path) -> None:
    config = HostConfig(
        listen=("127.0.0.1", 0), data_dir=tmp_path / "host", log_limit=8192, rom_cache_limit=0
    )
    chatty = make_rom(tmp_path / "c", CHATTY)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(run_host, config)
        async with connect(info.addr) as host:
            process = await host.spawn(chatty.data, ["1000"])
            assert await process.wait() == 0
            logs = await host.logs((await process.info())["pid"])
            assert 4096 <= len(logs) <= 8192
            assert logs.endswith(b"line 000999 " + b"x" * 40 + b"\nthe end\n")

            other = quick_rom(tmp_path, 1)
            assert await (await host.spawn(other.data)).wait() == 0  # evicts chatty
            with pytest.raises(RemoteError, match="send the ROM itself"):
                await host.spawn(chatty.cid, ["1"])
            assert await (await host.spawn(chatty.data, ["1"])).wait() == 0
            assert await (await host.spawn(chatty.cid, ["1"])).wait() == 0  # cached again
        nursery.cancel_scope.cancel()


def test_start_flags_reach_the_host_config_and_bad_values_are_one_line(tmp_path: Path) -> None:
    from ww.cli import build_parser

    defaults = build_parser().parse_args(["start"])
    assert (defaults.log_limit, defaults.keep_logs, defaults.rom_cache_limit) == (
        LOG_LIMIT,
        KEEP_LOGS,
        ROM_CACHE_LIMIT,
    )
    given = build_parser().parse_args(
        ["start", "--log-limit", "512K", "--keep-logs", "7", "--rom-cache-limit", "2GiB"]
    )
    assert (given.log_limit, given.keep_logs, given.rom_cache_limit) == (512 << 10, 7, 2 << 30)

    def ww_start(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ww", "start", "--listen", "127.0.0.1:0", *args]
        argv += ["--data-dir", str(tmp_path / "host")]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    for args, code, complaint in [
        (["--log-limit", "lots"], 2, "--log-limit: 'lots' is not a size in bytes, e.g. 512K"),
        (["--rom-cache-limit", "-1"], 2, "--rom-cache-limit: '-1' is not a size in bytes"),
        (["--keep-logs", "some"], 2, "--keep-logs: 'some' is not a whole number"),
        (["--log-limit", "100"], 1, "log limit of 100 bytes is too small; pass --log-limit"),
    ]:
        result = ww_start(*args)
        assert result.returncode == code, result.stderr
        assert complaint in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
