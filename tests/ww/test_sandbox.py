"""Escape attempts, run as ROMs on real hosts: each must fail or be stopped by the kernel, the
host must keep serving, and the same ROM with a permission granted must do what it allows."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.ww.conftest import HostFactory, HostProcess, wait_for
from ww.auth import IDENTITY_FILE, generate_cluster_key
from ww.rom import build_rom
from ww.rom.sandbox import UID_BASE, landlock_abi
from ww.rpc import RemoteError

pytestmark = pytest.mark.skipif(landlock_abi() < 6, reason="needs Landlock ABI 6 or later")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own needs a root host")

# Tries each thing in its JSON argument and prints what happened to each, as errno names.
HOSTILE = """
import ctypes, errno, json, os, signal, socket
from ww.rom.guest import volume

def attempt(out, name, action):
    try:
        action()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))

def ptrace_attach(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")

def bind():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))

async def main(host, args):
    spec = json.loads(args[0])
    out = {"uid": os.getuid()}
    for name, path in spec["read"].items():
        attempt(out, "read " + name, lambda p=path: open(p, "rb").close())
    for name, path in spec["write"].items():
        attempt(out, "write " + name, lambda p=path: open(p, "wb").close())
    if volume() is not None:
        attempt(out, "write volume", lambda: (volume() / "mine").write_text("x"))
    attempt(out, "write tmp", lambda: open(os.environ["TMPDIR"] + "/x", "w").close())
    port = spec["port"]
    attempt(out, "connect", lambda: socket.create_connection(("127.0.0.1", port), 5).close())
    attempt(out, "bind", bind)
    attempt(out, "udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
    attempt(out, "unix", lambda: socket.socket(socket.AF_UNIX).close())
    attempt(out, "signal host", lambda: os.kill(spec["host_pid"], signal.SIGTERM))
    attempt(out, "ptrace host", lambda: ptrace_attach(spec["host_pid"]))
    print("RESULT " + json.dumps(out), flush=True)
"""


def rom(
    tmp_path: Path, body: str, *, name: str = "t", permissions: list[str] | None = None
) -> bytes:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    toml = f'name = "{name}"\nversion = "1"\nentry = "t:main"\n'
    toml += f"permissions = {json.dumps(permissions or [])}\n"
    (src / "rom.toml").write_text(toml)
    (src / "t.py").write_text(textwrap.dedent(body))
    return build_rom(src)


async def result_of(host: Any, process: Any) -> dict[str, Any]:
    code = await process.wait()
    logs = (await process.logs()).decode()
    lines = [line for line in logs.splitlines() if line.startswith("RESULT ")]
    assert code == 0 and lines, logs
    found: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return found


async def hostile_run(
    tmp_path: Path, h: HostProcess, permissions: list[str], listener: socket.socket
) -> dict[str, Any]:
    """Run the hostile ROM at /<peer>/mine with a volume, after another ROM has left a file in
    its own volume and a log behind."""
    secret = (
        "async def main(host, args):\n    (volume() / 'secret').write_text('s')\n    print('x')\n"
    )
    other = rom(
        tmp_path, "from ww.rom.guest import volume\n" + secret, name="o", permissions=["volume"]
    )
    data = h.data_dir
    async with h.connect() as host:
        root = await host.root()
        first = await (await root.walk(f"/{h.peer}/other")).spawn(other, [], volume=True)
        assert await first.wait() == 0
        (log,) = (data / "logs").glob("*-o.log")
        spec = {
            "read": {
                "identity": str(data / IDENTITY_FILE),
                "cluster key": str(h.key),
                "other volume": str(data / "volumes" / "other" / "secret"),
                "log": str(log),
                "rom cache": str(next((data / "roms").iterdir())),
                "host environ": f"/proc/{h.process.pid}/environ",
                "home": "/root/.bashrc" if os.geteuid() == 0 else str(Path.home()),
            },
            "write": {
                "data dir": str(data / "planted"),
                "other volume": str(data / "volumes" / "other" / "planted"),
                "/tmp": "/tmp/planted-by-a-rom",
            },
            "port": listener.getsockname()[1],
            "host_pid": h.process.pid,
        }
        body = HOSTILE
        mine = await (await root.walk(f"/{h.peer}/mine")).spawn(
            rom(tmp_path, body, name="hostile", permissions=permissions),
            [json.dumps(spec)],
            volume=True,
        )
        found = await result_of(host, mine)
        assert await host.id() == h.peer  # the host serves on
    return found


@pytest.fixture
def listener() -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


async def test_a_rom_reaches_no_file_socket_or_process_it_was_not_given(
    host_factory: HostFactory, tmp_path: Path, listener: socket.socket
) -> None:
    key = tmp_path / "cluster.key"
    generate_cluster_key(key)
    h = await host_factory.start(key=key)
    found = await hostile_run(tmp_path, h, ["volume"], listener)
    for name in ("identity", "cluster key", "other volume", "log", "rom cache", "home"):
        assert found["read " + name] == "EACCES", name
    assert found["read host environ"] in ("EACCES", "EPERM")
    for name in ("data dir", "other volume", "/tmp"):
        assert found["write " + name] == "EACCES", name
    assert not Path("/tmp/planted-by-a-rom").exists()
    assert found["write volume"] == "ok" and found["write tmp"] == "ok"
    assert found["connect"] == "EACCES"  # no net.connect
    assert found["bind"] == "EACCES"
    assert found["udp"] == "EACCES" and found["unix"] == "EACCES"
    # A root host runs each ROM in a PID namespace of its own, where the host has no pid.
    assert found["signal host"] == ("ESRCH" if os.geteuid() == 0 else "EPERM")
    assert found["ptrace host"] == "EPERM"
    assert h.alive


async def test_net_connect_lets_a_rom_connect_but_never_bind(
    host_factory: HostFactory, tmp_path: Path, listener: socket.socket
) -> None:
    key = tmp_path / "cluster.key"
    generate_cluster_key(key)
    h = await host_factory.start(key=key)
    found = await hostile_run(tmp_path, h, ["net.connect", "volume"], listener)
    assert found["connect"] == "ok"
    assert found["udp"] == "ok"  # name resolution
    assert found["bind"] == "EACCES"
    assert found["unix"] == "EACCES"
    assert found["read identity"] == "EACCES" and found["read cluster key"] == "EACCES"


@as_root
async def test_a_rom_of_a_root_host_runs_as_a_uid_of_its_own_that_owns_its_volume(
    host_factory: HostFactory, tmp_path: Path, listener: socket.socket
) -> None:
    h = await host_factory.start()
    body = """
    import os
    from ww.rom.guest import volume

    async def main(host, args):
        (volume() / "f").write_text("x")
        caps = open("/proc/self/status").read().split("CapEff:")[1].split()[0]
        print("RESULT", {"uid": os.getuid(), "groups": os.getgroups(), "caps": caps})
    """
    async with h.connect() as host:
        anchor = await (await host.root()).walk(f"/{h.peer}/v")
        process = await anchor.spawn(rom(tmp_path, body, permissions=["volume"]), [], volume=True)
        pid = (await process.info())["pid"]
        assert await process.wait() == 0
        text = (await process.logs()).decode()
    assert f"'uid': {UID_BASE + pid}" in text
    assert "'groups': []" in text
    assert "'caps': '0000000000000000'" in text or "'caps': '0000000000000004'" in text
    volume = h.data_dir / "volumes" / "v"
    assert volume.stat().st_uid == UID_BASE + pid
    assert (volume / "f").stat().st_uid == UID_BASE + pid


async def test_a_sandboxed_rom_starts_threads_and_reads_its_own_proc_entry(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    # trio runs name resolution and to_thread in threads; a process that unshared its PID
    # namespace could not start any, so the ROM must run below it.
    h = await host_factory.start()
    body = """
    import os
    import trio

    async def main(host, args):
        answer = await trio.to_thread.run_sync(lambda: 6 * 7)
        status = open("/proc/self/status").read()
        print("RESULT", answer, "Threads:" in status, os.getpid())
    """
    async with h.connect() as host:
        process = await host.spawn(rom(tmp_path, body), [])
        assert await process.wait() == 0
        text = (await process.logs()).decode()
    line = next(line for line in text.splitlines() if line.startswith("RESULT"))
    answer, read_status, pid_inside = line.split()[1:]
    assert (answer, read_status) == ("42", "True")
    if os.geteuid() == 0:  # a root host's ROM runs below the init of its PID namespace
        assert pid_inside == "2"


async def test_a_host_with_its_data_dir_in_a_source_checkout_spawns_confined_roms(
    host_factory: HostFactory,
) -> None:
    # `ww-crawl` run in a checkout puts its hosts' data under it, beside the ww package: ROMs
    # must still start (they import ww from there) and read nothing else of the checkout.
    import ww

    checkout = Path(ww.__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix=".sandbox-test-", dir=checkout) as data:
        h = await host_factory.start(data_dir=Path(data) / "h0")
        body = f"""
        def main_sync():
            try:
                open({str(checkout / "pyproject.toml")!r}).read()
                return "read"
            except PermissionError:
                return "EACCES"

        async def main(host, args):
            print("RESULT", main_sync())
        """
        async with h.connect() as host:
            process = await host.spawn(rom(Path(data), body), [])
            assert await process.wait() == 0
            assert "RESULT EACCES" in (await process.logs()).decode()
        h.terminate()
        await h.process.wait()


async def test_a_permission_the_host_does_not_grant_is_refused_in_one_line(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start(args=["--allow", "volume"])
    async with h.connect() as host:
        with pytest.raises(RemoteError) as info:
            await host.spawn(
                rom(tmp_path, "async def main(h, a): pass\n", permissions=["net.connect"])
            )
    message = info.value.message
    assert "asks for permission 'net.connect'" in message and "--allow" in message
    assert "\n" not in message


async def test_a_volume_spawn_of_a_rom_that_does_not_ask_for_it_is_refused(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        anchor = await (await host.root()).walk(f"/{h.peer}/v")
        with pytest.raises(RemoteError, match="does not ask for the volume permission"):
            await anchor.spawn(rom(tmp_path, "async def main(h, a): pass\n"), [], volume=True)


# -- limits ----------------------------------------------------------------------------------

SPIN = "async def main(host, args):\n    while True:\n        pass\n"


async def test_the_hosts_cpu_limit_stops_a_spinning_rom(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start(args=["--limit-cpu", "1"])
    async with h.connect() as host:
        process = await host.spawn(rom(tmp_path, SPIN))
        with trio.fail_after(15):
            assert await process.wait() == -signal.SIGXCPU
        assert await host.id() == h.peer


async def test_the_hosts_memory_limit_stops_a_memory_hog_and_caps_what_a_spawn_asks(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start(args=["--limit-memory", "256M"])
    hog = "async def main(host, args):\n    blocks = [bytearray(64 << 20) for _ in range(64)]\n"
    async with h.connect() as host:
        process = await host.spawn(rom(tmp_path, hog))
        assert await process.wait() == 1
        assert b"MemoryError" in await process.logs()
        with pytest.raises(RemoteError, match=r"over this host's maximum.*--limit-memory"):
            await host.spawn(rom(tmp_path, SPIN, name="s"), [], {"memory": 1 << 30})


FORK_BOMB = """
import os, time

async def main(host, args):
    n = 0
    try:
        while True:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
    except OSError as e:
        print("FORKS", n, e.errno, flush=True)
    time.sleep(60)
"""


def processes_of(uid: int) -> list[int]:
    """The pids of processes (not threads) running as `uid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@as_root
async def test_a_fork_bomb_is_capped_and_dies_with_its_rom(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        process = await host.spawn(rom(tmp_path, FORK_BOMB), [], {"procs": 16})
        pid = (await process.info())["pid"]
        report = re.compile(rb"FORKS (\d+) (\d+)\n")  # the whole line, however it is written
        await wait_for(lambda: report.search(h_logs(h, pid)) is not None)
        found = report.search(h_logs(h, pid))
        assert found is not None
        forks, err = int(found[1]), int(found[2])
        assert forks < 16 and err == 11  # EAGAIN
        assert 0 < len(processes_of(UID_BASE + pid)) <= 16
        await process.kill()
        assert await process.wait() == -signal.SIGTERM
        # The kernel kills the rest as the namespace's init dies with the ROM.
        await wait_for(lambda: processes_of(UID_BASE + pid) == [], timeout=5)
        assert await host.id() == h.peer


def h_logs(h: HostProcess, pid: int) -> bytes:
    logs = list((h.data_dir / "logs").glob(f"*-{pid}-*.log"))
    return logs[0].read_bytes() if logs else b""


ESCAPER = """
import subprocess, time

async def main(host, args):
    # A grandchild in a session of its own, and a spinning one: neither must outlive us.
    subprocess.Popen(["sleep", "600"], start_new_session=True)
    subprocess.Popen(["python3", "-c", "while True: pass"], start_new_session=True)
    print("STARTED", flush=True)
    time.sleep(600)
"""


@as_root
async def test_no_descendant_of_a_rom_outlives_a_kill_9_of_its_host(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        process = await host.spawn(rom(tmp_path, ESCAPER))
        pid = (await process.info())["pid"]
    await wait_for(lambda: b"STARTED" in h_logs(h, pid))
    await wait_for(lambda: len(processes_of(UID_BASE + pid)) >= 4)  # rom, init, 2 children
    h.kill()
    await h.process.wait()
    await wait_for(lambda: processes_of(UID_BASE + pid) == [], timeout=5)


async def test_a_spawn_asking_for_wall_time_is_stopped_after_it(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    sleeper = "import trio\n\nasync def main(host, args):\n    await trio.sleep_forever()\n"
    async with h.connect() as host:
        process = await host.spawn(rom(tmp_path, sleeper), [], {"wall_seconds": 0.5})
        with trio.fail_after(10):
            assert await process.wait() == -signal.SIGTERM


READER = """
async def main(host, args):
    try:
        open("/etc/hostname", "rb").close()
        print("RESULT read")
    except OSError as e:
        print("RESULT", e.strerror)
"""


@pytest.mark.parametrize("unsafe", [False, True])
async def test_only_an_unsafe_host_lets_a_rom_read_outside_its_sandbox(
    host_factory: HostFactory, tmp_path: Path, unsafe: bool
) -> None:
    h = await host_factory.start(args=["--unsafe-no-sandbox"] if unsafe else [])
    assert ("--unsafe-no-sandbox" in h.output()) == unsafe
    async with h.connect() as host:
        process = await host.spawn(rom(tmp_path, READER))
        assert await process.wait() == 0
        logs = await process.logs()
    assert (b"RESULT read" in logs) == unsafe


async def test_ww_run_says_what_a_rom_asks_for_before_running_it(tmp_path: Path) -> None:
    src = tmp_path / "asking"
    src.mkdir()
    (src / "rom.toml").write_text(
        'name = "asking"\nversion = "1"\nentry = "t:main"\n'
        'permissions = ["volume", "net.connect"]\n'
    )
    (src / "t.py").write_text("async def main(host, args):\n    print('ran')\n")
    result = await trio.run_process(
        [sys.executable, "-m", "ww", "run", "--no-dial", str(src)],
        capture_stdout=True,
        capture_stderr=True,
    )
    assert result.stderr.decode().splitlines() == [
        "ww run: ROM 'asking' asks for permissions: net.connect, volume"
    ]
    assert result.stdout == b"ran\n"
