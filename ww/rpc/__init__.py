"""Capability RPC: framed msgpack over trio streams.

A `Capability` exported on a `Connection` arrives at the peer as a `Ref`; calls run
concurrently, streams and sinks have credit-based backpressure, and references are released
when dropped or when their connection closes. See docs/rpc.md.
"""

from ww.rpc.capability import Capability, sink
from ww.rpc.connection import Connection, serve_connection
from ww.rpc.errors import CapabilityError, ConnectionLost, ProtocolError, RemoteError
from ww.rpc.flow import RefSink, RefStream
from ww.rpc.limits import DEFAULT_SINK_WINDOW, DEFAULT_WINDOW
from ww.rpc.ref import Ref
from ww.rpc.wire import MAX_FRAME, ReceiveBudget

__all__ = [
    "DEFAULT_SINK_WINDOW",
    "DEFAULT_WINDOW",
    "MAX_FRAME",
    "Capability",
    "CapabilityError",
    "Connection",
    "ConnectionLost",
    "ProtocolError",
    "ReceiveBudget",
    "Ref",
    "RefSink",
    "RefStream",
    "RemoteError",
    "serve_connection",
    "sink",
]
