"""Canonical URLs, the queue's partition key, and trap guards.

The canonical form is the crawl's identity for a page: two URLs that canonicalize alike are
fetched once. It is w3lib's canonical form (fragment dropped, query arguments sorted,
percent-escaping normalised, IDNA host, lower-case scheme and host, dot segments resolved)
with the scheme's default port dropped as well.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urljoin, urlsplit, urlunsplit

from w3lib.url import canonicalize_url

__all__ = ["TrapLimits", "canonicalize", "host_key", "is_trap", "link_resolver"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
_UNRESERVED = r"[A-Za-z0-9._~-]"
# Scheme, host name and port of a URL that writes them plainly: lower-case scheme and host
# (ASCII, no trailing dot), no userinfo, a port without leading zeros (its range and the
# scheme's default are checked by the code that matches it).
_PLAIN_ORIGIN = r"(https?)://([a-z0-9_-]+(?:\.[a-z0-9_-]+)*)(?::([1-9][0-9]{0,4}))?"
# A URL that is canonical already, but for a fragment or an empty path: a plain origin, a path of
# characters w3lib leaves alone (no percent escapes, no ";" parameters), a query of
# key=value pairs of unreserved characters. Dot segments, the default port and the order of
# the query's pairs are checked in `_canonical_as_is`. (w3lib keeps "//" in a path.)
_AS_IS = re.compile(
    _PLAIN_ORIGIN + r"(/[A-Za-z0-9!$&'()*+,.:=@_~/-]*)?"
    rf"(?:\?({_UNRESERVED}+={_UNRESERVED}*(?:&{_UNRESERVED}+={_UNRESERVED}*)*))?"
    r"(?:#.*)?"
)

# A link that `urljoin` would only append to its page's directory (or, with a leading "/", to
# its origin): path segments without ":" (a scheme), ";" (parameters), escapes or empty
# segments, then an optional query and fragment. Dot segments are checked in `link_resolver`.
_SEGMENT = r"[A-Za-z0-9!$&'()*+,.=@_~-]+"
_PLAIN_REF = re.compile(
    rf"(/?){_SEGMENT}(?:/{_SEGMENT})*/?(?:\?[A-Za-z0-9._~=&-]+)?(?:#[A-Za-z0-9._~-]+)?"
)
_DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:[/?#]|$)")


def canonicalize(url: str) -> str:
    """The canonical form of an http(s) URL; ValueError for anything else or a malformed URL."""
    return _canonicalize(url.strip())


@lru_cache(maxsize=32_768)
def _canonicalize(url: str) -> str:
    # Memoized: pages of a site link to the same URLs over and over (navigation, footers).
    # Most links are canonical already: those skip w3lib, the largest part of parsing links.
    as_is = _canonical_as_is(url)
    return as_is if as_is is not None else _canonicalize_w3lib(url)


def _canonical_as_is(url: str) -> str | None:
    """The canonical form of a URL that has it already (its fragment dropped, an empty path
    made "/"), or None when the URL needs `_canonicalize_w3lib`."""
    m = _AS_IS.fullmatch(url)
    if m is None:
        return None
    scheme, host, port, path, query = m.groups()
    if port is not None and (int(port) > 65_535 or int(port) == _DEFAULT_PORTS[scheme]):
        return None
    if path is None:
        path = "/"
    elif "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        return None
    if query is None:
        query = ""
    else:
        if "&" in query:
            pairs = [tuple(pair.split("=", 1)) for pair in query.split("&")]
            if pairs != sorted(pairs):
                return None
        query = "?" + query
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}{query}"


def _canonicalize_w3lib(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError on a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"malformed URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {url!r}")
    try:
        canon = urlsplit(canonicalize_url(url, keep_fragments=False))
    except ValueError as exc:
        raise ValueError(f"malformed URL {url!r}: {exc}") from None
    host = (canon.hostname or "").rstrip(".")
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if not _HOST.fullmatch(host):
        raise ValueError(f"malformed URL {url!r}: bad host name")
    netloc = host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{host}:{port}"
    if canon.username is not None:
        userinfo = canon.username + (f":{canon.password}" if canon.password is not None else "")
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((scheme, netloc, canon.path or "/", canon.query, ""))


def link_resolver(base: str) -> Callable[[str], str]:
    """A function from a link's reference (stripped) on a page at `base` to its canonical URL:
    `canonicalize(urljoin(base, ref))`, ValueError alike. For a canonical `base`, plain
    relative references are joined by appending them, without `urljoin` (and, without a
    query, without canonicalizing the result, which is canonical already)."""
    if _canonical_as_is(base) != base or "//" in base[base.index("//") + 2 :]:
        return lambda ref: canonicalize(urljoin(base, ref))
    directory = base[: base.rindex("/") + 1]
    origin = base[: base.index("/", base.index("//") + 2)]

    def resolve(ref: str) -> str:
        if _PLAIN_REF.fullmatch(ref) is not None and _DOT_SEGMENT.search(ref) is None:
            url = (origin if ref[0] == "/" else directory) + ref
            if "?" in ref:
                return _canonicalize(url)  # the query's pairs may need sorting
            return url.partition("#")[0]  # plain segments after a canonical path: canonical
        if ref.startswith(("http://", "https://")) and _canonical_as_is(ref) is not None:
            return _canonicalize(ref)
        return canonicalize(urljoin(base, ref))

    return resolve


_PLAIN_NETLOC = re.compile(_PLAIN_ORIGIN + r"(?=[/?#]|$)")


def host_key(url: str) -> str:
    """host[:port] of a URL (the port only when it is not the scheme's default): the key the
    queue partitions work by, so politeness holds per host."""
    m = _PLAIN_NETLOC.match(url)
    if m is not None:  # most URLs, canonical ones among them: no urlsplit
        scheme, host, port = m.groups()
        if port is None:
            return host
        if int(port) <= 65_535:
            return host if int(port) == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return _host_key_split(url)


def _host_key_split(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        return host
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class TrapLimits:
    """Guards against URL spaces without end (calendars, session ids, relative-link loops)."""

    max_url_length: int = 2048
    max_repeated_segments: int = 3  # how often one path segment may occur in a path
    max_query_params: int = 20


def is_trap(url: str, limits: TrapLimits = TrapLimits()) -> str | None:
    """Why `url` looks like a crawler trap, or None when it does not."""
    if len(url) > limits.max_url_length:
        return f"URL longer than {limits.max_url_length} characters"
    path, query = _path_and_query(url)
    segments = [segment for segment in path.split("/") if segment]
    if len(segments) > limits.max_repeated_segments and len(set(segments)) < len(segments):
        counts: dict[str, int] = {}
        for segment in segments:
            counts[segment] = counts.get(segment, 0) + 1
        for segment, n in counts.items():
            if n > limits.max_repeated_segments:
                return (
                    f"path segment {segment!r} repeated {n} times "
                    f"(more than {limits.max_repeated_segments})"
                )
    if query.count("&") >= limits.max_query_params:  # else there are too few to count
        n_params = len([p for p in query.split("&") if p])
        if n_params > limits.max_query_params:
            return f"{n_params} query parameters (more than {limits.max_query_params})"
    return None


def _path_and_query(url: str) -> tuple[str, str]:
    """`urlsplit(url)`'s path and query; without urlsplit when the URL writes its origin
    plainly and has no tab or line break (which urlsplit would remove)."""
    m = _PLAIN_NETLOC.match(url)
    if m is None or "\t" in url or "\n" in url or "\r" in url:
        parts = urlsplit(url)
        return parts.path, parts.query
    path, _, query = url[m.end() :].partition("#")[0].partition("?")
    return path, query
