"""The `ww` command against real hosts: start and stop, ls, pub, ps, logs, kill, cluster keys."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tests.ww.conftest import HostFactory
from tests.ww.test_hello import ENV, Lines, ww, ww_sub

READY_ROM = """\
import trio

async def main(host, args):
    me = await host.id()
    print("working on", me, flush=True)
    root = await host.root()
    ready = await (await root.walk(f"/{me}/test/ready")).load()
    await ready.send(b"ready")
    await trio.sleep_forever()
"""


async def test_start_logs_its_peer_id_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "ww", "start", "--listen", "127.0.0.1:0"]
    proc = await trio.lowlevel.open_process(
        [*argv, "--data-dir", str(tmp_path / "h")], stderr=subprocess.PIPE, env=ENV
    )
    assert proc.stderr is not None
    err = Lines(proc.stderr)
    with trio.fail_after(20):
        match = await err.until(re.compile(r"host (\S+) listening on 127\.0\.0\.1:(\d+)"))
        peer, port = match.group(1), int(match.group(2))
        assert (await ww("ls", "--dial", f"127.0.0.1:{port}")).stdout.decode() == f"/{peer}\n"
        proc.send_signal(signal.SIGTERM)
        await err.drain()
        assert await proc.wait() == 0
    assert any(f"host {peer} stopping" in line for line in err.seen), err.seen
    assert not any("Traceback" in line for line in err.seen), err.seen


async def test_start_refuses_a_public_address_without_a_key(tmp_path: Path) -> None:
    result = await ww("start", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "h"))
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [
        "ww start: error: refusing to listen on 0.0.0.0:0 without a cluster key; pass --key"
        " FILE (make one with `ww keygen`) or listen on 127.0.0.1"
    ]


async def test_ls_lists_hosts_then_anchors_under_a_path(host_factory: HostFactory) -> None:
    a, b = await host_factory.cluster(2)
    listed = (await ww("ls", "--dial", a.address)).stdout.decode().split()
    assert listed == sorted([f"/{a.peer}", f"/{b.peer}"])

    async with a.connect() as host:
        root = await host.root()
        for name in ("x", "y"):
            await (await root.walk(f"/{b.peer}/demo/{name}")).store(name.encode())
        under = await ww("ls", "--dial", a.address, f"/{b.peer}/demo")
        assert under.stdout.decode().split() == [f"/{b.peer}/demo/x", f"/{b.peer}/demo/y"]
    # What a connection stored goes away when it closes.
    async with b.connect() as host:
        demo = await (await host.root()).walk(f"/{b.peer}")
        with trio.fail_after(10):
            while "demo" in {n.strip("/") for n in await demo.ls()}:
                await trio.sleep(0.05)


async def test_pub_sends_its_argument_or_each_line_of_stdin(host_factory: HostFactory) -> None:
    a = await host_factory.start()
    async with ww_sub(a, "news") as messages:
        assert (await ww("pub", "--dial", a.address, "news", "first")).returncode == 0
        piped = await trio.run_process(
            [sys.executable, "-m", "ww", "pub", "--dial", a.address, "news"],
            stdin=b"second\nthird\n",
            capture_stderr=True,
            env=ENV,
        )
        assert piped.returncode == 0, piped.stderr
        with trio.fail_after(10):
            assert [await messages.next() for _ in range(3)] == ["first", "second", "third"]


async def test_ps_logs_and_kill_a_process(host_factory: HostFactory, tmp_path: Path) -> None:
    from ww.rom import build_rom

    src = tmp_path / "ready"
    src.mkdir()
    (src / "rom.toml").write_text(
        'name = "ready"\nversion = "1"\nentry = "ready:main"\nrequires = ["trio"]\n'
    )
    (src / "ready.py").write_text(READY_ROM)
    a = await host_factory.start()
    async with a.connect() as host:
        channel = await host.channel()
        await (await (await host.root()).walk(f"/{a.peer}/test/ready")).store(channel)
        process = await host.spawn(build_rom(src), [])
        with trio.fail_after(20):
            assert await channel.recv() == b"ready"
        pid = (await process.info())["pid"]

        ps = (await ww("ps", "--dial", a.address)).stdout.decode()
        assert re.search(rf"^{pid}\s+ready\s+running\s+-\s+no\s+0$", ps, re.M), ps
        logs = await ww("logs", "--dial", a.address, str(pid))
        assert logs.stdout.decode() == f"working on {a.peer}\n"

        killed = await ww("kill", "--dial", a.address, str(pid))
        assert killed.returncode == 0, killed.stderr
        with trio.fail_after(10):
            assert await process.wait() != 0
        ps = (await ww("ps", "--dial", a.address)).stdout.decode()
        assert not re.search(rf"^{pid}\s+ready\s+running", ps, re.M), ps

    missing = await ww("kill", "--dial", a.address, "999999")
    assert missing.returncode == 1
    assert missing.stderr.decode().strip().splitlines() == [
        "ww kill: error: no process 999999 on this host; `ww ps` lists them"
    ]


async def test_a_host_with_a_key_answers_only_clients_with_that_key(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    from ww.auth import generate_cluster_key

    key, other = tmp_path / "cluster.key", tmp_path / "other.key"
    for path in (key, other):
        generate_cluster_key(path)
    a = await host_factory.start(key=key)

    ok = await ww("ls", "--dial", a.address, "--key", str(key))
    assert ok.stdout.decode() == f"/{a.peer}\n", ok.stderr

    wrong = await ww("ls", "--dial", a.address, "--key", str(other))
    assert wrong.returncode == 1
    [line] = wrong.stderr.decode().strip().splitlines()
    assert line.startswith(f"ww ls: error: host {a.address} refused the connection")

    keyless = await ww("ls", "--dial", a.address)
    assert keyless.returncode == 1
    assert keyless.stderr.decode().strip().splitlines() == [
        f"ww ls: error: the host at {a.address} closed the connection; "
        "if it was started with --key, pass the same --key FILE"
    ]


async def test_sub_stops_cleanly_on_ctrl_c(host_factory: HostFactory) -> None:
    a = await host_factory.start()
    argv = [sys.executable, "-m", "ww", "sub", "--dial", a.address, "t"]
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=ENV)
    assert proc.stderr is not None
    err = Lines(proc.stderr)
    with trio.fail_after(20):
        await err.until(re.compile("subscribed to t"))
        proc.send_signal(signal.SIGINT)
        await err.drain()
        assert await proc.wait() == 0
    assert not any("Traceback" in line for line in err.seen), err.seen


async def test_sub_says_in_one_line_when_its_host_goes_away(host_factory: HostFactory) -> None:
    a = await host_factory.start()
    argv = [sys.executable, "-m", "ww", "sub", "--dial", a.address, "t"]
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=ENV)
    assert proc.stderr is not None
    err = Lines(proc.stderr)
    with trio.fail_after(20):
        await err.until(re.compile("subscribed to t"))
        a.kill()
        await err.drain()
        assert await proc.wait() == 1
    assert err.seen[-1] == f"ww sub: error: lost the connection to the host at {a.address}"
