"""run_host in this process: start, report, refuse bad configuration, stop on cancellation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from tests.ww.conftest import connect
from ww.host import HostConfig, HostError, HostInfo, run_host


def config(tmp_path: Path, **changes) -> HostConfig:
    base = {"listen": ("127.0.0.1", 0), "data_dir": tmp_path / "host"}
    return HostConfig(**{**base, **changes})


async def test_starts_on_a_free_port_logs_one_line_and_stops_on_cancel(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ww.host")
    async with trio.open_nursery() as nursery:
        info: HostInfo = await nursery.start(run_host, config(tmp_path))
        assert info.addr[0] == "127.0.0.1" and info.addr[1] > 0
        async with connect(info.addr) as host:
            assert await host.id() == info.peer_id
        nursery.cancel_scope.cancel()
    assert f"host {info.peer_id} listening on {info.address}" in caplog.messages
    with pytest.raises(OSError):  # the port is closed again
        await trio.open_tcp_stream(*info.addr)


async def test_the_peer_id_survives_a_restart_with_the_same_data_dir(tmp_path):
    ids = []
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_host, config(tmp_path))
            ids.append(info.peer_id)
            nursery.cancel_scope.cancel()
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"listen": ("0.0.0.0", 0)}, "refusing to listen on 0.0.0.0:0 without a cluster key"),
        ({"heartbeat_interval": 5.0, "ttl": 2.0}, "shorter than the TTL"),
    ],
)
async def test_a_configuration_that_cannot_work_is_one_line(tmp_path, changes, complaint):
    with pytest.raises(HostError, match=complaint) as info:
        await run_host(config(tmp_path, **changes))
    assert "\n" not in str(info.value)


async def test_a_busy_port_is_one_line(tmp_path):
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(HostError, match=f"cannot listen on 127.0.0.1:{port}"):
            await run_host(config(tmp_path, listen=("127.0.0.1", port)))
