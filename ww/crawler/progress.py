"""Crawl counters fed by the workers' stats messages: totals, rates over a sliding window, a
rate history for a sparkline, per-worker rows and the last errors. Pure: no I/O, no clock;
the caller passes the time of each message and of each snapshot.

A worker publishes its own cumulative counters (see the crawler spec, "Worker stats"). A worker
that restarts under the same name starts again from zero; the meter keeps what the old one had
counted, so totals never go backwards.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

log = logging.getLogger(__name__)

SPARK_CHARS = "▁▂▃▄▅▆▇█"

_COUNTERS = ("pages", "errors", "retries", "bytes")


def sparkline(values: Sequence[float], width: int | None = None) -> str:
    """The last `width` values as block characters scaled to their maximum (zero → lowest)."""
    if width is not None:
        values = values[-width:] if width > 0 else ()
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARK_CHARS[0] * len(values)
    last = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[min(last, round(max(v, 0.0) / top * last))] for v in values)


def eta(done: int, max_pages: int | None, pages_per_s: float) -> float | None:
    """Seconds until `max_pages` are done at the current rate; 0 once reached; None when there
    is no limit or no progress to extrapolate from."""
    if max_pages is None:
        return None
    remaining = max_pages - done
    if remaining <= 0:
        return 0.0
    if pages_per_s <= 0:
        return None
    return remaining / pages_per_s


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker as the dashboard shows it. `stale`: no message for a while (gone or stuck);
    a stale worker's in-flight pages are not counted."""

    worker: str
    host: str
    in_flight: int
    pages: int
    errors: int
    retries: int
    bytes: int
    pages_per_s: float
    last_seen: float
    stale: bool


@dataclass(frozen=True, slots=True)
class ErrorLine:
    time: float
    worker: str
    message: str


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    """What the meter knows at one instant. `history` holds pages/s per completed bucket,
    oldest first; `status` is (code, count) sorted by code; `errors` newest last."""

    pages: int = 0
    errors: int = 0
    retries: int = 0
    bytes: int = 0
    in_flight: int = 0
    pages_per_s: float = 0.0
    bytes_per_s: float = 0.0
    history: tuple[float, ...] = ()
    status: tuple[tuple[str, int], ...] = ()
    workers: tuple[WorkerRow, ...] = ()
    errors_last: tuple[ErrorLine, ...] = ()


class _Series:
    """A cumulative counter as a step function of time, kept over a window, for rates."""

    __slots__ = ("_samples", "first")

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()
        self.first: float | None = None

    def add(self, now: float, value: float, window: float) -> None:
        if self.first is None:
            self.first = now
        samples = self._samples
        if samples and samples[-1][0] == now:
            samples[-1] = (now, value)
        else:
            samples.append((now, value))
        # Keep one sample at or before the window's start: the counter's value there.
        horizon = now - window
        while len(samples) >= 2 and samples[1][0] <= horizon:
            samples.popleft()

    def rate(self, now: float, window: float) -> float:
        """(value(now) - value(now - w)) / w, with w = the window or the time since the first
        sample, whichever is shorter."""
        if self.first is None or not self._samples:
            return 0.0
        span = min(window, now - self.first)
        if span <= 0:
            return 0.0
        start = now - span
        before = self._samples[0][1]
        for t, v in self._samples:
            if t > start:
                break
            before = v
        return max(0.0, (self._samples[-1][1] - before) / span)


@dataclass(slots=True)
class _Worker:
    name: str
    host: str = ""
    in_flight: int = 0
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    status_last: dict[str, int] = field(default_factory=dict)
    status_base: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_seen: float = 0.0
    pages: _Series = field(default_factory=_Series)

    def total(self, name: str) -> int:
        return self.base[name] + self.last[name]


def _parse(message: Any) -> dict[str, Any] | str:
    """The stats message as typed fields, or why it is malformed."""
    if not isinstance(message, Mapping):
        return f"a stats message must be a map, not {type(message).__name__}"
    worker = message.get("worker")
    if not isinstance(worker, str) or not worker:
        return "a stats message has no worker name"
    out: dict[str, Any] = {"worker": worker}
    host = message.get("host", "")
    out["host"] = host if isinstance(host, str) else str(host)
    for name in ("in_flight", *_COUNTERS):
        value = message.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"stats of {worker!r}: {name} must be a count, not {value!r}"
        out[name] = value
    status = message.get("status", {})
    if not isinstance(status, Mapping) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in status.values()
    ):
        return f"stats of {worker!r}: status must map codes to counts"
    out["status"] = {str(k): v for k, v in status.items()}
    last_error = message.get("last_error")
    out["last_error"] = None if last_error is None else str(last_error)
    return out


