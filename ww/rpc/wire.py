"""The wire format, sans I/O: frames, messages and capability references.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack: one message,
an array whose first element is its tag. Capabilities inside values travel as msgpack
extension types whose data is the big-endian capability id:

* ``ExtType(1, id)`` -- a capability the *sender* exports under ``id``;
* ``ExtType(2, id)`` -- a capability the *receiver* exported under ``id`` (its own cap, back).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from ww.rpc.errors import ProtocolError

MAX_FRAME = 16 * 1024 * 1024
"""Default limit on one frame's body, in bytes."""

EXT_SENDER_CAP = 1
EXT_RECEIVER_CAP = 2

_LEN = struct.Struct(">I")
_MAX_ID = 2**63 - 1


def encode_frame(body: bytes) -> bytes:
    """Prefix `body` with its length."""
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies. Feed it bytes, get complete bodies back."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray) -> list[bytes | bytearray]:
        """Add received bytes; return the bodies of all frames now complete.

        Raises ProtocolError when a frame announces a body larger than `max_frame`.
        """
        buf = self._buf
        if buf:
            buf += data
            data = buf
        frames: list[bytes | bytearray] = []
        pos = 0
        size = len(data)
        limit = self.max_frame
        while size - pos >= 4:
            (length,) = _LEN.unpack_from(data, pos)
            if length > limit:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit} bytes")
            end = pos + 4 + length
            if end > size:
                break
            frames.append(data[pos + 4 : end])
            pos = end
        if data is buf:
            del buf[:pos]
        else:
            buf += data[pos:]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)


