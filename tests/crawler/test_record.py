"""The result record's shape, without sockets."""

from __future__ import annotations

import json

from ww.crawler.fetch import FetchResult
from ww.crawler.parse import parse_html
from ww.crawler.record import RECORD_KEYS, iso_utc, make_record

KEYS = [
    "url",
    "final_url",
    "status",
    "error",
    "depth",
    "referrer",
    "fetched_at",
    "elapsed_ms",
    "content_type",
    "size",
    "sha256",
    "title",
    "links",
    "text",
    "redirects",
    "attempts",
    "worker",
]


def _result() -> FetchResult:
    return FetchResult(
        url="http://e.com/old",
        final_url="http://e.com/new",
        status=200,
        content_type="text/html",
        body=b"<title>T</title><a href='/x'>x</a>",
        size=35,
        sha256="ab" * 32,
        redirects=({"url": "http://e.com/old", "status": 301},),
        elapsed_ms=12,
    )


def test_a_fetched_page_gives_exactly_the_documented_keys() -> None:
    result = _result()
    page = parse_html(result.body, result.final_url)
    record = make_record(
        "http://e.com/old",
        depth=2,
        referrer="http://e.com/",
        fetched_at=1_800_000_000.25,
        attempts=1,
        worker="w1",
        result=result,
        page=page,
    )
    assert list(record) == KEYS == list(RECORD_KEYS)
    assert record["final_url"] == "http://e.com/new"
    assert record["title"] == "T" and record["text"] == "x"
    assert record["links"] == ["http://e.com/x"]
    assert record["redirects"] == [{"url": "http://e.com/old", "status": 301}]
    assert record["fetched_at"] == "2027-01-15T08:00:00.250Z"
    assert json.loads(json.dumps(record)) == record


def test_a_page_not_fetched_says_why() -> None:
    record = make_record(
        "http://e.com/private",
        depth=1,
        referrer="http://e.com/",
        fetched_at=0.0,
        attempts=0,
        worker="w2",
        error="disallowed by robots.txt",
    )
    assert list(record) == KEYS
    assert record["status"] is None and record["error"] == "disallowed by robots.txt"
    assert record["links"] == [] and record["text"] is None and record["final_url"] == record["url"]


def test_handler_fields_are_added_without_replacing_record_fields() -> None:
    record = make_record(
        "http://e.com/",
        depth=0,
        referrer=None,
        fetched_at=0.0,
        attempts=1,
        worker="w",
        result=_result(),
        extra={"price": 3, "title": "mine", "links": ["x"]},
    )
    assert record["price"] == 3
    assert record["title"] is None and record["handler_title"] == "mine"
    assert record["links"] == [] and record["handler_links"] == ["x"]
    assert list(record)[: len(KEYS)] == KEYS


def test_iso_utc() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
