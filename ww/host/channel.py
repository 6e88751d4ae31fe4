"""Channels: send/recv/close between processes and hosts, buffered or unbuffered.

A channel lives on the host that made it; others reach it through capability references.
With capacity 0 a send completes only when a receiver takes the value, so a sender on another
host is held back until the receiver is ready. Closing ends the channel for senders at once;
receivers still get what is buffered, then `ChannelClosed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio

MAX_CAPACITY = 65536
STREAM_BURST = 64
"""Values `Channel.stream` may take from the buffer between two checkpoints."""


class ChannelClosed(Exception):
    """The channel was closed (one line)."""


def check_capacity(capacity: object) -> int:
    """A channel capacity: an integer from 0 (unbuffered) to MAX_CAPACITY."""
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise ValueError(f"channel capacity must be an integer, not {type(capacity).__name__}")
    if not 0 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"channel capacity must be from 0 to {MAX_CAPACITY}, not {capacity}")
    return capacity


class Channel:
    """A trio memory channel with close semantics that suit remote callers."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = check_capacity(capacity)
        self._send, self._receive = trio.open_memory_channel[Any](capacity)
        self.closed = False

    def send_nowait(self, value: Any) -> bool:
        """Send `value` if that needs no wait (room in the buffer, or a receiver waiting);
        False when `send` would have to wait."""
        try:
            self._send.send_nowait(value)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ChannelClosed("channel is closed") from None
        return True

    async def send(self, value: Any) -> None:
        """Send `value`; waits while the channel is full (always, until received, if unbuffered)."""
        try:
            await self._send.send(value)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ChannelClosed("channel is closed") from None

    async def recv(self) -> Any:
        """Receive the next value; raises ChannelClosed once closed and drained."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ChannelClosed("channel is closed") from None

    async def stream(self) -> AsyncIterator[Any]:
        """Every value until the channel is closed and drained.

        Buffered values are taken without a trip through the scheduler each; it still
        checkpoints at least every STREAM_BURST values."""
        receive = self._receive
        burst = 0
        while True:
            try:
                if burst < STREAM_BURST:
                    try:
                        value = receive.receive_nowait()
                        burst += 1
                    except trio.WouldBlock:
                        value = await receive.receive()
                        burst = 0
                else:
                    value = await receive.receive()
                    burst = 0
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            yield value

    def close(self) -> None:
        """Close for senders (blocked senders fail); receivers drain what is buffered."""
        self.closed = True
        self._send.close()

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._send.statistics()
