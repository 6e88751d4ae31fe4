"""Follow `crawl.results` into a JSON Lines file (and a WARC file), each URL exactly once.

The exporter writes records in the order of the results log, then checkpoints: it flushes and
fsyncs the files and only then records, in a small state file, the log offset it reached with
the length of each file at that point (written to a temporary file, fsynced and renamed). On
resume it truncates each file to the recorded length and reads the log again from the recorded
offset, so whatever it wrote after its last checkpoint is written once more, not twice, and a
crash at any point loses nothing (the log keeps every result).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import msgpack
import trio

from ww.durable import fsync_dir, write_atomic

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "ExportState",
    "Exporter",
    "ResultCounts",
    "decode_result",
    "drop_urls",
    "result_line",
]

RESULTS = "crawl.results"
CHECKPOINT_INTERVAL = 0.5  # seconds between checkpoints while results stream in
READ_BATCH = 500


class ExportError(Exception):
    """The export cannot go on; the message is one line."""


class ResultsReader(Protocol):
    async def read(self, topic: str, offset: int, n: int) -> list[tuple[int, bytes]]: ...


@dataclass(frozen=True, slots=True)
class ExportState:
    """How far the export got: the next log offset, and each file's length at that point."""

    offset: int = 0
    length: int = 0
    warc_length: int = 0

    @classmethod
    def load(cls, path: Path) -> ExportState | None:
        try:
            data = json.loads(path.read_text())
            return cls(int(data["offset"]), int(data["length"]), int(data.get("warc_length", 0)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportError(
                f"cannot read the export state {path}: {exc}; "
                "rerun with --fresh, or run `ww-crawl export` to write the results again"
            ) from None

    def save(self, path: Path) -> None:
        state = {"offset": self.offset, "length": self.length, "warc_length": self.warc_length}
        write_atomic(path, json.dumps(state).encode())


def decode_result(data: bytes) -> dict[str, Any] | None:
    """A results-log record as a dict, or None (logged) for one that is not a msgpack map."""
    try:
        record = msgpack.unpackb(data)
    except Exception as exc:
        log.warning("skipping a malformed result record: %s", exc)
        return None
    if not isinstance(record, dict):
        log.warning("skipping a result record that is not a map")
        return None
    return record


@dataclass(slots=True)
class ResultCounts:
    """What a series of result records holds: how many; how many failed (an error, or a status
    of 400 or more); the attempts they took after each one's first; the bytes fetched; the
    status codes. A field of the wrong type counts as absent."""

    results: int = 0
    failed: int = 0
    retried: int = 0
    bytes: int = 0
    status: Counter[str] = field(default_factory=Counter)

    def add(self, record: Mapping[str, Any]) -> None:
        status = _count_field(record.get("status"))
        self.results += 1
        if record.get("error") is not None or (status or 0) >= 400:
            self.failed += 1
        self.retried += max(0, (_count_field(record.get("attempts")) or 1) - 1)
        self.bytes += _count_field(record.get("size")) or 0
        if status is not None:
            self.status[str(status)] += 1


def _count_field(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def result_line(record: Mapping[str, Any]) -> bytes:
    """One JSON Lines line: the record's public fields (those not starting with `_`)."""
    public = {k: v for k, v in record.items() if not str(k).startswith("_")}
    return json.dumps(public, ensure_ascii=False, default=_jsonable).encode() + b"\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Exporter:
    """Writes results to `jsonl` (and `warc`), checkpointing into `state_path`.

    `resume=False` starts both files afresh; `resume=True` continues from the checkpoint.
    `limit`: export at most this many results (the first ones: `--max-pages`).
    """

    def __init__(
        self,
        jsonl: Path,
        state_path: Path,
        *,
        warc: Path | None = None,
        resume: bool = False,
        limit: int | None = None,
    ) -> None:
        self.jsonl = jsonl
        self.warc = warc
        self.state_path = state_path
        self.limit = limit
        self.written = 0  # lines written by this exporter (this run)
        self.counts = ResultCounts()  # of the lines written by this exporter
        state = ExportState.load(state_path) if resume else None
        self.state = state or ExportState()
        self._out = self._open(jsonl, self.state.length, "JSON Lines")
        self._warc_out: Any = None
        self._warc_writer: Any = None
        if warc is not None:
            self._warc_out = self._open(warc, self.state.warc_length, "WARC")
            from warcio.warcwriter import WARCWriter

            self._warc_writer = WARCWriter(self._warc_out, gzip=True)
        self.offset = self.state.offset
        self.skip: set[int] = set()  # offsets not to export (superseded by a later result)
        self.state.save(state_path)

    def _open(self, path: Path, length: int, what: str) -> io.BufferedRandom:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 (closed in close())
        size = os.fstat(f.fileno()).st_size
        if size < length:
            f.close()
            raise ExportError(
                f"{what} file {path} is shorter ({size} bytes) than what was exported into it "
                f"({length} bytes); run `ww-crawl export` to write it again, or --fresh"
            )
        f.truncate(length)
        f.seek(length)
        return f

    @property
    def done(self) -> bool:
        return self.limit is not None and self.offset >= self.limit

    def write(self, offset: int, data: bytes) -> None:
        """Export the record at `offset` of the results log (records must come in order)."""
        if offset < self.offset:
            return  # already exported
        self.offset = offset + 1
        if (self.limit is not None and offset >= self.limit) or offset in self.skip:
            return
        record = decode_result(data)
        if record is None:
            return
        self._out.write(result_line(record))
        self.written += 1
        self.counts.add(record)
        if self._warc_writer is not None:
            write_warc(self._warc_writer, record)

    def checkpoint(self) -> None:
        """Make what was written durable, then record how far that is."""
        self._out.flush()
        os.fsync(self._out.fileno())
        warc_length = 0
        if self._warc_out is not None:
            self._warc_out.flush()
            os.fsync(self._warc_out.fileno())
            warc_length = self._warc_out.tell()
        state = ExportState(self.offset, self._out.tell(), warc_length)
        if state != self.state:
            state.save(self.state_path)
            self.state = state

    def close(self) -> None:
        try:
            self.checkpoint()
        finally:
            self._out.close()
            if self._warc_out is not None:
                self._warc_out.close()

    async def catch_up(self, reader: ResultsReader, target: int) -> None:
        """Export every record below `target`, then checkpoint."""
        while self.offset < target and not self.done:
            records = await reader.read(RESULTS, self.offset, min(READ_BATCH, target - self.offset))
            if not records:
                await trio.sleep(0.05)
                continue
            for offset, data in records:
                self.write(offset, data)
        self.checkpoint()

    async def follow(self, reader: ResultsReader, poll: float = 0.1) -> None:
        """Export records as they commit, checkpointing every CHECKPOINT_INTERVAL, until
        cancelled (the caller then calls `catch_up` and `close`)."""
        last = trio.current_time()
        while not self.done:
            records = await reader.read(RESULTS, self.offset, READ_BATCH)
            for offset, data in records:
                self.write(offset, data)
            if trio.current_time() - last >= CHECKPOINT_INTERVAL:
                self.checkpoint()
                last = trio.current_time()
            if len(records) < READ_BATCH:
                await trio.sleep(poll)


def drop_urls(jsonl: Path, state_path: Path, urls: set[str]) -> int:
    """Remove the exported lines of `urls` (to be crawled again) from `jsonl`, keeping the
    export state true; returns how many lines went. Safe to repeat after a crash at any point:
    a file shorter than its recorded length is the finished rewrite of an earlier try."""
    state = ExportState.load(state_path)
    if state is None or not jsonl.exists():
        return 0
    size = jsonl.stat().st_size
    if size < state.length:  # rewritten, but the state was not saved yet
        ExportState(state.offset, size, state.warc_length).save(state_path)
        return 0
    with open(jsonl, "rb") as f:
        lines = f.read(state.length).splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            url = json.loads(line).get("url")
        except ValueError:
            url = None
        if url not in urls:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if not dropped:
        return 0
    fresh = jsonl.with_name(jsonl.name + ".new")
    with open(fresh, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(fresh, jsonl)
    fsync_dir(jsonl.parent)
    ExportState(state.offset, sum(len(x) for x in kept), state.warc_length).save(state_path)
    return dropped


def write_warc(writer: Any, record: Mapping[str, Any]) -> None:
    """A request and a response record for a fetched result that carries its raw response
    (`_body`, `_headers`, `_http_version`: present when the crawl runs with --warc)."""
    from warcio.statusandheaders import StatusAndHeaders

    body = record.get("_body")
    status = record.get("status")
    if body is None or status is None:
        return
    uri = str(record.get("final_url") or record["url"])
    date = _warc_date(record.get("fetched_at"))
    request_headers = StatusAndHeaders(
        f"GET {_path_of(uri)} HTTP/1.1",
        [(str(k), str(v)) for k, v in record.get("_request_headers") or []],
        is_http_request=True,
    )
    warc_headers = {"WARC-Date": date} if date else None
    request = writer.create_warc_record(
        uri, "request", http_headers=request_headers, warc_headers_dict=warc_headers
    )
    reason = str(record.get("_reason") or "")
    response_headers = StatusAndHeaders(
        f"{status} {reason}".strip(),
        [(str(k), str(v)) for k, v in record.get("_headers") or []],
        protocol=str(record.get("_http_version") or "HTTP/1.1"),
    )
    payload = bytes(body)
    headers = dict(warc_headers or {})
    headers["WARC-Payload-Digest"] = "sha256:" + hashlib.sha256(payload).hexdigest()
    response = writer.create_warc_record(
        uri,
        "response",
        payload=io.BytesIO(payload),
        length=len(payload),
        http_headers=response_headers,
        warc_headers_dict=headers,
    )
    response.rec_headers.add_header("WARC-Concurrent-To", request.rec_headers["WARC-Record-ID"])
    writer.write_record(request)
    writer.write_record(response)


def _path_of(uri: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _warc_date(fetched_at: Any) -> str | None:
    if not isinstance(fetched_at, str):
        return None
    try:
        when = datetime.fromisoformat(fetched_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
