"""Capability RPC: framed msgpack over trio streams.

A `Capability` exported on a `Connection` arrives at the peer as a `Ref`; calls run
concurrently, streams have credit-based backpressure, and references are released when
dropped or when their connection closes. See docs/rpc.md.
"""

from ww.rpc.capability import Capability
from ww.rpc.connection import DEFAULT_WINDOW, Connection, Ref, RefStream, serve_connection
from ww.rpc.errors import CapabilityError, ConnectionLost, ProtocolError, RemoteError
from ww.rpc.wire import MAX_FRAME

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_FRAME",
    "Capability",
    "CapabilityError",
    "Connection",
    "ConnectionLost",
    "ProtocolError",
    "Ref",
    "RefStream",
    "RemoteError",
    "serve_connection",
]
