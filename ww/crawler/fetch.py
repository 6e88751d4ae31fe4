"""Fetch one URL: redirects followed by hand, the body read up to a limit, one deadline.

Each redirect hop is canonicalized and put to `check_hop` (scope and robots) before it is
requested, and recorded; a hop back to a URL already seen is a loop. The body is read as a
stream and cut at `max_bytes`. `timeout` bounds the whole fetch, all hops and the body
included, so a server that trickles bytes is cut off too.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx2
import trio

from .robots import MAX_ROBOTS_BYTES, RobotsPolicy, robots_url
from .urls import canonicalize

__all__ = ["REDIRECT_STATUSES", "FetchResult", "fetch", "fetch_robots", "new_client"]

log = logging.getLogger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def new_client(*, max_connections: int = 100, trust_env: bool = True) -> httpx2.AsyncClient:
    """A client for `fetch`: redirects left to `fetch`; keep-alive connections up to
    `max_connections`. `trust_env` reads proxies and CA settings from the environment, as
    httpx does."""
    return httpx2.AsyncClient(
        follow_redirects=False,
        limits=httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        trust_env=trust_env,
    )


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The outcome of one fetch.

    `url` is what was asked for, `final_url` the last URL requested. `status` is the last
    response's status (None when none came). `redirects` lists every redirect response as
    {"url", "status"} in order. `error` is one line saying what went wrong, `error_kind` its
    kind: "connect", "timeout", "network" (the connection broke or the server broke HTTP),
    "too-many-redirects", "redirect-loop", "redirect-blocked" (`check_hop` refused a hop),
    "bad-redirect" (a Location that is not an http(s) URL), "bad-url" or "protocol" (a body
    that cannot be decoded). `size` and `sha256` describe `body` (after content decoding, at
    most max_bytes of it; `truncated` when there was more; no sha256 for a redirect that was
    not followed)."""

    url: str
    final_url: str
    status: int | None
    error: str | None = None
    error_kind: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    retry_after: str | None = None
    x_robots_tag: str | None = None
    body: bytes = field(default=b"", repr=False)
    size: int = 0
    sha256: str | None = None
    truncated: bool = False
    redirects: tuple[dict[str, Any], ...] = ()
    elapsed_ms: int = 0

    @property
    def ok(self) -> bool:
        """A response came and nothing went wrong (the status may still be 404 or 500)."""
        return self.error is None and self.status is not None


async def fetch(
    client: httpx2.AsyncClient,
    url: str,
    *,
    user_agent: str,
    max_bytes: int = 10_000_000,
    timeout: float = 30.0,
    max_redirects: int = 10,
    check_hop: Callable[[str], str | None] | None = None,
) -> FetchResult:
    """GET `url` (canonical) with `client`, which must not follow redirects itself.

    `check_hop(url)` is asked about every redirect target and returns a reason not to follow
    it, or None. Never raises for what a server or the network does: it is all in the result.
    """
    start = trio.current_time()
    state = _State(url)
    with trio.move_on_after(timeout) as scope:
        await _run(client, state, user_agent, max_bytes, max_redirects, check_hop, timeout)
    if scope.cancelled_caught:
        state.fail("timeout", f"timeout: no complete response within {timeout:g} s")
    return state.result(int((trio.current_time() - start) * 1000))


@dataclass(slots=True)
class _State:
    url: str
    current: str = ""
    status: int | None = None
    error: str | None = None
    error_kind: str | None = None
    headers: httpx2.Headers | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    truncated: bool = False
    redirects: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.current = self.url

    def fail(self, kind: str, message: str) -> None:
        self.error_kind, self.error = kind, message

    def result(self, elapsed_ms: int) -> FetchResult:
        body = b"".join(self.chunks)
        h = self.headers
        got_body = self.status is not None and self.status not in REDIRECT_STATUSES
        return FetchResult(
            url=self.url,
            final_url=self.current,
            status=self.status,
            error=self.error,
            error_kind=self.error_kind,
            headers=tuple(h.multi_items()) if h is not None else (),
            content_type=h.get("content-type") if h is not None else None,
            retry_after=h.get("retry-after") if h is not None else None,
            x_robots_tag=h.get("x-robots-tag") if h is not None else None,
            body=body,
            size=len(body),
            sha256=hashlib.sha256(body).hexdigest() if got_body else None,
            truncated=self.truncated,
            redirects=tuple(self.redirects),
            elapsed_ms=elapsed_ms,
        )