def pack_cap_id(cap_id: int) -> bytes:
    return cap_id.to_bytes((cap_id.bit_length() + 7) // 8 or 1, "big")


def unpack_cap_id(data: bytes) -> int:
    if not 1 <= len(data) <= 8:
        raise ProtocolError(f"capability id of {len(data)} bytes")
    return int.from_bytes(data, "big")


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """Ask capability `cap` (the receiver's export id) to run `method(*args, **kwargs)`.

    On the wire `kwargs` is a sixth field, present only when there are keyword arguments."""

    qid: int
    cap: int
    method: str
    args: list[Any]
    kwargs: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Return:
    """The answer to question `qid`."""

    qid: int
    value: Any


@dataclass(frozen=True, slots=True)
class Error:
    """Question `qid` failed: the remote raised `type` with `message`."""

    qid: int
    type: str
    message: str


@dataclass(frozen=True, slots=True)
class Release:
    """The sender dropped `count` references to the receiver's export `cap`."""

    cap: int
    count: int


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Run the generator `method(*args)` of `cap`, sending at most `credit` items for now."""

    qid: int
    cap: int
    method: str
    args: list[Any]
    credit: int


@dataclass(frozen=True, slots=True)
class Items:
    """The next items of stream `qid`, in order (one or more: items produced while the
    writer was busy travel together)."""

    qid: int
    values: list[Any]


@dataclass(frozen=True, slots=True)
class End:
    """Stream `qid` finished."""

    qid: int


@dataclass(frozen=True, slots=True)
class Credit:
    """The consumer of stream `qid` took `n` more items: the producer may send `n` more."""

    qid: int
    n: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """The asker of `qid` lost interest: stop the call, stream or sink."""

    qid: int


@dataclass(frozen=True, slots=True)
class SinkStart:
    """Run the sink method `method(items, *args)` of `cap`; the asker may push `credit`
    items for now. Its result comes back as a Return (or Error) for `qid`."""

    qid: int
    cap: int
    method: str
    args: list[Any]
    credit: int


@dataclass(frozen=True, slots=True)
class Push:
    """The next items the asker pushes into sink `qid`, in order (one or more)."""

    qid: int
    values: list[Any]


@dataclass(frozen=True, slots=True)
class Ack:
    """The sink `qid` took `n` more items: the asker may push `n` more."""

    qid: int
    n: int


@dataclass(frozen=True, slots=True)
class Done:
    """The asker of sink `qid` pushes no more items."""

    qid: int


Message = (
    Call
    | Return
    | Error
    | Release
    | StreamStart
    | Items
    | End
    | Credit
    | Cancel
    | SinkStart
    | Push
    | Ack
    | Done
)

CALL, RETURN, ERROR, RELEASE, STREAM, ITEMS, END, CREDIT, CANCEL, SINK, PUSH, ACK, DONE = range(13)

_ID = "id"
_STR = "str"
_LIST = "list"
_ANY = "any"
_COUNT = "count"

# tag -> (message class, field kinds)
_SPECS: dict[int, tuple[Callable[..., Message], tuple[str, ...]]] = {
    CALL: (Call, (_ID, _ID, _STR, _LIST)),
    RETURN: (Return, (_ID, _ANY)),
    ERROR: (Error, (_ID, _STR, _STR)),
    RELEASE: (Release, (_ID, _COUNT)),
    STREAM: (StreamStart, (_ID, _ID, _STR, _LIST, _COUNT)),
    ITEMS: (Items, (_ID, _LIST)),
    END: (End, (_ID,)),
    CREDIT: (Credit, (_ID, _COUNT)),
    CANCEL: (Cancel, (_ID,)),
    SINK: (SinkStart, (_ID, _ID, _STR, _LIST, _COUNT)),
    PUSH: (Push, (_ID, _LIST)),
    ACK: (Ack, (_ID, _COUNT)),
    DONE: (Done, (_ID,)),
}


_FIELDS: dict[type, Callable[[Any], list[Any]]] = {
    Call: lambda m: [CALL, m.qid, m.cap, m.method, m.args, *([m.kwargs] if m.kwargs else [])],
    Return: lambda m: [RETURN, m.qid, m.value],
    Error: lambda m: [ERROR, m.qid, m.type, m.message],
    Release: lambda m: [RELEASE, m.cap, m.count],
    StreamStart: lambda m: [STREAM, m.qid, m.cap, m.method, m.args, m.credit],
    Items: lambda m: [ITEMS, m.qid, m.values],
    End: lambda m: [END, m.qid],
    Credit: lambda m: [CREDIT, m.qid, m.n],
    Cancel: lambda m: [CANCEL, m.qid],
    SinkStart: lambda m: [SINK, m.qid, m.cap, m.method, m.args, m.credit],
    Push: lambda m: [PUSH, m.qid, m.values],
    Ack: lambda m: [ACK, m.qid, m.n],
    Done: lambda m: [DONE, m.qid],
}


def message_fields(msg: Message) -> list[Any]:
    """The array that goes on the wire for `msg` (its tag, then its fields in order)."""
    return _FIELDS[type(msg)](msg)


def decode_message(body: bytes | bytearray, ext_hook: Callable[[int, bytes], Any]) -> Message:
    """Decode one frame body into a message; raises ProtocolError and nothing else.

    `ext_hook(code, data)` turns capability references into objects; it may raise
    ProtocolError for an id it does not know.
    """
    try:
        raw = msgpack.unpackb(
            body, ext_hook=ext_hook, raw=False, strict_map_key=False, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable message ({type(exc).__name__}: {exc})") from None
    if type(raw) is not list or not raw:
        raise ProtocolError("message is not a non-empty array")
    tag = raw[0]
    if type(tag) is not int:
        raise ProtocolError(f"unknown message tag {_short(tag)}")
    # Fast paths for the frequent messages; anything unusual takes the checks below.
    size = len(raw)
    if tag == RETURN:
        if size == 3 and type(qid := raw[1]) is int and 0 <= qid <= _MAX_ID:
            return Return(qid, raw[2])
    elif tag in (ITEMS, PUSH):
        if size == 3 and type(qid := raw[1]) is int and 0 <= qid <= _MAX_ID:
            values = raw[2]
            if type(values) is list and values:
                return Items(qid, values) if tag == ITEMS else Push(qid, values)
            raise ProtocolError("items must be a non-empty array")
    elif tag == CALL and size == 5:
        _, qid, cap, method, args = raw
        if (
            type(qid) is int
            and type(cap) is int
            and type(method) is str
            and type(args) is list
            and 0 <= qid <= _MAX_ID
            and 0 <= cap <= _MAX_ID
        ):
            return Call(qid, cap, method, args)
    elif tag == CALL and size == 6:
        kwargs = raw[5]
        if type(kwargs) is not dict or not kwargs or not all(type(k) is str for k in kwargs):
            raise ProtocolError(f"bad keyword arguments {_short(kwargs)} in Call")
        call = decode_message_fields([CALL, *raw[1:5]])
        assert isinstance(call, Call)
        return Call(call.qid, call.cap, call.method, call.args, kwargs)
    return decode_message_fields(raw)


def decode_message_fields(raw: list[Any]) -> Message:
    """A message from its wire array, every field checked."""
    tag = raw[0]
    spec = _SPECS.get(tag)
    if spec is None:
        raise ProtocolError(f"unknown message tag {_short(tag)}")
    cls, kinds = spec
    if len(raw) != len(kinds) + 1:
        raise ProtocolError(
            f"message {cls.__name__} has {len(raw) - 1} fields, expected {len(kinds)}"
        )
    for kind, value in zip(kinds, raw[1:], strict=True):
        if kind is _ANY:
            continue
        if kind is _ID or kind is _COUNT:
            low = 0 if kind is _ID else 1
            if type(value) is not int or not low <= value <= _MAX_ID:
                raise ProtocolError(f"bad {kind} {_short(value)} in {cls.__name__}")
        elif kind is _STR:
            if type(value) is not str:
                raise ProtocolError(f"bad string {_short(value)} in {cls.__name__}")
        elif type(value) is not list:
            raise ProtocolError(f"bad arguments {_short(value)} in {cls.__name__}")
    return cls(*raw[1:])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def plain_ext_hook(code: int, data: bytes) -> tuple[int, int]:
    """An ext hook that decodes capability references to ``(code, id)`` (no tables needed)."""
    if code not in (EXT_SENDER_CAP, EXT_RECEIVER_CAP):
        raise ProtocolError(f"unknown extension type {code}")
    return (code, unpack_cap_id(data))
