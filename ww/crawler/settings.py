"""The settings of one crawl: what the `ww-crawl` flags say, as plain data.

A crawl's settings are written once into the queue (record 0 of `crawl.config`) and handed to
every worker, so `to_dict`/`from_dict` round-trip through msgpack and JSON. `--resume` reads
them back and may change only the fields in `RESUMABLE` (how it crawls, not what).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .robots import DEFAULT_USER_AGENT

__all__ = [
    "DEFAULT_USER_AGENT",
    "RESUMABLE",
    "CrawlSettings",
    "SettingsError",
    "claim_interval",
]

SCOPES = ("same-host", "same-domain", "any")

# What a resumed crawl may change; everything else (seeds, scope, limits) stays as stored.
RESUMABLE = frozenset(
    {"per_host_concurrency", "delay", "timeout", "retries", "user_agent", "max_pages", "handler"}
)


def claim_interval(delay: float) -> float:
    """The queue's least time between two claims of one host for a delay between requests.

    The queue spaces claims; a request starts a little after its claim (the claim's commit and
    answer take milliseconds, more on a loaded machine), so a margin keeps the requests
    themselves at least `delay` apart: a quarter of the delay, at most 0.1 s."""
    return delay + min(0.1, delay / 4) if delay > 0 else 0.0


class SettingsError(ValueError):
    """Settings that cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class CrawlSettings:
    seeds: tuple[str, ...] = ()
    scope: str = "same-host"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_depth: int | None = None
    max_pages: int | None = None
    ignore_robots: bool = False
    user_agent: str = DEFAULT_USER_AGENT
    per_host_concurrency: int = 2
    delay: float = 0.0
    retries: int = 3
    max_bytes: int = 10 * 1024 * 1024
    timeout: float = 30.0
    max_text: int = 10_000
    max_url_length: int = 2048
    max_repeated_segments: int = 3
    max_query_params: int = 20
    handler: bool = False  # a handler ROM is given to the workers beside the settings
    warc: bool = False  # results carry their raw responses for the WARC file
    batch: int = 32  # URLs claimed at once by a worker
    concurrency: int = 32  # fetches in flight per worker
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise SettingsError(f"unknown scope {self.scope!r}: use one of {', '.join(SCOPES)}")
        for name in ("per_host_concurrency", "batch", "concurrency", "max_bytes", "max_url_length"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.replace('_', '-')} must be at least 1")
        for name in ("delay", "retries", "max_text", "max_repeated_segments", "max_query_params"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name.replace('_', '-')} must not be negative")
        if not self.timeout > 0:
            raise SettingsError("timeout must be a positive number of seconds")
        if self.max_depth is not None and self.max_depth < 0:
            raise SettingsError("max-depth must not be negative")
        if self.max_pages is not None and self.max_pages < 1:
            raise SettingsError("max-pages must be at least 1")

    @property
    def lease(self) -> float:
        """How long a claimed batch is ours: every fetch of it is bounded by the timeout."""
        return self.timeout * 2 + 5.0

    @property
    def max_attempts(self) -> int:
        """Claims of one URL before the queue gives up on it (a worker that died holding it
        counts too); the worker's own retries stop at `retries`."""
        return self.retries + 4

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("seeds", "allow", "deny"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CrawlSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown crawl settings {', '.join(unknown)}")
        values = dict(data)
        for name in ("seeds", "allow", "deny"):
            if name in values:
                values[name] = tuple(values[name])
        try:
            return cls(**values)
        except TypeError as exc:
            raise SettingsError(f"bad crawl settings: {exc}") from None

    def resumed(self, changes: Mapping[str, Any]) -> CrawlSettings:
        """These stored settings with the changes a resume may make (others are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if k in RESUMABLE})

    def encode(self) -> str:
        """One command-line argument: base64 of msgpack (the worker ROM's --settings)."""
        return base64.b64encode(msgpack.packb(self.to_dict())).decode()

    @classmethod
    def decode(cls, text: str) -> CrawlSettings:
        try:
            data = msgpack.unpackb(base64.b64decode(text, validate=True))
        except Exception as exc:
            raise SettingsError(f"cannot decode crawl settings: {exc}") from None
        if not isinstance(data, dict):
            raise SettingsError("cannot decode crawl settings: not a map")
        return cls.from_dict(data)
