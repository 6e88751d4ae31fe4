"""The wire format: frame splitting and message decoding, including hostile input."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.rpc import ProtocolError
from ww.rpc.wire import (
    Call,
    Credit,
    Error,
    FrameDecoder,
    Release,
    Return,
    StreamStart,
    decode_message,
    encode_frame,
    message_fields,
    pack_cap_id,
    plain_ext_hook,
    unpack_cap_id,
)


def test_frames_split_across_reads_and_batched_in_one() -> None:
    bodies = [b"", b"a", b"hello" * 100]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    got: list[bytes | bytearray] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == bodies
    assert FrameDecoder().feed(stream) == bodies


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(encode_frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(ProtocolError, match="frame of 101 bytes exceeds the limit of 100"):
        decoder.feed((101).to_bytes(4, "big"))


@pytest.mark.parametrize(
    "msg",
    [
        Call(1, 0, "m", [1, "two", b"3", None, [4.5], {"k": True}]),
        Call(1, 0, "m", [1], {"volume": True, "restart": "always"}),
        Return(2, {"x": [1, 2]}),
        Error(3, "ValueError", "bad"),
        Release(4, 2),
        StreamStart(5, 9, "subscribe", [], 16),
        Credit(5, 8),
    ],
)
def test_messages_round_trip(msg: object) -> None:
    body = msgpack.packb(message_fields(msg))  # type: ignore[arg-type]
    assert decode_message(body, plain_ext_hook) == msg


def test_capability_ids_travel_as_extension_types() -> None:
    for cap_id in (0, 1, 255, 256, 2**63 - 1):
        assert unpack_cap_id(pack_cap_id(cap_id)) == cap_id
    body = msgpack.packb([1, 7, msgpack.ExtType(1, pack_cap_id(300))])
    assert decode_message(body, plain_ext_hook) == Return(7, (1, 300))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xc1", "undecodable"),
        (msgpack.packb({"a": 1}), "not a non-empty array"),
        (msgpack.packb([]), "not a non-empty array"),
        (msgpack.packb([99, 1]), "unknown message tag 99"),
        (msgpack.packb(["call"]), "unknown message tag"),
        (msgpack.packb([True, 1, None]), "unknown message tag True"),
        (msgpack.packb([1.0, 1, None]), "unknown message tag 1.0"),
        (msgpack.packb([1, 1.0, None]), "bad id"),
        (msgpack.packb([5, -3, None]), "bad id"),
        (msgpack.packb([0, 1, 0, "m"]), "has 3 fields, expected 4"),
        (msgpack.packb([0, -1, 0, "m", []]), "bad id"),
        (msgpack.packb([0, True, 0, "m", []]), "bad id"),
        (msgpack.packb([0, 1, 0, b"m", []]), "bad string"),
        (msgpack.packb([0, 1, 0, "m", {}]), "bad arguments"),
        (msgpack.packb([0, 1, 0, "m", [], {}]), "bad keyword arguments"),
        (msgpack.packb([0, 1, 0, "m", [], {1: 2}]), "bad keyword arguments"),
        (msgpack.packb([0, 1, 0, "m", [], [1]]), "bad keyword arguments"),
        (msgpack.packb([0, 1, 0, 5, [], {"k": 1}]), "bad string"),
        (msgpack.packb([3, 1, 0]), "bad count"),
        (msgpack.packb([1, 1, msgpack.ExtType(9, b"x")]), "unknown extension type 9"),
        (msgpack.packb([1, 1, msgpack.ExtType(1, b"")]), "capability id of 0 bytes"),
        (msgpack.packb([1, 1]) + b"\x00", "undecodable"),
    ],
)
def test_malformed_messages_raise_protocol_error(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_message(body, plain_ext_hook)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decoder_raises_only_protocol_error(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=64)
    try:
        bodies = decoder.feed(data)
    except ProtocolError:
        return
    for body in bodies:
        with contextlib.suppress(ProtocolError):
            decode_message(body, plain_ext_hook)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 12), _values), max_size=7))
def test_fuzz_wellformed_msgpack_raises_only_protocol_error(fields: list[object]) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message(msgpack.packb(fields), plain_ext_hook)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=8), st.lists(st.integers(1, 40), min_size=1))
def test_fuzz_frames_survive_any_split(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    got: list[bytes | bytearray] = []
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += decoder.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert got == bodies
    assert decoder.buffered == 0