async def _run(
    client: httpx2.AsyncClient,
    state: _State,
    user_agent: str,
    max_bytes: int,
    max_redirects: int,
    check_hop: Callable[[str], str | None] | None,
    timeout: float,
) -> None:
    seen = {state.url}
    headers = {"user-agent": user_agent, "accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    while True:
        try:
            async with client.stream(
                "GET",
                state.current,
                headers=headers,
                timeout=_timeouts(timeout),
                follow_redirects=False,
            ) as response:
                state.status, state.headers = response.status_code, response.headers
                location = response.headers.get("location")
                if response.status_code in REDIRECT_STATUSES and location:
                    pass  # the body of a redirect is not read
                else:
                    async for chunk in response.aiter_bytes():
                        if state.size + len(chunk) > max_bytes:
                            room = max_bytes - state.size
                            state.chunks.append(chunk[:room])
                            state.size += room
                            state.truncated = True
                            break
                        state.chunks.append(chunk)
                        state.size += len(chunk)
                    return
        except httpx2.TimeoutException as exc:
            return state.fail("timeout", f"timeout: {_describe(exc)}")
        except httpx2.ConnectError as exc:
            return state.fail("connect", f"connect error: {_describe(exc)}")
        except (httpx2.LocalProtocolError, httpx2.DecodingError) as exc:
            return state.fail("protocol", f"protocol error: {_describe(exc)}")
        except (httpx2.UnsupportedProtocol, httpx2.InvalidURL) as exc:
            return state.fail("bad-url", f"bad URL: {_describe(exc)}")
        except httpx2.HTTPError as exc:  # TransportError and any other the client raises
            return state.fail("network", f"network error: {_describe(exc)}")
        state.redirects.append({"url": state.current, "status": state.status})
        try:
            target = canonicalize(urljoin(state.current, location))
        except ValueError as exc:
            return state.fail("bad-redirect", f"redirect to a bad URL: {exc}")
        if target in seen:
            return state.fail("redirect-loop", f"redirect loop: {target} again")
        if len(state.redirects) > max_redirects:
            return state.fail("too-many-redirects", f"more than {max_redirects} redirects")
        reason = check_hop(target) if check_hop is not None else None
        if reason is not None:
            return state.fail("redirect-blocked", f"redirect to {target} not followed: {reason}")
        seen.add(target)
        state.current = target


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


@functools.lru_cache(maxsize=16)
def _timeouts(seconds: float) -> httpx2.Timeout:
    """httpx2's timeouts of `seconds` each, made once: given a plain number on each request,
    httpx2 checks it against a runtime Protocol (about 5 µs); a Timeout it only copies."""
    return httpx2.Timeout(seconds)


async def fetch_robots(
    client: httpx2.AsyncClient,
    url: str,
    *,
    user_agent: str,
    timeout: float = 30.0,
    retry_delay: float = 60.0,
) -> RobotsPolicy:
    """The robots.txt policy for the host of `url`: fetched once, following up to 5 redirects
    anywhere (as RFC 9309 allows), read up to MAX_ROBOTS_BYTES. Failing to get a response makes
    an "unavailable" policy (the host waits `retry_delay` seconds); so does a timeout."""
    result = await fetch(
        client,
        robots_url(url),
        user_agent=user_agent,
        max_bytes=MAX_ROBOTS_BYTES,
        timeout=timeout,
        max_redirects=5,
    )
    status = result.status
    if result.error_kind in ("connect", "timeout", "network", "protocol", "bad-url"):
        status = None
    if status is not None and result.truncated:
        log.info(
            "robots.txt at %s is larger than %d bytes; the rest is not read", url, MAX_ROBOTS_BYTES
        )
    return RobotsPolicy.from_response(status, result.body, retry_delay=retry_delay)
