"""Reading a crawl's results back from `crawl.results`: the latest result of each URL, and
which results --retry-failed crawls again."""

from __future__ import annotations

from typing import Any

__all__ = ["is_failure", "latest_results"]


def is_failure(record: dict[str, Any] | None) -> bool:
    """A result worth another try with --retry-failed: an error (no response, robots.txt
    unavailable, ...), a 5xx or a 429."""
    if record is None:
        return False
    status = record.get("status")
    return record.get("error") is not None or status is None or status >= 500 or status == 429


async def latest_results(client: Any) -> dict[str, tuple[int, bytes]]:
    """url -> (offset, record bytes) of the latest result of each URL in crawl.results."""
    from ww.crawler.export import decode_result
    from ww.crawler.worker import RESULTS

    end = int((await client.stats(RESULTS)).get("appended", 0))
    latest: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while offset < end:
        records = await client.read(RESULTS, offset, 1000)
        if not records:
            break
        for o, data in records:
            record = decode_result(data)
            if record is not None and isinstance(record.get("url"), str):
                latest[record["url"]] = (o, data)
            offset = o + 1
    return latest
