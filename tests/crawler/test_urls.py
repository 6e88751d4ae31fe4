"""Canonical URLs, host keys and trap guards, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ww.crawler.urls import TrapLimits, canonicalize, host_key, is_trap


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


def test_too_many_query_parameters_is_a_trap() -> None:
    url = "http://example.com/?" + "&".join(f"p{i}=1" for i in range(21))
    assert "21 query parameters" in (is_trap(url) or "")
    assert is_trap(url, TrapLimits(max_query_params=21)) is None