class CrawlMeter:
    """Totals and rates from the workers' stats messages.

    `window`: seconds over which pages/s and bytes/s are measured; `bucket`: seconds per
    sparkline bar; `history`: bars kept; `stale_after`: seconds without a message after which a
    worker is shown stale and its in-flight pages no longer count.
    """

    def __init__(
        self,
        *,
        window: float = 5.0,
        bucket: float = 1.0,
        history: int = 60,
        max_errors: int = 5,
        stale_after: float = 3.0,
    ) -> None:
        if window <= 0 or bucket <= 0 or history < 1 or max_errors < 0 or stale_after <= 0:
            raise ValueError("window, bucket and stale_after must be > 0, history >= 1")
        self.window = window
        self.bucket = bucket
        self.history = history
        self.stale_after = stale_after
        self._workers: dict[str, _Worker] = {}
        self._totals = dict.fromkeys(_COUNTERS, 0)
        self._pages = _Series()
        self._bytes = _Series()
        self._buckets: deque[list[float]] = deque()  # [bucket index, pages], ascending
        self._bucketed = 0  # pages already counted into buckets
        self._errors: deque[ErrorLine] = deque(maxlen=max_errors)
        self.malformed = 0

    def feed_packed(self, data: bytes, now: float) -> bool:
        """Feed one msgpack-encoded stats message as published on `ww-crawl.stats`."""
        try:
            message = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:
            return self._reject(f"a stats message is not msgpack ({e})")
        return self.feed(message, now)

    def feed(self, message: Any, now: float) -> bool:
        """Take one worker's stats at time `now`. A malformed message is counted, logged and
        ignored (returns False); it never raises."""
        parsed = _parse(message)
        if isinstance(parsed, str):
            return self._reject(parsed)
        name = parsed["worker"]
        w = self._workers.get(name)
        if w is None:
            w = self._workers[name] = _Worker(name)
        if any(parsed[c] < w.last[c] for c in _COUNTERS):
            # The worker restarted: what its previous run counted stays in the totals.
            for c in _COUNTERS:
                w.base[c] += w.last[c]
            for code, n in w.status_last.items():
                w.status_base[code] = w.status_base.get(code, 0) + n
            w.last = dict.fromkeys(_COUNTERS, 0)
            w.status_last = {}
        failures = parsed["errors"] + parsed["retries"] - w.last["errors"] - w.last["retries"]
        for c in _COUNTERS:
            self._totals[c] += parsed[c] - w.last[c]
            w.last[c] = parsed[c]
        w.status_last = parsed["status"]
        w.host = parsed["host"] or w.host
        w.in_flight = parsed["in_flight"]
        w.last_seen = now
        err = parsed["last_error"]
        if err is not None and (err != w.last_error or failures > 0):
            self._errors.append(ErrorLine(now, name, err))
        w.last_error = err
        w.pages.add(now, w.total("pages"), self.window)
        self._add_to_bucket(now, self._totals["pages"] - self._bucketed)
        self._bucketed = self._totals["pages"]
        self._pages.add(now, self._totals["pages"], self.window)
        self._bytes.add(now, self._totals["bytes"], self.window)
        return True

    def _reject(self, why: str) -> bool:
        self.malformed += 1
        log.warning("ignored %s", why)
        return False

    def _add_to_bucket(self, now: float, delta: int) -> None:
        index = math.floor(now / self.bucket)
        buckets = self._buckets
        if buckets and buckets[-1][0] == index:
            buckets[-1][1] += delta
        elif buckets and buckets[-1][0] > index:
            buckets[-1][1] += delta  # time went backwards: count it where we are
        else:
            buckets.append([index, float(delta)])
            while buckets and buckets[0][0] <= index - self.history - 1:
                buckets.popleft()

    def rate(self, now: float) -> float:
        """Pages per second over the window ending at `now`."""
        return self._pages.rate(now, self.window)

    def eta(self, now: float, *, done: int, max_pages: int | None) -> float | None:
        """Seconds until `done` reaches `max_pages` at the current rate (see `eta`)."""
        return eta(done, max_pages, self.rate(now))

    def snapshot(self, now: float) -> MeterSnapshot:
        current = math.floor(now / self.bucket)
        counts = {int(i): n for i, n in self._buckets}
        first = current
        if self._pages.first is not None:
            first = max(current - self.history, math.floor(self._pages.first / self.bucket))
        history = tuple(counts.get(i, 0.0) / self.bucket for i in range(first, current))
        status: dict[str, int] = {}
        rows = []
        in_flight = 0
        for w in self._workers.values():
            for part in (w.status_base, w.status_last):
                for code, n in part.items():
                    status[code] = status.get(code, 0) + n
            stale = now - w.last_seen > self.stale_after
            if not stale:
                in_flight += w.in_flight
            rows.append(
                WorkerRow(
                    worker=w.name,
                    host=w.host,
                    in_flight=0 if stale else w.in_flight,
                    pages=w.total("pages"),
                    errors=w.total("errors"),
                    retries=w.total("retries"),
                    bytes=w.total("bytes"),
                    pages_per_s=w.pages.rate(now, self.window),
                    last_seen=w.last_seen,
                    stale=stale,
                )
            )
        rows.sort(key=lambda r: r.worker)
        return MeterSnapshot(
            pages=self._totals["pages"],
            errors=self._totals["errors"],
            retries=self._totals["retries"],
            bytes=self._totals["bytes"],
            in_flight=in_flight,
            pages_per_s=self._pages.rate(now, self.window),
            bytes_per_s=self._bytes.rate(now, self.window),
            history=history,
            status=tuple(sorted(status.items())),
            workers=tuple(rows),
            errors_last=tuple(self._errors),
        )
