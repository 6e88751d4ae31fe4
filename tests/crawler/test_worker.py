"""The worker's decisions that need no queue: which links become frontier items."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from ww.crawler.settings import CrawlSettings
from ww.crawler.worker import Worker, frontier_item, read_item, retry_item, robots_item


def worker(**settings: Any) -> Worker:
    s = CrawlSettings(seeds=("http://a.example/",), **settings)
    return Worker(None, s, "w")  # type: ignore[arg-type]  # no queue needed here


def follow(w: Worker, links: list[str], depth: int = 0) -> list[tuple[str | None, dict[str, Any]]]:
    items = w._follow("http://a.example/", depth, links)
    return [(item.key, msgpack.unpackb(item.payload)) for item in items]


def test_links_in_scope_become_items_one_hop_deeper_with_the_robots_item_first() -> None:
    got = follow(worker(), ["http://a.example/x", "http://b.example/y", "http://a.example/z"])
    assert [key for key, _ in got] == [
        "robots:a.example",
        "http://a.example/x",
        "http://a.example/z",
    ]
    assert got[0][1]["kind"] == "robots" and got[0][1]["url"] == "http://a.example/robots.txt"
    assert got[1][1] == {"depth": 1, "referrer": "http://a.example/"}  # the key is the URL


def test_a_host_gets_its_robots_item_once_per_worker() -> None:
    w = worker()
    follow(w, ["http://a.example/x"])
    assert [key for key, _ in follow(w, ["http://a.example/y"])] == ["http://a.example/y"]


def test_ignore_robots_puts_no_robots_items() -> None:
    got = follow(worker(ignore_robots=True), ["http://a.example/x"])
    assert [key for key, _ in got] == ["http://a.example/x"]


def test_depth_deny_and_trap_guards_drop_links() -> None:
    w = worker(max_depth=2, deny=("/private/",), max_query_params=2)
    links = [
        "http://a.example/private/x",
        "http://a.example/q?a=1&b=2&c=3",
        "http://a.example/ok",
    ]
    assert [key for key, _ in follow(w, links)] == ["robots:a.example", "http://a.example/ok"]
    assert follow(worker(max_depth=2), ["http://a.example/deep"], depth=2) == []


def test_items_are_partitioned_by_host_and_port() -> None:
    w = worker(scope="any")
    items = w._follow("http://a.example/", 0, ["http://b.example:8080/p"])
    assert {item.partition for item in items} == {"b.example:8080"}


def test_links_already_put_by_this_worker_are_not_put_again() -> None:
    w = worker(ignore_robots=True)
    w._remember_put(["http://a.example/x"])
    got = follow(w, ["http://a.example/x", "http://a.example/y"])
    assert [key for key, _ in got] == ["http://a.example/y"]


def test_the_memory_of_links_put_is_bounded(monkeypatch: Any) -> None:
    import ww.crawler.worker as worker_module

    monkeypatch.setattr(worker_module, "PUT_MEMORY", 2)
    w = worker(ignore_robots=True)
    w._remember_put(["http://a.example/1", "http://a.example/2", "http://a.example/3"])
    w._remember_put(["http://a.example/4"])
    assert len(w._put_keys) <= 3
    assert [key for key, _ in follow(w, ["http://a.example/1"])] == ["http://a.example/1"]


def test_every_kind_of_frontier_item_reads_back_as_what_was_put() -> None:
    page = frontier_item("http://a.example/x", 2, "http://a.example/")
    assert page.partition == "a.example"
    assert read_item(page.key, page.payload) == (
        "page",
        "http://a.example/x",
        2,
        "http://a.example/",
    )
    retry = retry_item("http://a.example/x", 1, None, 3)
    assert read_item(retry.key, retry.payload) == ("page", "http://a.example/x", 1, None)
    robots = robots_item("http://a.example:8080/x")
    assert read_item(robots.key, robots.payload) == (
        "robots",
        "http://a.example:8080/robots.txt",
        0,
        None,
    )


def test_a_page_item_that_carries_its_url_in_the_payload_still_reads() -> None:
    old = msgpack.packb({"url": "http://a.example/x", "depth": 1, "referrer": None, "kind": "page"})
    assert read_item("http://a.example/x", old) == ("page", "http://a.example/x", 1, None)


@pytest.mark.parametrize(
    ("key", "payload"),
    [
        (None, msgpack.packb({"depth": 1})),  # no URL anywhere
        ("http://a.example/", msgpack.packb({"referrer": None})),  # no depth
        ("http://a.example/", msgpack.packb([1, 2])),  # not a map
        ("http://a.example/", b"\xc1"),  # not msgpack
    ],
)
def test_a_malformed_frontier_item_raises(key: str | None, payload: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the worker drops the item on any exception
        read_item(key, payload)
