"""The executor: real child processes running ROMs, talking to a test capability over ww.rpc."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from ww.rom import Rom, RomError, build_rom
from ww.rom.executor import Executor, ProcessHandle
from ww.rpc import Capability


class Held(Capability):
    """A capability the host hands to a guest; records when the guest's hold ends."""

    def __init__(self) -> None:
        self.released = trio.Event()

    async def _on_release(self) -> None:
        self.released.set()


class Probe(Capability):
    """The bootstrap capability the tests serve to their ROMs."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.noted = trio.Event()
        self.held: list[Held] = []
        self.released = trio.Event()

    async def note(self, text: str) -> str:
        self.notes.append(text)
        self.noted.set()
        return f"noted {text}"

    async def hold(self) -> Held:
        held = Held()
        self.held.append(held)
        return held

    async def _on_release(self) -> None:
        self.released.set()


def make_rom(
    root: Path,
    body: str,
    *,
    name: str = "t",
    toml_extra: str = "",
    files: dict[str, str] | None = None,
) -> Rom:
    """A ROM whose module `t` holds `body` (an `async def main(host, args)` and helpers)."""
    src = root / name
    src.mkdir(parents=True)
    for rel, text in (files or {}).items():
        (src / rel).write_text(text)
    (src / "rom.toml").write_text(f'name = "{name}"\nversion = "1"\nentry = "t:main"\n{toml_extra}')
    (src / "t.py").write_text(textwrap.dedent(body))
    return Rom.load(build_rom(src))


@pytest.fixture
async def executor(tmp_path: Path) -> Any:
    async with Executor(tmp_path / "data", kill_grace=0.5) as ex:
        yield ex


async def spawn(
    executor: Executor, rom: Rom, args: list[str] | None = None, **limits: Any
) -> tuple[ProcessHandle, Probe]:
    probe = Probe()
    handle = await executor.spawn(rom, args or [], lambda _handle: probe, **limits)
    return handle, probe


async def test_guest_calls_the_host_capability(executor: Executor, tmp_path: Path) -> None:
    rom = make_rom(
        tmp_path,
        """
        from ww.rom.guest import rom_data

        async def main(host, args):
            reply = await host.note(" ".join(args) + " " + rom_data("greeting").decode())
            print(reply)
        """,
        toml_extra='[embed]\n"greeting" = "greeting.txt"\n',
        files={"greeting.txt": "hi"},
    )
    handle, probe = await spawn(executor, rom, ["a", "-b"])
    assert await handle.wait() == 0
    assert probe.notes == ["a -b hi"]
    assert b"noted a -b hi" in handle.read_logs()
    assert probe.released.is_set()  # the connection closed, so the bootstrap was released
    assert handle.state == "exited"
    assert handle.info()["exit_code"] == 0


async def test_exit_codes_reach_wait(executor: Executor, tmp_path: Path) -> None:
    returns = make_rom(tmp_path / "a", "async def main(host, args):\n    return 3\n")
    exits = make_rom(tmp_path / "b", "import sys\nasync def main(host, args):\n    sys.exit(7)\n")
    (h1, _), (h2, _) = await spawn(executor, returns), await spawn(executor, exits)
    assert (await h1.wait(), await h2.wait()) == (3, 7)


async def test_a_rom_that_raises_exits_1_with_its_traceback_in_the_logs(
    executor: Executor, tmp_path: Path
) -> None:
    rom = make_rom(
        tmp_path,
        """
        def helper():
            raise ValueError("boom from the rom")

        async def main(host, args):
            helper()
        """,
    )
    handle, _ = await spawn(executor, rom)
    assert await handle.wait() == 1
    logs = handle.read_logs().decode()
    assert "Traceback" in logs
    assert "ValueError: boom from the rom" in logs
    assert 'raise ValueError("boom from the rom")' in logs  # source lines come from the ROM
    assert handle.log_path.parent == tmp_path / "data" / "logs"


async def test_a_rom_missing_a_required_package_is_refused_at_spawn(
    executor: Executor, tmp_path: Path
) -> None:
    rom = make_rom(
        tmp_path,
        "async def main(host, args):\n    pass\n",
        toml_extra='requires = ["no_such_pkg_ww"]\n',
    )
    with pytest.raises(RomError, match="no_such_pkg_ww"):
        await spawn(executor, rom)
    assert executor.processes() == []


SLEEPER = """
import signal
import trio

