"""The result record: one JSON object per canonical URL."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .fetch import FetchResult
from .parse import Page

__all__ = ["RECORD_KEYS", "iso_utc", "make_record"]

log = logging.getLogger(__name__)

RECORD_KEYS = (
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
)


def iso_utc(ts: float) -> str:
    """Unix time as UTC ISO 8601 with milliseconds: 2026-12-05T18:11:27.123Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def make_record(
    url: str,
    *,
    depth: int,
    referrer: str | None,
    fetched_at: float,
    attempts: int,
    worker: str,
    result: FetchResult | None = None,
    page: Page | None = None,
    error: str | None = None,
    links: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record for `url` (canonical). `result` is None when nothing was fetched (say why in
    `error`, e.g. disallowed by robots.txt); `page` is None for what was not parsed as HTML;
    `error` overrides the fetch's own. `links` overrides the page's links (for instance with
    those a handler returned). Fields in `extra` (a handler's) are added under their own names;
    one that would replace a record field goes under "handler_<name>" instead."""
    record: dict[str, Any] = {
        "url": url,
        "final_url": result.final_url if result is not None else url,
        "status": result.status if result is not None else None,
        "error": error if error is not None else (result.error if result is not None else None),
        "depth": depth,
        "referrer": referrer,
        "fetched_at": iso_utc(fetched_at),
        "elapsed_ms": result.elapsed_ms if result is not None else 0,
        "content_type": result.content_type if result is not None else None,
        "size": result.size if result is not None else 0,
        "sha256": result.sha256 if result is not None else None,
        "title": page.title if page is not None else None,
        "links": list(links if links is not None else page.links if page is not None else ()),
        "text": page.text if page is not None else None,
        "redirects": [dict(r) for r in result.redirects] if result is not None else [],
        "attempts": attempts,
        "worker": worker,
    }
    for name, value in (extra or {}).items():
        key = name if name not in record else f"handler_{name}"
        if key in record:
            log.warning("handler field %r dropped: the record already has %r", name, key)
            continue
        record[key] = value
    return record
