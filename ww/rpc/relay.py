"""Passing calls, streams and sinks through a middle connection.

A `Ref` of one connection sent over another is exported there as a `_Forwarder`. Calls,
streams and sinks on it go straight on to the `Ref`'s connection without a task of their own:
a `_Relay`, `_StreamRelay` or `_SinkRelay` stands in for the question on both connections and
hands answers, items, credit and the end across.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ww.rpc.capability import Capability
from ww.rpc.errors import ProtocolError
from ww.rpc.flow import _END
from ww.rpc.limits import HIGH_WATER
from ww.rpc.wire import ITEMS, PUSH, Ack, Cancel, Credit, Done, End

if TYPE_CHECKING:
    from ww.rpc.connection import Connection
    from ww.rpc.ref import Ref


class _Forwarder(Capability):
    """Re-exports a `Ref` of another connection: relays calls, streams and the release."""

    def __init__(self, ref: Ref, key: tuple[int, int]) -> None:
        self.ref = ref
        self.key = key

    async def _relay(
        self, method: str, args: list[Any], kwargs: dict[str, Any] | None = None
    ) -> Any:
        return await self.ref.call(method, *args, **(kwargs or {}))

    async def _relay_stream(self, method: str, args: list[Any], window: int) -> AsyncIterator[Any]:
        async with self.ref.stream(method, *args, window=window) as items:
            async for item in items:
                yield item


class _Relay:
    """One incoming call on a forwarded capability, passed on without a task of its own.

    The call goes out on the forwarded reference's connection as question `out_qid`; its
    answer, delivered by that connection's reader, is sent back as the answer to `qid`.
    """

    __slots__ = ("conn", "out_qid", "qid", "target")

    def __init__(self, conn: Connection, qid: int, target: Connection, out_qid: int) -> None:
        self.conn = conn
        self.qid = qid
        self.target = target
        self.out_qid = out_qid

    def answered(self, value: Any) -> None:
        """The forwarded call returned `value`."""
        conn = self.conn
        if conn._answers.get(self.qid) is not self:
            return  # cancelled meanwhile
        if conn._outbox_bytes > HIGH_WATER and not conn._closing:
            # Wait for the writer as any other answer does, in a task of its own.
            conn._nursery.start_soon(conn._reply_later, self, value)  # type: ignore[union-attr]
            return
        del conn._answers[self.qid]
        conn._reply_nowait(self.qid, value)

    def failed(self, exc: Exception) -> None:
        """The forwarded call raised (or its connection was lost)."""
        conn = self.conn
        if conn._answers.get(self.qid) is self:
            del conn._answers[self.qid]
            conn._reply_exception(self.qid, exc)

    def cancel(self) -> None:
        """The asker lost interest (or its connection closed): cancel the forwarded call."""
        self.conn._answers.pop(self.qid, None)
        target = self.target
        if target._questions.pop(self.out_qid, None) is not None and not target._closing:
            target._send_nowait(target._encode(Cancel(self.out_qid)))


class _StreamRelay:
    """One incoming stream on a forwarded capability, passed through without a task.

    The stream is opened on the forwarded reference's connection as question `out_qid` with
    the same credit; the consumer's credit grants go on to the producer, and items, the end
    or the failure come back as they arrive (so at most the consumer's window is in flight).
    It stands in for an `_Inbound` there and for an `_Outbound` here.
    """

    __slots__ = ("conn", "credit", "out_qid", "qid", "target")

    def __init__(
        self, conn: Connection, qid: int, target: Connection, out_qid: int, credit: int
    ) -> None:
        self.conn = conn
        self.qid = qid
        self.target = target
        self.out_qid = out_qid
        self.credit = credit  # items the producer may still send

    def push_items(self, values: list[Any]) -> None:
        """Items of the forwarded stream arrived: pass them on as they came."""
        conn = self.conn
        if conn._answers.get(self.qid) is not self or conn._closing:
            return
        try:
            frame = conn._encode_fields([ITEMS, self.qid, values])
        except Exception as exc:
            self.cancel()
            conn._reply_exception(self.qid, exc)
            return
        conn._send_nowait(frame)

    def push(self, kind: int, value: Any) -> None:
        """The end or the failure of the forwarded stream arrived."""
        conn = self.conn
        if conn._answers.get(self.qid) is not self:
            return
        del conn._answers[self.qid]
        if kind == _END:
            conn._send_control(End(self.qid))
        else:
            conn._reply_exception(self.qid, value)

    def grant(self, n: int) -> None:
        """The consumer took `n` more items: let the producer send `n` more."""
        self.credit += n
        self.target._send_control(Credit(self.out_qid, n))

    def cancel(self) -> None:
        """The consumer left (or its connection closed): cancel the forwarded stream."""
        self.conn._answers.pop(self.qid, None)
        target = self.target
        if target._inbound.pop(self.out_qid, None) is not None:
            target._send_control(Cancel(self.out_qid))


class _SinkRelay(_Relay):
    """One incoming sink on a forwarded capability, passed through without a task.

    The sink is opened on the forwarded reference's connection as question `out_qid` with
    the same credit; pushed items and the end go on as they arrive, grants and the answer
    come back (the answer as a relayed call's does). It stands in for an `_Outsink` there and
    for a `_SinkInbox` here."""

    __slots__ = ("credit",)

    def __init__(
        self, conn: Connection, qid: int, target: Connection, out_qid: int, credit: int
    ) -> None:
        super().__init__(conn, qid, target, out_qid)
        self.credit = credit  # items the asker may still push

    def pushed(self, values: list[Any]) -> None:
        self.credit -= len(values)
        if self.credit < 0:
            raise ProtocolError(f"sink {self.qid} was pushed more items than its credit")
        target = self.target
        if target._closing:
            return
        try:
            frame = target._encode_fields([PUSH, self.out_qid, values])
        except Exception as exc:
            self.cancel()
            self.conn._reply_exception(self.qid, exc)
            return
        target._send_nowait(frame)

    def finish(self) -> None:
        self.target._send_control(Done(self.out_qid))

    def grant(self, n: int) -> None:
        self.credit += n
        self.conn._send_control(Ack(self.qid, n))


def _relay_ready(ref: Ref) -> bool:
    """Whether a call or stream on a forwarded capability can be passed straight on through
    `ref`: it is usable and its connection's writer is not behind."""
    target = ref._conn
    return not (
        target._closing or ref._released or target._collected or target._outbox_bytes > HIGH_WATER
    )
