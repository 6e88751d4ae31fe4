"""robots.txt decisions, from the response to one fetch of /robots.txt (with protego).

What the response means, as Google documents it for its own crawler:
2xx → its rules; 4xx and redirects not followed → everything allowed; 429, 5xx or no response
at all → the host is not crawled for now: every check says `Wait(retry_delay)` and the caller
fetches robots.txt again after that. The policy is plain data (status, body, when) so one fetch
serves every worker, passed on as a record through the queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgpack
from protego import Protego

__all__ = [
    "DEFAULT_USER_AGENT",
    "MAX_ROBOTS_BYTES",
    "Allow",
    "Disallow",
    "RobotsDecision",
    "RobotsPolicy",
    "Wait",
    "host_delay",
    "robots_url",
]

DEFAULT_USER_AGENT = "ww-crawl/0.1 (a distributed web crawler; Python)"
MAX_ROBOTS_BYTES = 512 * 1024  # Google reads the first 500 KiB; more is not rules but a mistake


@dataclass(frozen=True, slots=True)
class Allow:
    pass


@dataclass(frozen=True, slots=True)
class Disallow:
    pass


@dataclass(frozen=True, slots=True)
class Wait:
    """robots.txt could not be read: try the host again after `delay` seconds."""

    delay: float


RobotsDecision = Allow | Disallow | Wait


def robots_url(url: str) -> str:
    """The robots.txt URL that governs `url`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/robots.txt", "", ""))


@dataclass(frozen=True, slots=True)
class RobotsPolicy:
    """The robots.txt of one host. `status` is the HTTP status of its fetch (after redirects),
    None when there was no response (connect error, timeout)."""

    status: int | None
    body: str = ""
    retry_delay: float = 60.0
    _rules: Protego | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = Protego.parse(self.body) if self.kind == "rules" else None
        object.__setattr__(self, "_rules", rules)

    @classmethod
    def from_response(
        cls, status: int | None, body: bytes = b"", *, retry_delay: float = 60.0
    ) -> RobotsPolicy:
        """A policy from a fetch of robots.txt; the body is read as UTF-8 (as RFC 9309 says),
        up to MAX_ROBOTS_BYTES."""
        text = body[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace") if status else ""
        if status is None or not 200 <= status < 300:
            text = ""
        return cls(status, text, retry_delay)

    @property
    def kind(self) -> str:
        """ "rules", "allow-all" or "unavailable"."""
        s = self.status
        if s is None or s == 429 or s >= 500:
            return "unavailable"
        if 200 <= s < 300:
            return "rules"
        return "allow-all"

    def check(self, url: str, user_agent: str = DEFAULT_USER_AGENT) -> RobotsDecision:
        """May `user_agent` fetch `url`: Allow(), Disallow() or Wait(delay)."""
        if self._rules is None:
            return Wait(self.retry_delay) if self.kind == "unavailable" else Allow()
        return Allow() if self._rules.can_fetch(url, user_agent) else Disallow()

    def allowed(self, url: str, user_agent: str = DEFAULT_USER_AGENT) -> bool:
        """True only when `check` says Allow (an unavailable robots.txt allows nothing yet)."""
        return isinstance(self.check(url, user_agent), Allow)

    def crawl_delay(self, user_agent: str = DEFAULT_USER_AGENT) -> float | None:
        """Seconds between requests asked for by Crawl-delay (or Request-rate), if any."""
        if self._rules is None:
            return None
        delay = self._rules.crawl_delay(user_agent)
        rate = self._rules.request_rate(user_agent)
        if rate is not None and rate.requests > 0:
            per_request = rate.seconds / rate.requests
            delay = per_request if delay is None else max(delay, per_request)
        return None if delay is None else float(delay)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "body": self.body, "retry_delay": self.retry_delay}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RobotsPolicy:
        return cls(data["status"], data.get("body", ""), float(data.get("retry_delay", 60.0)))

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_dict())  # type: ignore[no-any-return]

    @classmethod
    def from_bytes(cls, data: bytes) -> RobotsPolicy:
        """The policy `to_bytes` wrote; ValueError when `data` is not one."""
        try:
            d = msgpack.unpackb(data)
            return cls.from_dict(d)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"not a robots policy record: {exc}") from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (RobotsPolicy.from_dict, (self.to_dict(),))


def host_delay(
    policy: RobotsPolicy | None,
    user_agent: str = DEFAULT_USER_AGENT,
    *,
    minimum: float = 0.0,
    maximum: float = 60.0,
) -> float:
    """Seconds between two requests to a host: `minimum` (--delay), raised by the host's
    Crawl-delay up to `maximum` (a Crawl-delay of hours would stall the host's pages for
    good; `maximum` is never below `minimum`)."""
    asked = policy.crawl_delay(user_agent) if policy is not None else None
    if asked is None:
        return minimum
    return max(minimum, min(asked, max(maximum, minimum)))
