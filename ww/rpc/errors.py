"""Exceptions of the capability RPC."""

from __future__ import annotations


class CapabilityError(Exception):
    """An expected, user-facing error.

    Raise it in server code; its message reaches the caller as is (as a `RemoteError` whose
    `.type` is ``"CapabilityError"``). The client side also raises it for local misuse, e.g.
    calling a capability that was already released.
    """


class RemoteError(Exception):
    """A remote method raised. `.type` is the exception class name, `.message` its text."""

    def __init__(self, type: str, message: str) -> None:
        self.type = type
        self.message = message
        super().__init__(f"{type}: {message}".replace("\n", " ") if message else type)


class ConnectionLost(Exception):
    """The connection closed while a call was outstanding (or before it was made)."""


class ProtocolError(Exception):
    """The peer sent bytes that are not a well-formed frame or message."""
