"""Bad input and authentication at the host's front door, with real host processes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio

from tests.ww.conftest import HostFactory, HostProcess, connect, view_of, wait_for
from ww.rpc import Capability, ConnectionLost, RemoteError


async def _closed_by_host(stream: trio.SocketStream) -> bool:
    """Read until the host closes the connection (True) or 5 seconds pass (False)."""
    with trio.move_on_after(5):
        while await stream.receive_some(4096):
            pass
        return True
    return False


GARBAGE = [
    struct.pack(">I", 0xFFFFFFF0) + b"x" * 64,  # announces a frame far over the limit
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # a frame that is not msgpack
    struct.pack(">I", 2) + b"\x93\x01",  # msgpack, but not a message
]


async def test_a_malformed_frame_closes_that_connection_and_the_host_stays_up(
    host_factory: HostFactory,
):
    host = await host_factory.start()
    async with host.connect() as bystander:
        for garbage in GARBAGE:
            stream = await trio.open_tcp_stream(*host.addr)
            await stream.send_all(garbage)
            assert await _closed_by_host(stream), garbage
            await stream.aclose()
            assert await bystander.id() == host.peer  # an open connection is unaffected
    async with host.connect() as fresh:
        assert await fresh.id() == host.peer
    reasons = [line for line in host.lines if "protocol error" in line]
    assert len(reasons) == len(GARBAGE), host.output()


def _key(tmp_path: Path, name: str) -> Path:
    from ww.auth import generate_cluster_key

    path = tmp_path / name
    generate_cluster_key(path)
    return path


async def _refused(host: HostProcess) -> bool:
    return any("refused connection" in line for line in host.lines)


async def test_hosts_with_the_cluster_key_link_and_a_peer_without_it_is_refused(
    host_factory: HostFactory, tmp_path: Path
):
    from ww.auth import AuthError

    key, other_key = _key(tmp_path, "cluster.key"), _key(tmp_path, "other.key")
    a, b = await host_factory.cluster(2, key=key)  # mutual TLS between hosts and clients

    intruder = await host_factory.start(peers=[a], key=other_key, name="intruder")
    await wait_for(lambda: _refused(a), timeout=10)
    assert await view_of(a) == {a.peer, b.peer}
    assert await view_of(intruder) == {intruder.peer}

    with pytest.raises(AuthError):  # a client with another key: refused during TLS
        async with connect(a.addr, key=other_key):
            pass
    with pytest.raises((ConnectionLost, trio.BrokenResourceError)):  # no key, no TLS at all
        async with connect(a.addr, key=None) as plain:
            await plain.id()
    async with a.connect() as ok:  # the host is still up for those who have the key
        assert await ok.id() == a.peer
        # a client with the key cannot pose as a host: its certificate names another peer
        with pytest.raises(RemoteError, match="certificate says"):
            await ok.peer_link({"peer": b.peer, "ns": "ww"}, Capability())
        assert await view_of(a) == {a.peer, b.peer}
