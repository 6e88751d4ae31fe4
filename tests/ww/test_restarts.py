"""The restart policy, the backoff and the restart records, without processes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ww.host.restarts import (
    Backoff,
    RestartError,
    RestartRecord,
    RestartStore,
    check_policy,
    should_restart,
)
from ww.host.volumes import VolumeError, Volumes
from ww.rom.guest import _parse, home, volume

CID = "a" * 64


@pytest.mark.parametrize(
    ("policy", "code", "stopped", "expected"),
    [
        ("no", 1, False, False),
        ("on-failure", 0, False, False),
        ("on-failure", 1, False, True),
        ("on-failure", -9, False, True),
        ("on-failure", -15, True, False),
        ("always", 0, False, True),
        ("always", 0, True, False),
    ],
)
def test_should_restart(policy: str, code: int, stopped: bool, expected: bool) -> None:
    assert should_restart(policy, code, stopped) is expected


def test_check_policy_names_the_choices() -> None:
    assert check_policy("always") == "always"
    with pytest.raises(RestartError, match="one of no, on-failure, always, not 'sometimes'"):
        check_policy("sometimes")


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run() -> None:
    backoff = Backoff()
    delays = [backoff.delay(0.5) for _ in range(9)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert backoff.delay(30.0) == 0.1
    assert backoff.delay(1.0) == 0.2


def test_records_round_trip_and_pin_their_roms(tmp_path: Path) -> None:
    store = RestartStore(tmp_path / "restarts")
    record = RestartRecord(
        store.new_id(), CID, ("a", "b"), "on-failure", "/p/raft/v1", True, (("memory", 1e9),)
    )
    store.save(record)
    assert store.cids() == {CID}
    again = RestartStore(tmp_path / "restarts")
    assert again.load() == [record] and again.cids() == {CID}
    again.remove(record.id)
    assert again.cids() == set() and RestartStore(tmp_path / "restarts").load() == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a restart record of format 1"),
        (json.dumps({"format": 1, "cid": "x"}).encode(), "cid is not a ROM content id"),
        (
            json.dumps(
                {"format": 1, "cid": CID, "args": [], "anchor": None, "volume": True, "limits": {}}
            ).encode(),
            "has no anchor",
        ),
        (
            json.dumps(
                {
                    "format": 1,
                    "cid": CID,
                    "args": [],
                    "anchor": None,
                    "volume": False,
                    "limits": {},
                    "restart": "no",
                }
            ).encode(),
            "not on-failure or always",
        ),
    ],
)
def test_a_damaged_record_is_skipped_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    store = RestartStore(tmp_path)
    (tmp_path / "0123456789abcdef.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, "ww.host"):
        assert store.load() == []
    (message,) = [r.getMessage() for r in caplog.records]
    assert reason in message and "\n" not in message


def test_volumes_map_anchor_paths_to_flat_names(tmp_path: Path) -> None:
    volumes = Volumes(tmp_path / "volumes", "peer")
    assert volumes.create(("raft", "v1")).path == tmp_path / "volumes" / "raft+v1"
    assert volumes.create(("raft",)).path == tmp_path / "volumes" / "raft"
    assert [(v.local, size) for v, size in volumes.list()] == [(("raft",), 0), (("raft", "v1"), 0)]
    assert volumes.parse("/peer/raft/v1") == ("raft", "v1")
    for bad, match in [
        ("/other/x", "not on this host"),
        ("peer/x", "not an absolute anchor path"),
        ("/peer/a+b", "characters other than"),
        ("/peer/../x", "only plain names"),
    ]:
        with pytest.raises(ValueError, match=match):
            volumes.parse(bad)
    with pytest.raises(VolumeError, match="too long for a volume"):
        volumes.get(tuple(["x" * 100] * 3))
    with pytest.raises(VolumeError, match="no volume for /peer/nope"):
        volumes.remove(("nope",))


def test_the_guest_takes_its_volume_and_home_from_its_command_line() -> None:
    invocation = _parse(["--fd", "3", "--volume", "/d/v", "--home", "/p/x", "r.rom", "--", "a"])
    assert (invocation.volume, invocation.home, invocation.args) == (Path("/d/v"), "/p/x", ["a"])
    assert volume() is None and home() is None  # not a spawned ROM
