"""Retry decisions, without sockets or clocks: `now` is a parameter."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from tenacity import wait_exponential, wait_fixed

from ww.crawler.retry import Final, Retry, backoff, decide, parse_retry_after

NOW = 1_800_000_000.0
EXP = wait_exponential(multiplier=1, min=1, max=60)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | None = None
    error_kind: str | None = None
    retry_after: str | None = None


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(error_kind="connect"),
        Outcome(error_kind="timeout"),
        Outcome(200, error_kind="timeout"),
        Outcome(error_kind="network"),
        Outcome(500),
        Outcome(502),
        Outcome(503),
        Outcome(429),
    ],
)
def test_transient_failures_are_retried(outcome: Outcome) -> None:
    assert isinstance(decide(outcome, 1, 3, NOW, wait=EXP), Retry)


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (Outcome(200), "status 200"),
        (Outcome(404), "status 404"),
        (Outcome(403), "status 403"),
        (Outcome(410), "status 410"),
        (Outcome(301, error_kind="redirect-loop"), "redirect-loop error"),
        (Outcome(302, error_kind="redirect-blocked"), "redirect-blocked error"),
        (Outcome(error_kind="bad-url"), "bad-url error"),
    ],
)
def test_successes_other_4xx_and_incurable_errors_are_final(outcome: Outcome, reason: str) -> None:
    assert decide(outcome, 1, 3, NOW, wait=EXP) == Final(reason)


def test_retries_stop_after_max_retries() -> None:
    outcome = Outcome(503)
    assert [type(decide(outcome, n, 3, NOW, wait=EXP)) for n in (1, 2, 3, 4)] == [
        Retry,
        Retry,
        Retry,
        Final,
    ]
    assert decide(outcome, 4, 3, NOW) == Final("status 503, gave up after 4 attempts")
    assert decide(outcome, 1, 0, NOW) == Final("status 503, gave up after 1 attempts")


def test_backoff_grows_exponentially() -> None:
    delays = [decide(Outcome(500), n, 10, NOW, wait=EXP) for n in (1, 2, 3, 4)]
    assert [d.delay for d in delays if isinstance(d, Retry)] == [1.0, 2.0, 4.0, 8.0]


def test_default_backoff_has_bounded_jitter() -> None:
    for attempts in (1, 2, 3):
        base = 2.0 ** (attempts - 1)
        assert base <= backoff(attempts) <= base + 1.0


def test_retry_after_in_seconds_is_honoured_when_longer_than_the_backoff() -> None:
    assert decide(Outcome(429, retry_after="120"), 1, 3, NOW, wait=EXP) == Retry(
        120.0, "status 429"
    )
    assert decide(Outcome(503, retry_after="0"), 3, 3, NOW, wait=EXP) == Retry(4.0, "status 503")


def test_retry_after_as_an_http_date_is_honoured() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 90, UTC), usegmt=True)
    assert decide(Outcome(503, retry_after=when), 1, 3, NOW, wait=EXP) == Retry(90.0, "status 503")


def test_retry_after_is_ignored_for_statuses_that_do_not_define_it() -> None:
    assert decide(Outcome(500, retry_after="600"), 1, 3, NOW, wait=wait_fixed(5)) == Retry(
        5.0, "status 500"
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        (" 7 ", 7.0),
        ("Fri, 15 Jan 2027 08:10:00 GMT", 600.0),
        ("Mon, 01 Jan 2001 00:00:00 GMT", 0.0),  # in the past: now
        ("999999", 3600.0),  # capped at an hour
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds
