"""Load against real hosts: idle sockets, slow and half-sent frames, anchor quotas, and the
clients' own bounds (--timeout, signals)."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from tests.ww.conftest import HostFactory, HostProcess, view_of, wait_for
from ww.auth import generate_cluster_key
from ww.host.caps import MAX_HELD_BYTES
from ww.rpc import RemoteError


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def ls_time(h: HostProcess) -> float:
    """Seconds a client takes to connect to `h` and list its hosts, as `ww ls` does (without
    starting a Python)."""
    start = time.monotonic()
    async with h.connect() as host:
        assert [e["peer"] for e in await (await host.view()).hosts()] == [h.peer]
    return time.monotonic() - start


def open_from(source: str, addr: tuple[str, int]) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        s.connect(addr)
    return s


@pytest.mark.parametrize("keyed", [False, True])
async def test_thousands_of_idle_sockets_are_capped_without_a_flood_of_logs(
    host_factory: HostFactory, tmp_path: Path, keyed: bool
) -> None:
    key = None
    if keyed:
        key = tmp_path / "cluster.key"
        generate_cluster_key(key)
    h = await host_factory.start(key=key, args=["--max-connections", "600"])
    before = rss(h.process.pid)
    sockets: list[socket.socket] = []
    try:
        # From five addresses, so the per-address cap (256) and the total cap both bite.
        for n in range(2000):
            sockets.append(open_from(f"127.0.0.{2 + n % 5}", h.addr))
        await trio.sleep(0)
        for _ in range(5):  # a client from 127.0.0.1 is answered within a second throughout
            assert await ls_time(h) < 1.0
        assert h.alive
        grown = rss(h.process.pid) - before
        assert grown < 64 << 20, grown
    finally:
        for s in sockets:
            s.close()
    text = h.output()
    assert "Traceback" not in text
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    assert any("closing the oldest idle" in line for line in warnings)
    assert len(warnings) <= 10  # at most one a second


async def silent_peer_is_closed(addr: tuple[str, int], first: bytes, within: float) -> None:
    """Connect, send `first` and then nothing: the host must close within `within` seconds."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        if first:
            await stream.send_all(first)
        with trio.fail_after(within):
            while await stream.receive_some(4096):
                pass


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_silent_or_trickling_connection_is_closed_after_the_handshake_timeout(
    host_factory: HostFactory, tmp_path: Path, keyed: bool
) -> None:
    key = None
    if keyed:
        key = tmp_path / "cluster.key"
        generate_cluster_key(key)
    h = await host_factory.start(key=key, args=["--handshake-timeout", "1"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_peer_is_closed, h.addr, b"", 3.0)
        # half a frame header, then nothing: a slowloris
        nursery.start_soon(silent_peer_is_closed, h.addr, b"\x00\x00", 3.0)
        nursery.start_soon(silent_peer_is_closed, h.addr, struct.pack(">I", 1000) + b"x", 3.0)
    async with h.connect() as host:  # a client that talks is served as before
        assert await host.id() == h.peer


async def test_half_sent_large_frames_are_bounded_by_the_receive_budget(
    host_factory: HostFactory,
) -> None:
    h = await host_factory.start(args=["--receive-budget", "32M"])
    before = rss(h.process.pid)
    chunk = b"x" * (1 << 20)
    streams = []
    closed = 0
    for _ in range(24):  # each announces 16 MiB and sends 4 MiB of it
        stream = await trio.open_tcp_stream(*h.addr)
        streams.append(stream)
        try:
            await stream.send_all(struct.pack(">I", 16 << 20))
            for _ in range(4):
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            closed += 1
    try:
        assert await ls_time(h) < 1.0
        grown = rss(h.process.pid) - before
        assert grown < 80 << 20, grown  # the budget (32 MiB) and slack, not 24 x 4 MiB
        for stream in streams:  # those over the budget were closed by the host
            with trio.move_on_after(2):
                with pytest.raises(trio.BrokenResourceError):
                    while True:
                        await stream.send_all(chunk)
                closed += 1
        assert closed >= 24 - 32 // 4
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
    assert "over the budget" in h.output()


async def test_one_holder_cannot_fill_the_anchor_tree(host_factory: HostFactory) -> None:
    h = await host_factory.start()
    async with h.connect() as host:
        root = await host.root()
        value = b"v" * (1 << 20)
        for n in range(MAX_HELD_BYTES >> 20):
            await (await root.walk(f"/{h.peer}/a{n}")).store(value)
        with pytest.raises(RemoteError, match="quota"):
            await (await root.walk(f"/{h.peer}/over")).store(value)
        await (await root.walk(f"/{h.peer}/a0")).store(b"smaller")  # replacing is fine
    async with h.connect() as host:  # another holder has its own quota
        await (await (await host.root()).walk(f"/{h.peer}/b")).store(value)


# -- clients ---------------------------------------------------------------------------------


def ww(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ww", *args], capture_output=True, text=True, timeout=timeout
    )


async def test_timeout_covers_the_whole_call_against_a_silent_socket() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts (in the kernel) and never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        result = await trio.to_thread.run_sync(
            lambda: ww("ls", "--dial", address, "--timeout", "2")
        )
        took = time.monotonic() - start
    assert result.returncode == 1
    assert took < 4.0, took
    (line,) = result.stderr.strip().splitlines()
    assert "did not answer within 2s" in line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_ww_run_stops_a_cpu_bound_rom_on_a_signal(tmp_path: Path, signum: int) -> None:
    src = tmp_path / "spin"
    src.mkdir()
    (src / "rom.toml").write_text('name = "spin"\nversion = "1"\nentry = "spin:main"\n')
    body = """
    import sys

    async def main(host, args):
        print("spinning", flush=True)
        while True:
            pass
    """
    (src / "spin.py").write_text(textwrap.dedent(body))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ww", "run", "--no-dial", str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(20):
            assert b"spinning" in await process.stdout.receive_some(100)
        process.send_signal(signum)
        with trio.fail_after(5):
            assert await process.wait() == 130
    finally:
        process.kill()


async def test_a_cleanly_stopped_host_leaves_every_view_at_once(host_factory: HostFactory) -> None:
    a, b = await host_factory.cluster(2, ttl=30.0, heartbeat=0.2)
    b.terminate()
    with trio.fail_after(3):  # far less than the TTL
        await wait_for(lambda: _without(a, b.peer))
    await b.process.wait()


async def _without(h: HostProcess, peer: str) -> bool:
    return peer not in await view_of(h)


async def test_small_client_errors_say_so_and_exit_non_zero(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    h = await host_factory.start()
    key = tmp_path / "cluster.key"
    generate_cluster_key(key)
    result = await trio.to_thread.run_sync(lambda: ww("ls", "--dial", h.address, "--key", str(key)))
    assert result.returncode == 1 and "drop --key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = await trio.to_thread.run_sync(lambda: ww("ls", "--dial", h.address, f"/{h.peer}/nope"))
    assert result.returncode == 1 and f"nothing at /{h.peer}/nope" in result.stderr

    src = tmp_path / "quick"
    src.mkdir()
    (src / "rom.toml").write_text('name = "q"\nversion = "1"\nentry = "q:main"\n')
    (src / "q.py").write_text("async def main(host, args):\n    pass\n")
    async with h.connect() as host:
        from ww.rom import build_rom

        process = await host.spawn(build_rom(src))
        assert await process.wait() == 0
        pid = (await process.info())["pid"]
    result = await trio.to_thread.run_sync(lambda: ww("kill", "--dial", h.address, str(pid)))
    assert result.returncode == 1 and "already exited" in result.stderr

    result = await trio.to_thread.run_sync(lambda: ww("kill", "--dial", h.address, "not-a-pid"))
    assert result.returncode == 2


async def test_a_host_that_cannot_start_leaves_no_data_dir(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data = tmp_path / "fresh"
        result = await trio.to_thread.run_sync(
            lambda: ww("start", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data))
        )
    assert result.returncode == 1 and "cannot listen" in result.stderr
    assert not data.exists()


async def test_a_host_without_the_key_says_why_it_cannot_join(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    key = tmp_path / "cluster.key"
    generate_cluster_key(key)
    a = await host_factory.start(key=key)
    b = await host_factory.start(peers=[a])
    await wait_for(lambda: "start this host with --key FILE" in b.output())


async def test_an_idle_client_holding_nothing_is_closed_but_a_subscriber_is_not(
    host_factory: HostFactory,
) -> None:
    from ww.rpc import ConnectionLost

    h = await host_factory.start(args=["--idle-timeout", "1"])
    async with h.connect() as idle, h.connect() as subscriber:
        topic = await (await subscriber.pubsub()).join("t")
        async with topic.stream("subscribe") as messages:
            await topic.name()  # the subscription is in place
            assert await idle.id() == h.peer
            with trio.fail_after(5):
                await idle.connection.closed.wait()
            with pytest.raises(ConnectionLost):
                await idle.id()
            await topic.publish(b"still here")
            with trio.fail_after(5):
                assert await messages.__anext__() == b"still here"
