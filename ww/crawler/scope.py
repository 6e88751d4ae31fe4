"""Which URLs a crawl may visit.

`same-domain` compares registrable domains without the public suffix list, by a rule that is
right for most names and says so: the last two labels (`www.example.com` → `example.com`), or
the last three when the name ends in a two-letter country code under a short second-level label
such as `co`, `com`, `ac`, `gov` (`news.bbc.co.uk` → `bbc.co.uk`). It is wrong for suffixes like
`github.io` or `blogspot.com` (all their sites count as one domain). An IP address is its own
domain.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from .urls import canonicalize, host_key

__all__ = ["Scope", "ScopeMode", "registrable_domain"]

ScopeMode = Literal["same-host", "same-domain", "any"]
_MODES = ("same-host", "same-domain", "any")
_SECOND_LEVEL = frozenset(
    {"co", "com", "ac", "gov", "edu", "org", "net", "ne", "or", "go", "gob", "mil", "nic", "ltd"}
)


def registrable_domain(host: str) -> str:
    """The registrable domain of a host name, by the rule in this module's docstring."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        pass
    labels = host.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


@dataclass(frozen=True, slots=True)
class Scope:
    """The crawl's bounds: hosts (by `mode`, relative to the seeds), `allow`/`deny` regular
    expressions searched in the canonical URL (any allow must match when there are some; no deny
    may match) and the number of link hops from a seed (`max_depth`, None for no limit)."""

    mode: ScopeMode = "same-host"
    seeds: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_depth: int | None = None
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _domains: frozenset[str] = field(init=False, repr=False, compare=False)
    _allow: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _deny: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"unknown scope {self.mode!r}: use one of {', '.join(_MODES)}")
        if self.max_depth is not None and self.max_depth < 0:
            raise ValueError(f"max_depth must be 0 or more, not {self.max_depth}")
        seeds = tuple(canonicalize(s) for s in self.seeds)
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "deny", tuple(self.deny))
        object.__setattr__(self, "_hosts", frozenset(host_key(s) for s in seeds))
        domains = frozenset(registrable_domain(urlsplit(s).hostname or "") for s in seeds)
        object.__setattr__(self, "_domains", domains)
        object.__setattr__(self, "_allow", _compile(self.allow, "allow"))
        object.__setattr__(self, "_deny", _compile(self.deny, "deny"))

    def allows(self, url: str, depth: int = 0) -> bool:
        """True when the canonical `url`, found `depth` link hops from a seed, is in scope."""
        return self.reason(url, depth) is None

    def reason(self, url: str, depth: int = 0, host: str | None = None) -> str | None:
        """Why `url` at `depth` is out of scope, or None when it is in scope (`host`: the
        URL's `host_key`, when the caller has it already)."""
        if self.max_depth is not None and depth > self.max_depth:
            return f"deeper than --max-depth {self.max_depth}"
        if not url[:8].lower().startswith(("http://", "https://")):
            return "not an http(s) URL"
        if self.mode == "same-host" and (host or host_key(url)) not in self._hosts:
            return "on another host than the seeds"
        if (
            self.mode == "same-domain"
            and registrable_domain(urlsplit(url).hostname or "") not in self._domains
        ):
            return "on another domain than the seeds"
        if self._allow and not any(p.search(url) for p in self._allow):
            return "matches no --allow pattern"
        for p in self._deny:
            if p.search(url):
                return f"matches --deny {p.pattern!r}"
        return None

    def with_seeds(self, seeds: Iterable[str]) -> Scope:
        """The same scope around more seeds."""
        return Scope(self.mode, (*self.seeds, *seeds), self.allow, self.deny, self.max_depth)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for msgpack or JSON); `Scope.from_dict` reverses it."""
        return {
            "mode": self.mode,
            "seeds": list(self.seeds),
            "allow": list(self.allow),
            "deny": list(self.deny),
            "max_depth": self.max_depth,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scope:
        return cls(
            mode=data["mode"],
            seeds=tuple(data["seeds"]),
            allow=tuple(data.get("allow", ())),
            deny=tuple(data.get("deny", ())),
            max_depth=data.get("max_depth"),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (Scope.from_dict, (self.to_dict(),))


def _compile(patterns: tuple[str, ...], what: str) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"bad --{what} pattern {p!r}: {exc}") from None
    return tuple(compiled)
