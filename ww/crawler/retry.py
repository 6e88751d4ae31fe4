"""Whether a failed fetch is tried again, and when: a pure decision over the fetch's outcome.

Connect errors, timeouts, broken connections, 5xx and 429 are retried, up to `max_retries`
times after the first attempt, with tenacity's exponential backoff (with jitter by default),
or after the `Retry-After` a 429 or 503 asks for when that is longer. Any other status, and
errors that another attempt cannot cure (a redirect loop, a bad URL), are final.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from typing import Protocol

from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_exponential_jitter

__all__ = [
    "DEFAULT_WAIT",
    "RETRYABLE_ERRORS",
    "Final",
    "Outcome",
    "Retry",
    "backoff",
    "decide",
    "parse_retry_after",
]

RETRYABLE_ERRORS = frozenset({"connect", "timeout", "network"})
DEFAULT_WAIT: wait_base = wait_exponential_jitter(initial=1.0, max=300.0, exp_base=2, jitter=1.0)
MAX_RETRY_AFTER = 3600.0


class Outcome(Protocol):
    """What `decide` reads of a fetch (a `FetchResult` is one)."""

    @property
    def status(self) -> int | None: ...
    @property
    def error_kind(self) -> str | None: ...
    @property
    def retry_after(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after `delay` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class Final:
    """This outcome is the page's result."""

    reason: str


def backoff(attempts: int, wait: wait_base = DEFAULT_WAIT) -> float:
    """Seconds to wait after `attempts` attempts, by a tenacity wait strategy."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempts)
    return float(wait(state))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from `now` (Unix time) that a Retry-After value asks for: delta-seconds or an
    HTTP date; None when absent or unreadable. Never negative, at most an hour."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def decide(
    outcome: Outcome,
    attempts: int,
    max_retries: int,
    now: float,
    *,
    wait: wait_base = DEFAULT_WAIT,
) -> Retry | Final:
    """Retry or not after the `attempts`-th attempt (counting from 1) ended with `outcome`."""
    status, kind = outcome.status, outcome.error_kind
    if kind is not None:
        if kind not in RETRYABLE_ERRORS:
            return Final(f"{kind} error")
        why = f"{kind} error"
    elif status is None:
        return Final("no status")
    elif status == 429 or status >= 500:
        why = f"status {status}"
    else:
        return Final(f"status {status}")
    if attempts > max_retries:
        return Final(f"{why}, gave up after {attempts} attempts")
    delay = backoff(attempts, wait)
    if kind is None and status in (429, 503):
        asked = parse_retry_after(outcome.retry_after, now)
        if asked is not None:
            delay = max(delay, asked)
    return Retry(delay, why)
