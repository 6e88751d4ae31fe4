"""Message and ConfChange encoding: every value round-trips, and any malformed input raises
MessageDecodeError and nothing else."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.raft.types import (
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageDecodeError,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

uint = st.integers(0, 2**64 - 1)
ids = st.lists(uint, max_size=4).map(tuple)

entries = st.builds(
    Entry, term=uint, index=uint, type=st.sampled_from(EntryType), data=st.binary(max_size=32)
)
conf_states = st.builds(
    ConfState,
    voters=ids,
    learners=ids,
    voters_outgoing=ids,
    learners_next=ids,
    auto_leave=st.booleans(),
)
snapshots = st.builds(
    Snapshot,
    data=st.binary(max_size=64),
    metadata=st.builds(SnapshotMetadata, index=uint, term=uint, conf_state=conf_states),
)
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=uint,
    frm=uint,
    term=uint,
    log_term=uint,
    index=uint,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=uint,
    snapshot=st.none() | snapshots,
    reject=st.booleans(),
    reject_hint=uint,
    context=st.binary(max_size=16),
)
conf_changes = st.builds(
    ConfChange,
    changes=st.lists(
        st.builds(ConfChangeSingle, type=st.sampled_from(ConfChangeType), node_id=uint),
        max_size=4,
    ).map(tuple),
    transition=st.sampled_from(["auto", "implicit", "explicit"]),
    context=st.binary(max_size=16),
)


@settings(max_examples=100)
@given(messages)
def test_a_message_round_trips_through_bytes(m):
    assert Message.decode(m.encode()) == m


@settings(max_examples=100)
@given(conf_changes)
def test_a_conf_change_round_trips_through_bytes(cc):
    assert ConfChange.decode(cc.encode()) == cc


def decodes_or_refuses(data: bytes) -> None:
    try:
        m = Message.decode(data)
    except MessageDecodeError:
        return
    assert isinstance(m, Message)
    assert Message.decode(m.encode()) == m


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_message_decode_error(data):
    decodes_or_refuses(data)


@settings(max_examples=100)
@given(messages, st.data())
def test_a_corrupted_encoding_decodes_or_raises_message_decode_error(m, data):
    raw = bytearray(m.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    decodes_or_refuses(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=13) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=100)
@given(msgpack_values)
def test_well_formed_msgpack_of_the_wrong_shape_raises_message_decode_error(value):
    decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=100)
@given(messages, st.integers(0, 11), msgpack_values)
def test_a_message_with_one_field_of_the_wrong_type_raises_message_decode_error(m, i, value):
    wire = msgpack.unpackb(m.encode())
    wire[i] = value
    decodes_or_refuses(msgpack.packb(wire, use_bin_type=True))


@settings(max_examples=100)
@given(st.binary(max_size=64) | msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_garbage_conf_changes_raise_message_decode_error(data):
    try:
        cc = ConfChange.decode(data)
    except MessageDecodeError:
        return
    assert ConfChange.decode(cc.encode()) == cc


def test_an_unknown_message_type_is_refused():
    wire = msgpack.unpackb(Message(type=MessageType.APP).encode())
    wire[0] = 99
    try:
        Message.decode(msgpack.packb(wire))
    except MessageDecodeError as e:
        assert "99" in str(e)
    else:
        raise AssertionError("decoded an unknown message type")
