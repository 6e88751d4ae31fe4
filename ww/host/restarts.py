"""Restart policies: when to start a process again, how long to wait, and the records that
bring supervised processes back after the host itself restarts.

A record is one JSON file per supervised process under `DATA_DIR/restarts/`, written
atomically (temporary file, fsync, rename, fsync of the directory). It names the ROM by content
id; the host pins those ROMs in its cache (`RestartStore.cids`) so they are never evicted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ww.durable import fsync_dir, write_atomic

log = logging.getLogger("ww.host")

POLICIES = ("no", "on-failure", "always")
FIRST_DELAY = 0.1
MAX_DELAY = 10.0
RESET_AFTER = 30.0
"""A process that ran this long before it exited is restarted after FIRST_DELAY again."""

_ID = re.compile(r"[0-9a-f]{16}")
_CID = re.compile(r"[0-9a-f]{64}")


class RestartError(ValueError):
    """A bad restart option or record; the message is one line."""


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise RestartError(f"restart must be one of {', '.join(POLICIES)}, not {policy!r}")
    return str(policy)


def should_restart(policy: str, exit_code: int, stopped: bool) -> bool:
    """Whether a process that ended with `exit_code` is started again. `stopped`: it was
    killed on purpose (`kill()`, `ww kill`), which is never a failure."""
    if stopped or policy == "no":
        return False
    return policy == "always" or exit_code != 0


@dataclass(slots=True)
class Backoff:
    """Delays between restarts: FIRST_DELAY doubling up to MAX_DELAY, back to FIRST_DELAY
    after a run of RESET_AFTER seconds or more."""

    first: float = FIRST_DELAY
    cap: float = MAX_DELAY
    reset_after: float = RESET_AFTER
    _next: float = field(default=0.0, init=False)

    def delay(self, ran_for: float) -> float:
        """The wait before the next start, given how long the last run lasted."""
        if ran_for >= self.reset_after or self._next == 0.0:
            self._next = self.first
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay


@dataclass(frozen=True, slots=True)
class RestartRecord:
    """What it takes to start a supervised process again."""

    id: str
    cid: str
    args: tuple[str, ...]
    restart: str
    anchor: str | None = None
    volume: bool = False
    limits: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "cid": self.cid,
            "args": list(self.args),
            "restart": self.restart,
            "anchor": self.anchor,
            "volume": self.volume,
            "limits": dict(self.limits),
        }

    @classmethod
    def from_json(cls, id: str, data: object) -> RestartRecord:
        if not isinstance(data, dict) or data.get("format") != 1:
            raise RestartError("not a restart record of format 1")
        cid, args, anchor = data.get("cid"), data.get("args"), data.get("anchor")
        volume, limits = data.get("volume"), data.get("limits")
        if not isinstance(cid, str) or not _CID.fullmatch(cid):
            raise RestartError("its cid is not a ROM content id")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise RestartError("its args are not a list of strings")
        if anchor is not None and not isinstance(anchor, str):
            raise RestartError("its anchor is not a path")
        if not isinstance(volume, bool) or (volume and anchor is None):
            raise RestartError("its volume is not true or false, or has no anchor")
        if not isinstance(limits, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in limits.items()
        ):
            raise RestartError("its limits are not a map of numbers")
        policy = data.get("restart")
        if policy not in POLICIES[1:]:
            raise RestartError(f"its restart policy {policy!r} is not on-failure or always")
        return cls(id, cid, tuple(args), str(policy), anchor, volume, tuple(limits.items()))


class RestartStore:
    """The restart records in one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._cids: dict[str, str] = {}  # record id -> ROM content id (pinned)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(8)

    def load(self) -> list[RestartRecord]:
        """Every readable record; a damaged one is skipped with one log line (and kept)."""
        records = []
        for path in sorted(self.root.iterdir()):
            if path.name.endswith(".tmp"):  # a write cut short by a crash
                path.unlink(missing_ok=True)
                continue
            id = path.name.removesuffix(".json")
            if not path.name.endswith(".json") or not _ID.fullmatch(id):
                continue
            try:
                record = RestartRecord.from_json(id, json.loads(path.read_bytes()))
            except (OSError, ValueError) as e:
                log.warning("skipping restart record %s: %s", path, _line(e))
                continue
            self._cids[id] = record.cid
            records.append(record)
        return records

    def save(self, record: RestartRecord) -> None:
        """Write `record` durably (replacing one with its id)."""
        data = json.dumps(record.to_json(), sort_keys=True).encode()
        write_atomic(self.root / f"{record.id}.json", data)
        self._cids[record.id] = record.cid

    def remove(self, id: str) -> None:
        self._cids.pop(id, None)
        (self.root / f"{id}.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(self.root)

    def cids(self) -> set[str]:
        """Content ids of the ROMs that records name: the ROM cache keeps them."""
        return set(self._cids.values())


def _line(e: BaseException) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not JSON ({e.msg})"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).splitlines()[0] if str(e) else type(e).__name__