async def main(host, args):
    if args == ["ignore-term"]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await host.note("ready")
    await trio.sleep_forever()
"""


async def test_processes_run_side_by_side_with_their_own_logs(
    executor: Executor, tmp_path: Path
) -> None:
    rom = make_rom(
        tmp_path,
        """
        async def main(host, args):
            print("I am", args[0])
            await host.note(args[0])
        """,
    )
    probe = Probe()
    handles = [await executor.spawn(rom, [str(i)], lambda _h: probe) for i in range(4)]
    assert [await h.wait() for h in handles] == [0, 0, 0, 0]
    assert sorted(probe.notes) == ["0", "1", "2", "3"]
    assert [h.read_logs() for h in handles] == [f"I am {i}\n".encode() for i in range(4)]
    assert len({h.log_path for h in handles}) == 4
    assert [h.pid for h in executor.processes()] == [h.pid for h in handles]
    executor.forget(handles[0].pid)
    assert executor.get(handles[0].pid) is None
    assert executor.get(handles[1].pid) is handles[1]


async def test_kill_sends_sigterm(executor: Executor, tmp_path: Path) -> None:
    handle, probe = await spawn(executor, make_rom(tmp_path, SLEEPER))
    await probe.noted.wait()
    assert handle.state == "running"
    assert [h.pid for h in executor.processes()] == [handle.pid]
    handle.kill()
    assert await handle.wait() == -signal.SIGTERM
    assert handle.state == "killed"
    assert probe.released.is_set()


async def test_kill_escalates_to_sigkill_when_sigterm_is_ignored(
    executor: Executor, tmp_path: Path
) -> None:
    handle, probe = await spawn(executor, make_rom(tmp_path, SLEEPER), ["ignore-term"])
    await probe.noted.wait()
    handle.kill()
    assert await handle.wait() == -signal.SIGKILL


async def test_stopping_the_executor_kills_its_children(tmp_path: Path) -> None:
    async with Executor(tmp_path / "data", kill_grace=0.5) as executor:
        handle, probe = await spawn(executor, make_rom(tmp_path, SLEEPER))
        await probe.noted.wait()
    assert handle.exit_code == -signal.SIGTERM
    assert probe.released.is_set()
    with pytest.raises(ProcessLookupError):
        os.kill(handle.pid, 0)


async def test_an_executor_run_in_a_nursery_kills_its_children_when_cancelled(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        executor = await nursery.start(Executor(tmp_path / "data", kill_grace=0.5).run)
        handle, probe = await spawn(executor, make_rom(tmp_path, SLEEPER), ["ignore-term"])
        await probe.noted.wait()
        nursery.cancel_scope.cancel()
    assert handle.exit_code == -signal.SIGKILL  # it ignored SIGTERM for the whole grace
    assert probe.released.is_set()
    with pytest.raises(RuntimeError, match="not running"):
        await spawn(executor, make_rom(tmp_path / "late", SLEEPER))


async def test_capabilities_a_guest_held_are_released_when_it_exits(
    executor: Executor, tmp_path: Path
) -> None:
    rom = make_rom(
        tmp_path,
        """
        import os, subprocess, sys

        async def main(host, args):
            held = await host.hold()
            # A grandchild inherits our end of the host socket and outlives us.
            fd = int(sys.orig_argv[sys.orig_argv.index("--fd") + 1])
            child = subprocess.Popen(["sleep", "30"], pass_fds=(fd,))
            await host.note(str(child.pid))
        """,
    )
    handle, probe = await spawn(executor, rom)
    try:
        assert await handle.wait() == 0
        assert len(probe.held) == 1
        assert probe.held[0].released.is_set()
        assert probe.released.is_set()
    finally:
        os.kill(int(probe.notes[0]), signal.SIGKILL)


async def test_memory_limit_kills_the_rom_not_the_host(executor: Executor, tmp_path: Path) -> None:
    rom = make_rom(
        tmp_path,
        """
        async def main(host, args):
            await host.note("allocating")
            hog = bytearray(1024 * 1024 * 1024)
            await host.note(f"allocated {len(hog)}")
        """,
    )
    handle, probe = await spawn(executor, rom, memory_limit=256 * 1024 * 1024)
    assert await handle.wait() == 1
    assert probe.notes == ["allocating"]
    assert b"MemoryError" in handle.read_logs()
    # The host side is fine: the next ROM runs.
    again, _ = await spawn(
        executor, make_rom(tmp_path / "again", "async def main(h, a):\n    pass\n")
    )
    assert await again.wait() == 0


async def test_cpu_limit_stops_a_busy_rom(executor: Executor, tmp_path: Path) -> None:
    rom = make_rom(tmp_path, "async def main(host, args):\n    while True:\n        pass\n")
    handle, _ = await spawn(executor, rom, cpu_seconds=1)
    assert await handle.wait() == -signal.SIGXCPU


async def test_limits_are_set_in_the_child(executor: Executor, tmp_path: Path) -> None:
    rom = make_rom(
        tmp_path,
        """
        import resource

        async def main(host, args):
            for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_CORE"):
                await host.note(f"{name} {resource.getrlimit(getattr(resource, name))}")
        """,
    )
    handle, probe = await spawn(executor, rom, memory_limit=300 << 20, cpu_seconds=4.5)
    assert await handle.wait() == 0
    assert probe.notes == [
        f"RLIMIT_AS {(300 << 20, 300 << 20)}",
        "RLIMIT_CPU (5, 6)",
        "RLIMIT_CORE (0, 0)",  # always: a crashing ROM drops no core files
    ]


async def test_bad_limits_are_refused(executor: Executor, tmp_path: Path) -> None:
    rom = make_rom(tmp_path, "async def main(host, args):\n    pass\n")
    with pytest.raises(ValueError, match="memory_limit"):
        await spawn(executor, rom, memory_limit=-1)
    with pytest.raises(ValueError, match="cpu_seconds"):
        await spawn(executor, rom, cpu_seconds=0)


async def test_a_crashing_or_misbehaving_child_does_not_take_the_host_down(
    executor: Executor, tmp_path: Path
) -> None:
    aborts = make_rom(tmp_path / "a", "import os\nasync def main(host, args):\n    os.abort()\n")
    garbage = make_rom(
        tmp_path / "b",
        """
        import os, sys, trio

        async def main(host, args):
            fd = int(sys.orig_argv[sys.orig_argv.index("--fd") + 1])
            os.write(fd, b"\\xff" * 64)  # not a frame the host can read
            await trio.sleep_forever()  # the host hangs up on us
        """,
    )
    h1, _ = await spawn(executor, aborts)
    h2, p2 = await spawn(executor, garbage)
    assert await h1.wait() == -signal.SIGABRT
    # The host hangs up on the bad connection, and a guest without its host stops.
    assert await h2.wait() == 1
    assert p2.released.is_set()
    assert b"connection to the host ended" in h2.read_logs()
    ok, probe = await spawn(executor, make_rom(tmp_path / "c", SLEEPER))
    await probe.noted.wait()
    ok.kill()
    assert await ok.wait() == -signal.SIGTERM


async def test_rom_cache_by_content_id(executor: Executor, tmp_path: Path) -> None:
    rom = make_rom(tmp_path, "async def main(host, args):\n    pass\n")
    cid = executor.cache_put(rom.data)
    assert cid == rom.cid
    path = executor.cache_path(cid)
    before = path.stat()
    assert executor.cache_put(rom.data) == cid  # a hit: the file is not rewritten
    assert executor.cache_put(rom) == cid
    handle, _ = await spawn(executor, rom)  # nor by spawning
    assert await handle.wait() == 0
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    cached = executor.cache_get(cid)
    assert cached is not None
    assert cached.data == rom.data
    assert executor.cache_get("0" * 64) is None
    with pytest.raises(RomError, match="content id"):
        executor.cache_get("../../etc/passwd")
    with pytest.raises(RomError, match="not a zip"):
        executor.cache_put(b"junk")


async def test_a_corrupt_cache_entry_is_dropped(executor: Executor, tmp_path: Path) -> None:
    rom = make_rom(tmp_path, "async def main(host, args):\n    pass\n")
    cid = executor.cache_put(rom.data)
    executor.cache_path(cid).write_bytes(rom.data + b"tampered")
    assert executor.cache_get(cid) is None
    assert not executor.cache_path(cid).exists()
    executor.cache_put(rom)
    executor.cache_path(cid).write_bytes(b"tampered")
    handle, _ = await spawn(executor, rom)  # spawning rewrites a damaged copy
    assert await handle.wait() == 0
    assert executor.cache_path(cid).read_bytes() == rom.data
