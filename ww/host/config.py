"""Host configuration and the address helpers the host and its tests share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ww.auth import is_loopback
from ww.rom.executor import DEFAULT_LIMITS, KEEP_LOGS, LOG_LIMIT, MIN_LOG_LIMIT, ROM_CACHE_LIMIT
from ww.rom.permissions import PERMISSIONS
from ww.rom.sandbox import ChildLimits

Address = tuple[str, int]


class HostError(Exception):
    """A host cannot start as configured; the message is one line saying what to change."""


@dataclass(frozen=True, slots=True)
class HostConfig:
    """How to run a host. `listen` port 0 picks a free port.

    The executor's disk limits: `log_limit` bytes of output kept per process, the logs of
    `keep_logs` exited processes kept, `rom_cache_limit` bytes of cached ROMs.

    ROMs: `allow` the permissions this host grants (ww.rom.permissions), `limits` the
    default and the most of each spawn's limits, `sandbox` False runs them unconfined.

    Connections: at most `max_connections` (and `max_connections_per_address` from one
    address); one that has sent no complete frame within `handshake_timeout` seconds of
    its start (the TLS handshake included), or none for `idle_timeout` seconds while it
    holds nothing, is closed; frames partly received on all of them hold at most
    `receive_budget` bytes."""

    listen: Address = ("127.0.0.1", 2020)
    data_dir: Path = Path("ww-host")
    peers: list[Address] = field(default_factory=list)
    ns: str = "ww"
    meta: dict[str, str] = field(default_factory=dict)
    cluster_key_path: Path | None = None
    heartbeat_interval: float = 1.0
    ttl: float = 5.0
    log_limit: int = LOG_LIMIT
    keep_logs: int = KEEP_LOGS
    rom_cache_limit: int = ROM_CACHE_LIMIT
    allow: frozenset[str] = frozenset(PERMISSIONS)
    limits: ChildLimits = DEFAULT_LIMITS
    sandbox: bool = True
    max_connections: int = 1024
    max_connections_per_address: int = 256
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    receive_budget: int = 256 * 1024 * 1024

    def check(self) -> None:
        """Raise HostError when the configuration cannot work."""
        if not 0 < self.heartbeat_interval < self.ttl:
            raise HostError(
                f"heartbeat interval {self.heartbeat_interval}s must be positive and shorter"
                f" than the TTL {self.ttl}s"
            )
        if self.log_limit < MIN_LOG_LIMIT:
            raise HostError(
                f"a log limit of {self.log_limit} bytes is too small;"
                f" pass --log-limit of at least {MIN_LOG_LIMIT // 1024}K"
            )
        if self.keep_logs < 0:
            raise HostError(f"cannot keep {self.keep_logs} logs; pass --keep-logs 0 or more")
        if self.rom_cache_limit < 0:
            raise HostError(
                f"a ROM cache limit of {self.rom_cache_limit} bytes is negative;"
                " pass --rom-cache-limit 0 or more"
            )
        if self.cluster_key_path is None and not is_loopback(self.listen[0]):
            raise HostError(
                f"refusing to listen on {format_address(self.listen)} without a cluster key;"
                " pass --key FILE (make one with `ww keygen`) or listen on 127.0.0.1"
            )


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What a started host reports: its peer id and the address it listens on."""

    peer_id: str
    addr: Address

    @property
    def address(self) -> str:
        return format_address(self.addr)


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> Address:
    """`HOST:PORT` or `[IPv6]:PORT` as a pair; ValueError with one line otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:2020")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
