"""The exporter's exactly-once bookkeeping, over an in-memory results log."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from ww.crawler.export import Exporter, ExportError, ResultCounts, drop_urls


class Log:
    """A results log as the queue serves it: read(topic, offset, n) -> [(offset, bytes)]."""

    def __init__(self, n: int) -> None:
        self.records = [
            msgpack.packb({"url": f"http://a.example/{i}", "status": 200}) for i in range(n)
        ]

    async def read(self, topic: str, offset: int, n: int) -> list[tuple[int, bytes]]:
        assert topic == "crawl.results"
        return list(enumerate(self.records))[offset : offset + n]


def urls(path: Path) -> list[str]:
    return [json.loads(line)["url"] for line in path.read_text().splitlines()]


async def test_catch_up_writes_each_record_once(tmp_path: Path) -> None:
    out, state = tmp_path / "r.jsonl", tmp_path / "export.json"
    e = Exporter(out, state)
    await e.catch_up(Log(5), 5)
    e.close()
    assert urls(out) == [f"http://a.example/{i}" for i in range(5)]


async def test_lines_after_the_checkpoint_are_truncated_and_written_again(tmp_path: Path) -> None:
    out, state = tmp_path / "r.jsonl", tmp_path / "export.json"
    log = Log(10)
    e = Exporter(out, state)
    await e.catch_up(log, 4)  # checkpoint at offset 4
    for offset, data in await log.read("crawl.results", 4, 3):
        e.write(offset, data)  # written but not checkpointed: a crash comes now
    e._out.flush()
    assert len(urls(out)) == 7
    resumed = Exporter(out, state, resume=True)
    assert resumed.offset == 4 and len(urls(out)) == 4
    await resumed.catch_up(log, 10)
    resumed.close()
    assert urls(out) == [f"http://a.example/{i}" for i in range(10)]


async def test_a_limit_exports_only_the_first_results(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    e = Exporter(out, tmp_path / "s.json", limit=3)
    await e.catch_up(Log(6), 6)
    e.close()
    assert len(urls(out)) == 3


async def test_the_counts_cover_exactly_the_lines_written(tmp_path: Path) -> None:
    log = Log(0)
    records = [
        {"url": "u0", "status": 200, "error": None, "attempts": 1, "size": 100},
        {"url": "u1", "status": None, "error": "disallowed by robots.txt", "attempts": 1},
        {"url": "u2", "status": 404, "error": None, "attempts": 1, "size": 10},
        {"url": "u3", "status": 200, "error": None, "attempts": 3, "size": 5},
        {"url": "u4", "status": 503, "error": None, "attempts": 2, "size": 1},  # past the limit
    ]
    log.records = [msgpack.packb(r) for r in records]
    e = Exporter(tmp_path / "r.jsonl", tmp_path / "s.json", limit=4)
    await e.catch_up(log, 5)
    e.close()
    assert e.counts == ResultCounts(
        results=4, failed=2, retried=2, bytes=115, status=Counter({"200": 2, "404": 1})
    )
    assert e.counts.results == e.written == len(urls(tmp_path / "r.jsonl"))


def test_counts_take_a_mistyped_field_as_absent() -> None:
    counts = ResultCounts()
    counts.add({"url": "u", "status": "200", "attempts": "2", "size": True, "error": None})
    assert counts == ResultCounts(results=1)


async def test_a_file_shorter_than_its_checkpoint_is_refused(tmp_path: Path) -> None:
    out, state = tmp_path / "r.jsonl", tmp_path / "export.json"
    e = Exporter(out, state)
    await e.catch_up(Log(3), 3)
    e.close()
    out.write_text("")
    with pytest.raises(ExportError, match="shorter"):
        Exporter(out, state, resume=True)


async def test_a_fresh_export_starts_the_file_over(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text("old\n")
    e = Exporter(out, tmp_path / "s.json")
    await e.catch_up(Log(2), 2)
    e.close()
    assert len(urls(out)) == 2


async def test_drop_urls_takes_out_lines_and_can_be_repeated_after_a_crash(tmp_path: Path) -> None:
    out, state = tmp_path / "r.jsonl", tmp_path / "export.json"
    e = Exporter(out, state)
    await e.catch_up(Log(5), 5)
    e.close()
    gone = {"http://a.example/1", "http://a.example/3"}
    assert drop_urls(out, state, gone) == 2
    assert urls(out) == ["http://a.example/0", "http://a.example/2", "http://a.example/4"]
    assert drop_urls(out, state, gone) == 0  # done already
    resumed = Exporter(out, state, resume=True)
    resumed.close()
    assert len(urls(out)) == 3  # the recorded length is the rewritten file's


async def test_drop_urls_finishes_a_rewrite_whose_state_was_not_saved(tmp_path: Path) -> None:
    out, state = tmp_path / "r.jsonl", tmp_path / "export.json"
    e = Exporter(out, state)
    await e.catch_up(Log(3), 3)
    e.close()
    # A crash after the rewritten file was renamed into place, before the state was saved:
    kept = [line for line in out.read_bytes().splitlines(keepends=True) if b"/1" not in line]
    out.write_bytes(b"".join(kept))
    drop_urls(out, state, {"http://a.example/1"})
    resumed = Exporter(out, state, resume=True)
    resumed.close()
    assert urls(out) == ["http://a.example/0", "http://a.example/2"]


async def test_the_warc_file_is_truncated_to_its_checkpoint_too(tmp_path: Path) -> None:
    from warcio.archiveiterator import ArchiveIterator

    def fetched(i: int) -> bytes:
        return msgpack.packb(
            {
                "url": f"http://a.example/{i}",
                "status": 200,
                "fetched_at": "2026-12-05T18:00:00.000Z",
                "_body": f"body {i}".encode(),
                "_headers": [["content-type", "text/plain"]],
            }
        )

    log = Log(0)
    log.records = [fetched(i) for i in range(6)]
    out, state, warc = tmp_path / "r.jsonl", tmp_path / "s.json", tmp_path / "r.warc.gz"
    e = Exporter(out, state, warc=warc)
    await e.catch_up(log, 3)
    for offset, data in await log.read("crawl.results", 3, 2):
        e.write(offset, data)  # not checkpointed
    e._out.flush()
    e._warc_out.flush()
    resumed = Exporter(out, state, warc=warc, resume=True)
    await resumed.catch_up(log, 6)
    resumed.close()
    with open(warc, "rb") as f:
        responses = [
            r.rec_headers.get_header("WARC-Target-URI")
            for r in ArchiveIterator(f)
            if r.rec_type == "response"
        ]
    assert responses == [f"http://a.example/{i}" for i in range(6)]
