"""`ww.dial`: reaching another host over a connection of one's own, with and without a key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ww.conftest import HostFactory, wait_for
from ww.auth import generate_cluster_key
from ww.dial import dial
from ww.rom import build_rom
from ww.rpc import CapabilityError, RemoteError

DIALER_ROM = """
import trio
from ww.dial import dial


async def main(host, args):
    peer, = args
    async with dial(host, peer) as far:
        root = await far.root()
        channel = await (await root.walk(f"/{peer}/inbox")).load()
        await channel.send(f"dialed from {await host.id()}")
"""


async def test_dial_opens_a_connection_of_its_own_to_the_far_host(
    host_factory: HostFactory,
) -> None:
    a, b = await host_factory.cluster(2)
    async with a.connect() as host_a, b.connect() as host_b:
        async with dial(host_a, b.peer) as far:
            assert await far.id() == b.peer
            # Straight to B's listening address, not through A.
            assert far.connection.stream.socket.getpeername()[:2] == b.addr  # type: ignore[attr-defined]
            # What is hung in B's tree through the dialed connection is what A's relay sees.
            channel = await far.channel(1)
            await (await (await far.root()).walk(f"/{b.peer}/dialed")).store(channel)
            relayed = await (await (await host_a.root()).walk(f"/{b.peer}/dialed")).load()
            await relayed.send("through A")
            assert await channel.recv() == "through A"
        # Anchors stored through it go with the connection (B learns of the close by itself).
        own_tree = await (await host_b.root()).walk(f"/{b.peer}")
        await wait_for(lambda: _is_empty(own_tree))


async def _is_empty(anchor: object) -> bool:
    return await anchor.ls() == []  # type: ignore[attr-defined]


async def test_dial_refuses_a_peer_not_in_the_view(host_factory: HostFactory) -> None:
    a = await host_factory.start()
    async with a.connect() as host_a:
        with pytest.raises(CapabilityError, match="not in the cluster view"):
            async with dial(host_a, "nosuchpeer"):
                pass


async def test_a_rom_dials_through_a_keyed_cluster_with_credentials_that_name_no_host(
    host_factory: HostFactory, tmp_path: Path
) -> None:
    key = tmp_path / "cluster.key"
    generate_cluster_key(key)
    a, b = await host_factory.cluster(2, key=key)
    src = tmp_path / "dialer"
    src.mkdir()
    (src / "rom.toml").write_text(
        'name = "dialer"\nversion = "1"\nentry = "dialer:main"\npermissions = ["net.connect"]\n'
    )
    (src / "dialer.py").write_text(DIALER_ROM)
    async with a.connect() as host_a, b.connect() as host_b:
        inbox = await host_b.channel(1)
        await (await (await host_b.root()).walk(f"/{b.peer}/inbox")).store(inbox)
        process = await host_a.spawn(build_rom(src), [b.peer])
        assert await inbox.recv() == f"dialed from {a.peer}"
        assert await process.wait() == 0, await host_a.logs((await process.info())["pid"])

        # The credentials a host hands out let their holder dial, not pose as a host.
        async with dial(host_a, b.peer) as far:
            hello = {"peer": a.peer, "ns": None, "record": None}
            with pytest.raises(RemoteError, match="certificate says guest "):
                await far.peer_link(hello, inbox)
