"""Record framing for the write-ahead log and the other files of `DiskStorage`.

A frame is ``MAGIC (2 bytes) | length (u32 LE) | crc (u32 LE) | payload``. The CRC32 covers the
length field and the payload, so a torn or flipped length is caught like a damaged payload. The
magic lets a scan look for intact frames after a damaged one: that is how damage at the tail of
a file (a torn write, to be truncated) is told apart from damage before it (to be refused).

Pure functions over bytes; the file handling lives in `ww.raft.disk`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\xa7\x1f"
_HEAD = struct.Struct("<2sII")
HEAD_SIZE = _HEAD.size
MAX_PAYLOAD = 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
    """`payload` framed with its length and checksum."""
    n = len(payload)
    if not 0 < n <= MAX_PAYLOAD:
        raise ValueError(f"a record payload must be 1 to {MAX_PAYLOAD} bytes, not {n}")
    crc = zlib.crc32(payload, zlib.crc32(n.to_bytes(4, "little")))
    return _HEAD.pack(MAGIC, n, crc) + payload


def check_frame(buf: bytes, offset: int) -> tuple[int, str]:
    """Validate the frame at `offset`: (offset of the next frame, "") if intact, else
    (offset, what is wrong)."""
    if len(buf) - offset < HEAD_SIZE:
        return offset, f"a record header cut short ({len(buf) - offset} of {HEAD_SIZE} bytes)"
    magic, n, crc = _HEAD.unpack_from(buf, offset)
    if magic != MAGIC:
        return offset, "no record starts here (bad magic)"
    start = offset + HEAD_SIZE
    if n == 0 or start + n > len(buf):
        return offset, f"a record of {n} bytes runs past the end of the file"
    payload = memoryview(buf)[start : start + n]
    if zlib.crc32(payload, zlib.crc32(n.to_bytes(4, "little"))) != crc:
        return offset, "checksum mismatch"
    return start + n, ""


@dataclass(frozen=True, slots=True)
class Scan:
    """The intact records at the front of a buffer, and where and why they stop."""

    records: list[tuple[int, memoryview]]  # (offset of the frame, payload)
    end: int  # offset just past the last intact record
    problem: str  # why the frame at `end` is not intact; "" if `end` is the end of the buffer


def scan(buf: bytes) -> Scan:
    """Read frames from the start of `buf` until the end or the first damaged frame."""
    view = memoryview(buf)
    records: list[tuple[int, memoryview]] = []
    offset = 0
    while offset < len(buf):
        nxt, problem = check_frame(buf, offset)
        if problem:
            return Scan(records, offset, problem)
        records.append((offset, view[offset + HEAD_SIZE : nxt]))
        offset = nxt
    return Scan(records, offset, "")


def next_intact_frame(buf: bytes, start: int) -> int | None:
    """The offset of the first intact frame at or after `start`, if any."""
    i = buf.find(MAGIC, start)
    while i != -1:
        if not check_frame(buf, i)[1]:
            return i
        i = buf.find(MAGIC, i + 1)
    return None
