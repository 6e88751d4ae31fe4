"""Canonical URLs, host keys and trap guards, without sockets."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ww.crawler.urls import (
    TrapLimits,
    _canonical_as_is,
    _canonicalize_w3lib,
    _host_key_split,
    _path_and_query,
    canonicalize,
    host_key,
    is_trap,
    link_resolver,
)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("http://example.com/a#frag", "http://example.com/a"),
        ("http://example.com/?b=2&a=1", "http://example.com/?a=1&b=2"),
        ("http://example.com:80/", "http://example.com/"),
        ("https://example.com:443/x", "https://example.com/x"),
        ("HTTP://Example.COM/Path", "http://example.com/Path"),
        ("http://example.com/%7efoo", "http://example.com/~foo"),
        ("http://example.com/a%2fb", "http://example.com/a%2Fb"),
        ("http://example.com/ä", "http://example.com/%C3%A4"),
        ("http://bücher.de/", "http://xn--bcher-kva.de/"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com/a/../b/./c", "http://example.com/b/c"),
        ("http://example.com./", "http://example.com/"),
        ("  http://example.com/  ", "http://example.com/"),
    ],
)
def test_equivalent_urls_canonicalize_alike(a: str, b: str) -> None:
    assert canonicalize(a) == canonicalize(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("http://example.com/a", "http://example.com/A"),
        ("http://example.com/", "https://example.com/"),
        ("http://example.com:8080/", "http://example.com/"),
        ("http://example.com/?a=1", "http://example.com/?a=2"),
    ],
)
def test_different_urls_stay_different(a: str, b: str) -> None:
    assert canonicalize(a) != canonicalize(b)


def test_canonical_form_keeps_a_non_default_port_and_drops_the_default() -> None:
    assert canonicalize("http://127.0.0.2:8080/x?b&a=1") == "http://127.0.0.2:8080/x?a=1&b="
    assert canonicalize("https://[::1]:443/") == "https://[::1]/"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", r"not an http\(s\) URL"),
        ("mailto:a@example.com", r"not an http\(s\) URL"),
        ("http:///path", "has no host"),
        ("http://example.com:99999/", "malformed URL"),
        ("http://[::1/", "malformed URL"),
        ("http://exa mple.com/", "bad host name"),
    ],
)
def test_bad_urls_are_refused_with_a_reason_naming_them(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        canonicalize(url)
    assert repr(url) in str(info.value)


def test_host_key_is_host_and_port_without_the_default_port() -> None:
    assert host_key("http://Example.com/a") == "example.com"
    assert host_key("http://example.com:80/a") == "example.com"
    assert host_key("https://example.com:8443/") == "example.com:8443"
    assert host_key("http://127.0.0.2:5000/") == "127.0.0.2:5000"
    assert host_key("http://[::1]:5000/") == "[::1]:5000"


_segment = st.text(alphabet="abcXYZ019-._~%/?&=#ä ", max_size=12)


@given(
    scheme=st.sampled_from(["http", "HTTP", "https"]),
    host=st.sampled_from(["example.com", "EXAMPLE.com", "127.0.0.2", "bücher.de"]),
    port=st.sampled_from(["", ":80", ":443", ":8080"]),
    rest=_segment,
)
def test_canonicalize_is_idempotent(scheme: str, host: str, port: str, rest: str) -> None:
    url = f"{scheme}://{host}{port}/{rest}"
    once = canonicalize(url)
    assert canonicalize(once) == once
    assert "#" not in once


# URLs at the fast path's edge: canonical-looking ones built from parts that are often
# right (so the fast path takes many), with near misses among the parts (default ports, empty
# and dot segments, unsorted or blank query arguments, xn-- labels); in half of them one token
# is put anywhere (escapes, dots, parameters, userinfo, non-ASCII, ...), in a quarter one
# character is made upper case.
_LABELS = ["a", "ex", "xn--bcher-kva", "xn--zz", "_x", "b-", "-", "1", "127"]
_SEGMENTS = ["a", "B", "0", "...", ".a", "a.html", "~", "-", "_", "!$&'()*+,=:@", "", ".", ".."]
_ARGS = ["a", "b", "B", "0", "~", ".", "-", "_", ""]
_TOKENS = [
    "A",
    "%2e",
    "%41",
    "%7e",
    "%",
    ";",
    ".",
    "..",
    "/",
    "//",
    "/./",
    "/../",
    "?",
    "&",
    "=",
    "#",
    "@",
    ":",
    ":80",
    ":443",
    ":0",
    " ",
    "\t",
    "\\",
    "|",
    "[",
    "]",
    "ä",
    "+",
]


@st.composite
def _edge_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https"]))
    host = ".".join(draw(st.lists(st.sampled_from(_LABELS), min_size=1, max_size=4)))
    port = draw(st.sampled_from(["", "", ":8080", ":1", ":65535", ":80", ":443", ":065"]))
    segments = draw(st.lists(st.sampled_from(_SEGMENTS), max_size=4))
    url = f"{scheme}://{host}{port}" + "".join("/" + seg for seg in segments)
    pairs = draw(st.none() | st.lists(st.tuples(*[st.sampled_from(_ARGS)] * 2), max_size=3))
    if pairs is not None:
        url += "?" + "&".join(f"{k}={v}" for k, v in pairs)
    if draw(st.booleans()):
        url += "#" + draw(st.text(max_size=4))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(url)))
        url = url[:at] + draw(st.sampled_from(_TOKENS)) + url[at:]
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(url) - 1))
        url = url[:at] + url[at].upper() + url[at + 1 :]
    return url


@settings(max_examples=4000)
@given(url=_edge_urls())
@example("http://a:8080/p/1.html?b=1&c=2#x")
def test_the_fast_path_agrees_with_w3lib(url: str) -> None:
    fast = _canonical_as_is(url)
    if fast is not None:
        assert fast == _canonicalize_w3lib(url)


@settings(max_examples=2000)
@given(url=_edge_urls())
@example("http://a:65536/")
@example("http://user@a:8080/")
@example("http://a.:8080/")
def test_host_key_without_urlsplit_agrees_with_urlsplit(url: str) -> None:
    try:
        expected: str | type[ValueError] = _host_key_split(url)
    except ValueError:
        expected = ValueError
    try:
        got: str | type[ValueError] = host_key(url)
    except ValueError:
        got = ValueError
    assert got == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:8080/p/00001.html",
        "https://example.com/a/b.html?a=1&b=2#top",
        "http://www.example.com",
        "http://example.com/a//b#",
        "http://xn--bcher-kva.de/~user/index.php?id=7",
    ],
)
def test_links_that_are_canonical_already_take_the_fast_path(url: str) -> None:
    fast = _canonical_as_is(url)
    assert fast is not None
    assert fast == _canonicalize_w3lib(url)


@pytest.mark.parametrize(
    "url",
    [
        "HTTP://example.com/",
        "http://Example.com/",
        "http://example.com:80/",
        "http://example.com:0080/",
        "http://example.com./",
        "http://a@example.com/",
        "http://example.com/a/../b",
        "http://example.com/%7e",
        "http://example.com/a;p",
        "http://example.com/?b=1&a=2",
        "http://example.com/?a",
        "http://example.com/?",
    ],
)
def test_urls_not_canonical_yet_go_to_w3lib(url: str) -> None:
    assert _canonical_as_is(url) is None


_REF_PIECES = [
    "a",
    "b.html",
    "B",
    "0",
    "~",
    "-",
    "_",
    "!$&'()*+,=@",
    ".",
    "..",
    "...",
    "/",
    "//",
    "?",
    "?a=1",
    "?b=2&a=1",
    "?",
    "#",
    "#x",
    "#",
    ":",
    ";p",
    "%2e",
    "%41",
    " ",
    "\t",
    "\\",
    "ä",
    "http:",
    "https:",
    "HTTP:",
    "//a.b",
    "mailto:",
]
_BASES = [
    "http://a.b/",
    "http://a.b/p/x.html",
    "http://a.b:8080/p/q/",
    "https://a.b/p/x.html?q=1",
    "http://a.b",
    "http://a.b/p/x.html#f",
    "http://a.b/p//x.html",
    "http://a.b/p/../x.html",
    "http://A.b/p/x.html",
    "http://a.b/p/x;y/z",
]


@settings(max_examples=4000)
@given(
    base=st.sampled_from(_BASES),
    ref=st.lists(st.sampled_from(_REF_PIECES), min_size=1, max_size=6).map("".join) | _edge_urls(),
)
@example("http://a.b/p/x.html", "q/y.html?b=1#top")
def test_link_resolver_agrees_with_urljoin_and_canonicalize(base: str, ref: str) -> None:
    try:
        expected: str | None = canonicalize(urljoin(base, ref))
    except ValueError:
        expected = None
    try:
        got: str | None = link_resolver(base)(ref)
    except ValueError:
        got = None
    assert got == expected


def test_link_resolver_appends_plain_links_to_the_directory_of_a_canonical_page() -> None:
    resolve = link_resolver("http://a.b:8080/p/x.html?q=1")
    assert resolve("y.html") == "http://a.b:8080/p/y.html"
    assert resolve("/y.html?b=2&a=1#f") == "http://a.b:8080/y.html?a=1&b=2"
    assert resolve("../y.html") == "http://a.b:8080/y.html"
    assert resolve("https://c.d/") == "https://c.d/"


def test_urls_within_the_limits_are_not_traps() -> None:
    assert is_trap("http://example.com/a/b/a/b/a/b?x=1&y=2") is None


def test_a_long_url_is_a_trap() -> None:
    url = "http://example.com/" + "x" * 2100
    assert "longer than 2048" in (is_trap(url) or "")
    assert is_trap(url, TrapLimits(max_url_length=4096)) is None


def test_a_path_segment_repeated_too_often_is_a_trap() -> None:
    url = "http://example.com/cal/2024/cal/2024/cal/2024/cal/2024/"
    assert "repeated 4 times" in (is_trap(url) or "")
    assert is_trap(url, TrapLimits(max_repeated_segments=4)) is None


@settings(max_examples=2000)
@given(url=_edge_urls())
@example("http://a:8080/x\ty/?q=1")
@example("http://a/p?x#y?z")
def test_path_and_query_without_urlsplit_agree_with_urlsplit(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        with pytest.raises(ValueError):
            _path_and_query(url)
        return
    assert _path_and_query(url) == (parts.path, parts.query)


def test_a_segment_repeated_among_few_segments_or_params_among_few_ampersands_is_counted() -> None:
    limits = TrapLimits(max_repeated_segments=1, max_query_params=2)
    assert "'a' repeated 2 times" in (is_trap("http://e.com/a/a", limits) or "")
    assert is_trap("http://e.com/a/b?x=1&&y=2", limits) is None
    assert "3 query parameters" in (is_trap("http://e.com/?x=1&y=2&z", limits) or "")


def test_too_many_query_parameters_is_a_trap() -> None:
    url = "http://example.com/?" + "&".join(f"p{i}=1" for i in range(21))
    assert "21 query parameters" in (is_trap(url) or "")
    assert is_trap(url, TrapLimits(max_query_params=21)) is None
