"""Scope decisions, without sockets."""

from __future__ import annotations

import pickle

import msgpack
import pytest

from ww.crawler.scope import Scope, registrable_domain


def test_same_host_allows_only_the_seed_hosts_with_their_ports() -> None:
    scope = Scope("same-host", ("http://Example.com/start", "http://127.0.0.2:8080/"))
    assert scope.allows("http://example.com/other")
    assert scope.allows("http://127.0.0.2:8080/x")
    assert not scope.allows("http://127.0.0.2:8081/x")
    assert not scope.allows("http://www.example.com/")
    assert scope.reason("http://other.org/") == "on another host than the seeds"


def test_same_domain_allows_subdomains_of_the_seed_domains() -> None:
    scope = Scope("same-domain", ("http://www.example.com/", "http://news.bbc.co.uk/"))
    assert scope.allows("http://blog.example.com/")
    assert scope.allows("https://example.com/")
    assert scope.allows("http://www.bbc.co.uk/sport")
    assert not scope.allows("http://example.org/")
    assert not scope.allows("http://other.co.uk/")


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("www.example.com", "example.com"),
        ("example.com", "example.com"),
        ("a.b.c.example.org", "example.org"),
        ("news.bbc.co.uk", "bbc.co.uk"),
        ("www.ox.ac.uk", "ox.ac.uk"),
        ("shop.example.com.au", "example.com.au"),
        ("localhost", "localhost"),
        ("127.0.0.2", "127.0.0.2"),
    ],
)
def test_registrable_domain_rule(host: str, domain: str) -> None:
    assert registrable_domain(host) == domain


def test_any_allows_every_http_url_but_no_other_scheme() -> None:
    scope = Scope("any", ("http://example.com/",))
    assert scope.allows("https://anything.example.net/")
    assert not scope.allows("ftp://example.com/")


def test_allow_patterns_must_match_and_deny_patterns_must_not() -> None:
    scope = Scope("any", ("http://e.com/",), allow=(r"/docs/",), deny=(r"\.pdf$",))
    assert scope.allows("http://e.com/docs/a.html")
    assert scope.reason("http://e.com/blog/") == "matches no --allow pattern"
    assert scope.reason("http://e.com/docs/a.pdf") == r"matches --deny '\\.pdf$'"


def test_max_depth_counts_link_hops_from_a_seed() -> None:
    scope = Scope("same-host", ("http://e.com/",), max_depth=2)
    assert scope.allows("http://e.com/a", 0)
    assert scope.allows("http://e.com/a", 2)
    assert not scope.allows("http://e.com/a", 3)
    assert Scope("same-host", ("http://e.com/",)).allows("http://e.com/a", 10_000)


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown scope 'same-planet'"):
        Scope("same-planet", ())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad --deny pattern '\\(unclosed'"):
        Scope("any", (), deny=("(unclosed",))
    with pytest.raises(ValueError, match="max_depth must be 0 or more"):
        Scope("any", (), max_depth=-1)


def test_a_scope_travels_as_msgpack_and_pickle() -> None:
    scope = Scope("same-domain", ("http://www.e.com/",), ("/a",), ("/b",), 3)
    again = Scope.from_dict(msgpack.unpackb(msgpack.packb(scope.to_dict())))
    assert again == scope
    assert again.allows("http://x.e.com/a") and not again.allows("http://x.e.com/a/b")
    unpickled = pickle.loads(pickle.dumps(scope))
    assert unpickled == scope and unpickled.allows("http://x.e.com/a")


def test_seeds_are_kept_canonical() -> None:
    assert Scope("same-host", ("HTTP://E.com:80/#x",)).seeds == ("http://e.com/",)
