"""The trio shell of the RPC: a `Connection` over one stream, and `Ref`, a remote capability.

One connection runs a reader that turns frames into messages and dispatches them, and a writer
that sends whatever frames queued up while it was busy in one ``send_all``. Each incoming call
runs in a task of the connection's nursery (a parked worker when one is free), each incoming
stream in a task of its own; the sans-I/O parts live in `wire` and `tables`.
"""

from __future__ import annotations

import functools
import logging
import struct
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import msgpack
import outcome
import trio

from ww.rpc.capability import NOT_NOW, Capability, Kind, method_table
from ww.rpc.errors import CapabilityError, ConnectionLost, ProtocolError, RemoteError
from ww.rpc.tables import BOOTSTRAP_ID, Exports, Holders, Imports
from ww.rpc.wire import (
    CALL,
    EXT_RECEIVER_CAP,
    EXT_SENDER_CAP,
    ITEMS,
    MAX_FRAME,
    PUSH,
    RETURN,
    Ack,
    Call,
    Cancel,
    Credit,
    Done,
    End,
    Error,
    FrameDecoder,
    Items,
    Message,
    Push,
    Release,
    Return,
    SinkStart,
    StreamStart,
    decode_message,
    message_fields,
    pack_cap_id,
    unpack_cap_id,
)

log = logging.getLogger("ww.rpc")

DEFAULT_WINDOW = 16
"""Stream items a producer may send ahead of its consumer."""

DEFAULT_SINK_WINDOW = 256
"""Items a sink's caller may push ahead of the sink method."""

MAX_SINK_WINDOW = 4096
"""The largest window a peer may open a sink with (the items it may make us hold)."""

BATCH_BYTES = 64 * 1024
"""Items of one stream or sink queued together go out as one frame up to this size."""

RECEIVE_SIZE = 64 * 1024
HIGH_WATER = 4 * 1024 * 1024
"""Queued outgoing bytes above which senders wait for the writer."""

MAX_IDLE_WORKERS = 128
"""Tasks kept waiting per connection to run the next incoming call."""

MAX_ANSWERS = 10_000
"""Incoming calls and streams that may run at once on one connection; more get an error."""

MAX_ERROR_MESSAGE = 4096
"""Longer error messages are cut to this many characters."""

RELEASE_TIMEOUT = 5.0
"""Seconds `_on_release` callbacks get when a connection closes."""

_HOLDERS = Holders()
_LEN = struct.Struct(">I")
_packb = msgpack.packb
_ARRAY_HEADER = msgpack.Packer().pack_array_header
_BATCH_HEADS = {tag: b"\x93" + _packb(tag) for tag in (ITEMS, PUSH)}
"""The start of a three-element message array with this tag."""

Frame = bytes | tuple[bytes, bytes]
"""An encoded frame: small ones in one piece, large ones as (header, body)."""


class Ref:
    """A reference to a remote capability.

    ``await ref.call("m", *args)`` calls it (``await ref.m(*args)`` is the same);
    ``async with ref.stream("m", *args) as items`` iterates a remote generator with
    backpressure; ``async with ref.sink("m", *args) as tx`` pushes items into a remote sink
    method with ``await tx.send(item)``; ``await ref.release()`` (or leaving
    ``async with ref``, or dropping the last Python reference) tells the owner this handle
    is done.
    """

    __slots__ = ("__weakref__", "_conn", "_finalizer", "_id", "_released")

    def __init__(self, conn: Connection, cap_id: int, *, tracked: bool = True) -> None:
        self._conn = conn
        self._id = cap_id
        self._released = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if tracked:
            fin = weakref.finalize(self, conn._drop_collected, cap_id)
            fin.atexit = False
            self._finalizer = fin

    @property
    def connection(self) -> Connection:
        """The connection this reference travels over."""
        return self._conn

    @property
    def released(self) -> bool:
        return self._released

    async def call(self, method: str, *args: Any) -> Any:
        """Call `method` remotely; raises RemoteError when it raises, ConnectionLost."""
        return await self._conn._call(self, method, args)

    def stream(
        self, method: str, *args: Any, window: int = DEFAULT_WINDOW
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Iterate the remote async generator `method(*args)`.

        The producer runs at most `window` items ahead of the consumer; leaving the block
        cancels the remote generator.
        """
        return self._conn._stream(self, method, args, window)

    def sink(
        self, method: str, *args: Any, window: int = DEFAULT_SINK_WINDOW
    ) -> AbstractAsyncContextManager[RefSink]:
        """Push items into the remote sink method `method(items, *args)` (see `sink`).

        ``await tx.send(item)`` waits only while `window` items are pushed and not yet taken.
        Leaving the block normally tells the method the items ended and waits for its answer
        (``tx.result``; a RemoteError when it raised); leaving it by an exception cancels it.
        """
        return self._conn._sink(self, method, args, window)

    async def release(self) -> None:
        """Tell the owner this handle is done with the capability. Idempotent."""
        self._release_now()

    def _release_now(self) -> None:
        if self._released:
            return
        self._released = True
        fin = self._finalizer
        if fin is not None and fin.detach() is not None:
            self._conn._drop_import(self._id)

    async def __aenter__(self) -> Ref:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._release_now()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other._conn is self._conn and other._id == self._id

    def __hash__(self) -> int:
        return hash((id(self._conn), self._id))

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<Ref {self._id} on {self._conn.name}{state}>"


class _Forwarder(Capability):
    """Re-exports a `Ref` of another connection: relays calls, streams and the release."""

    def __init__(self, ref: Ref, key: tuple[int, int]) -> None:
        self.ref = ref
        self.key = key

    async def _relay(self, method: str, args: list[Any]) -> Any:
        return await self.ref.call(method, *args)

    async def _relay_stream(self, method: str, args: list[Any], window: int) -> AsyncIterator[Any]:
        async with self.ref.stream(method, *args, window=window) as items:
            async for item in items:
                yield item


class _Inbound:
    """Client side of one stream: received items and the credit owed to the producer."""

    __slots__ = ("consumed", "credit", "grant_every", "items", "waiter")

    def __init__(self, window: int) -> None:
        self.items: deque[tuple[int, Any]] = deque()
        self.waiter: trio.lowlevel.Task | None = None
        self.credit = window  # items the producer may still send
        self.consumed = 0  # items taken since the last grant
        self.grant_every = max(1, (window + 1) // 2)

    def push(self, kind: int, value: Any) -> None:
        self.items.append((kind, value))
        self._wake()

    def push_items(self, values: list[Any]) -> None:
        self.items.extend([(_ITEM, value) for value in values])
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            trio.lowlevel.reschedule(waiter)

    async def wait(self) -> None:
        """Until something was pushed (or checkpoint when something already is)."""
        if self.items:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        if self.waiter is not None:
            raise trio.BusyResourceError("another task is already iterating this stream")
        self.waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


_ITEM, _END, _FAIL = range(3)


class _Job:
    """One incoming call: its coroutine, and the scope of the worker running it."""

    __slots__ = ("cancelled", "coro", "qid", "scope")

    def __init__(self, qid: int, coro: Coroutine[Any, Any, Any]) -> None:
        self.qid = qid
        self.coro = coro
        self.scope: trio.CancelScope | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


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


class _Outbound:
    """Server side of one stream: its cancel scope and the credit the consumer granted."""

    __slots__ = ("credit", "lot", "scope")

    def __init__(self, credit: int) -> None:
        self.scope = trio.CancelScope()
        self.credit = credit
        self.lot = trio.lowlevel.ParkingLot()

    def cancel(self) -> None:
        self.scope.cancel()


class RefStream:
    """The items of a remote stream (an async iterator); grants credit as it is consumed."""

    __slots__ = ("_conn", "_qid", "_state")

    def __init__(self, conn: Connection, qid: int, state: _Inbound) -> None:
        self._conn = conn
        self._qid = qid
        self._state = state

    def __aiter__(self) -> RefStream:
        return self

    async def __anext__(self) -> Any:
        st = self._state
        await st.wait()
        kind, value = st.items[0]
        if kind == _ITEM:
            st.items.popleft()
            st.consumed += 1
            if st.consumed >= st.grant_every:
                st.credit += st.consumed
                self._conn._send_control(Credit(self._qid, st.consumed))
                st.consumed = 0
            return value
        # The end (or failure) stays queued, so further calls see it again.
        if kind == _END:
            raise StopAsyncIteration
        raise value


class _Batch:
    """Items of one stream or sink, packed one by one, that go out together as one frame."""

    __slots__ = ("parts", "qid", "size", "tag")

    def __init__(self, tag: int, qid: int, part: bytes) -> None:
        self.tag = tag
        self.qid = qid
        self.parts = [part]
        self.size = len(part)

    def frame(self) -> bytes:
        parts = self.parts
        head = _BATCH_HEADS[self.tag] + _packb(self.qid) + _ARRAY_HEADER(len(parts))
        body = b"".join([head, *parts])
        return _LEN.pack(len(body)) + body


class _SinkInbox:
    """Server side of one sink, and the async iterator its method reads: items pushed and not
    yet taken, and the credit owed back to the asker."""

    __slots__ = (
        "args",
        "busy",
        "conn",
        "credit",
        "done",
        "grant_every",
        "items",
        "job",
        "nowait",
        "obj",
        "qid",
        "taken",
        "waiter",
    )

    def __init__(
        self,
        conn: Connection,
        qid: int,
        credit: int,
        obj: object,
        nowait: Callable[..., Any] | None,
        args: list[Any],
    ) -> None:
        self.conn = conn
        self.qid = qid
        self.credit = credit  # items the asker may still push
        self.grant_every = max(1, (credit + 1) // 2)
        self.taken = 0  # items taken since the last grant
        self.items: deque[Any] = deque()
        self.done = False
        self.busy = False  # the method holds an item it has not finished with
        self.waiter: trio.lowlevel.Task | None = None
        self.obj = obj
        self.nowait = nowait
        self.args = args
        self.job: _Job | None = None

    def pushed(self, values: list[Any]) -> None:
        """Items arrived. While the method waits for its next one, the method's nowait twin
        may take them at once, in order, without waking it."""
        self.credit -= len(values)
        if self.credit < 0:
            raise ProtocolError(f"sink {self.qid} was pushed more items than its credit")
        start = 0
        nowait = self.nowait
        if nowait is not None and not self.busy and not self.items:
            for value in values:
                try:
                    took = nowait(self.obj, value, *self.args) is True
                except Exception:
                    took = False  # the method itself says what went wrong
                if not took:
                    break
                start += 1
            if start:
                self._took(start)
        if start < len(values):
            self.items.extend(values[start:] if start else values)
            self._wake()

    def finish(self) -> None:
        """The asker pushes no more."""
        self.done = True
        self._wake()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def discard(self) -> None:
        """The method ended: release capabilities in items it never took."""
        for value in self.items:
            _release_refs_in(value)
        self.items.clear()

    def _took(self, n: int) -> None:
        self.taken += n
        if self.taken >= self.grant_every:
            self.credit += self.taken
            self.conn._send_control(Ack(self.qid, self.taken))
            self.taken = 0

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            trio.lowlevel.reschedule(waiter)

    def __aiter__(self) -> _SinkInbox:
        return self

    async def __anext__(self) -> Any:
        self.busy = False
        if self.items:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            while not self.items:
                if self.done:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    raise StopAsyncIteration
                if self.waiter is not None:
                    raise trio.BusyResourceError("another task is already reading this sink")
                self.waiter = trio.lowlevel.current_task()

                def abort(_: Any) -> trio.lowlevel.Abort:
                    self.waiter = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
        self.busy = True
        value = self.items.popleft()
        self._took(1)
        return value


class _Outsink:
    """Client side of one sink: the credit to push, and its answer once it came."""

    __slots__ = ("credit", "lot", "outcome")

    def __init__(self, window: int) -> None:
        self.credit = window
        self.outcome: outcome.Outcome[Any] | None = None
        self.lot = trio.lowlevel.ParkingLot()  # senders waiting for credit or the answer

    def grant(self, n: int) -> None:
        self.credit += n
        self.lot.unpark_all()

    def answered(self, value: Any) -> None:
        self.outcome = outcome.Value(value)
        self.lot.unpark_all()

    def failed(self, exc: Exception) -> None:
        self.outcome = outcome.Error(exc)
        self.lot.unpark_all()


class RefSink:
    """Pushes items into a remote sink method; made by `Ref.sink`."""

    __slots__ = ("_conn", "_qid", "_state", "result")

    def __init__(self, conn: Connection, qid: int, state: _Outsink) -> None:
        self._conn = conn
        self._qid = qid
        self._state = state
        self.result: Any = None
        """What the sink method returned, once the `async with` block has ended."""

    async def send(self, value: Any) -> None:
        """Push `value`; waits only while the window is full.

        Raises what the method raised (RemoteError) once it has; CapabilityError when it
        returned before taking every item; ConnectionLost."""
        st = self._state
        conn = self._conn
        if st.credit > 0 and st.outcome is None:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            while st.credit <= 0 and st.outcome is None:
                await st.lot.park()
        if st.outcome is not None:
            if isinstance(st.outcome, outcome.Error):
                st.outcome.unwrap()
            raise CapabilityError("the sink returned and takes no more items")
        if conn._closing:
            raise ConnectionLost(f"connection {conn.name} is closed ({conn.close_reason})")
        part = conn._pack_value(value)
        st.credit -= 1
        conn._queue_part(PUSH, self._qid, part)
        if conn._outbox_bytes > HIGH_WATER:
            await conn._wait_drained()

    async def _finish(self) -> None:
        st = self._state
        conn = self._conn
        if st.outcome is None and not conn._closing:
            conn._send_nowait(conn._encode(Done(self._qid)))
        try:
            while st.outcome is None:
                await st.lot.park()
        except BaseException:
            if conn._questions.pop(self._qid, None) is not None and not conn._closing:
                conn._send_nowait(conn._encode(Cancel(self._qid)))
            raise
        self.result = st.outcome.unwrap()


class _SinkRelay:
    """One incoming sink on a forwarded capability, passed through without a task.

    The sink is opened on the forwarded reference's connection as question `out_qid` with
    the same credit; pushed items and the end go on as they arrive, grants and the answer
    come back. It stands in for an `_Outsink` there and for a `_SinkInbox` here."""

    __slots__ = ("conn", "credit", "out_qid", "qid", "target")

    def __init__(
        self, conn: Connection, qid: int, target: Connection, out_qid: int, credit: int
    ) -> None:
        self.conn = conn
        self.qid = qid
        self.target = target
        self.out_qid = out_qid
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

    def answered(self, value: Any) -> None:
        conn = self.conn
        if conn._answers.get(self.qid) is self:
            del conn._answers[self.qid]
            conn._reply_nowait(self.qid, value)

    def failed(self, exc: Exception) -> None:
        conn = self.conn
        if conn._answers.get(self.qid) is self:
            del conn._answers[self.qid]
            conn._reply_exception(self.qid, exc)

    def cancel(self) -> None:
        self.conn._answers.pop(self.qid, None)
        target = self.target
        if target._questions.pop(self.out_qid, None) is not None:
            target._send_control(Cancel(self.out_qid))


class Connection:
    """One RPC connection over a trio stream. Make it with `Connection.open`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        bootstrap: Capability | None = None,
        *,
        max_frame: int = MAX_FRAME,
        max_answers: int = MAX_ANSWERS,
        name: str | None = None,
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.max_answers = max_answers
        self.name = name or f"conn-{id(self):x}"
        self.closed = trio.Event()
        self.close_reason: str | None = None
        self._closing = False
        self._nursery: trio.Nursery | None = None
        self._token = trio.lowlevel.current_trio_token()
        self._frames = FrameDecoder(max_frame)
        self._packer = msgpack.Packer(default=self._encode_special, use_bin_type=True)
        self._exports = Exports()
        self._imports = Imports()
        self._forwarders: dict[tuple[int, int], _Forwarder] = {}
        if bootstrap is not None:
            self._exports.set_bootstrap(bootstrap)
            _HOLDERS.acquire(bootstrap)
        # questions we asked: qid -> waiting task (calls), _Outsink (sinks) or a relay;
        # streams have their own table, as their answers are items
        self._next_qid = 1
        self._questions: dict[int, trio.lowlevel.Task | _Relay | _Outsink | _SinkRelay] = {}
        self._inbound: dict[int, _Inbound | _StreamRelay] = {}
        # questions the peer asked: qid -> _Job (calls), _Outbound (streams), _SinkInbox
        # (sinks) or a relay
        self._answers: dict[
            int, _Job | _Outbound | _SinkInbox | _Relay | _StreamRelay | _SinkRelay
        ] = {}
        self._idle_workers: list[trio.lowlevel.Task] = []
        # exports added while encoding one message, to roll back if it fails
        self._encoding: list[int] = []
        # refs made while decoding one message, to release if nobody wants it
        self._decoded_refs: list[Ref] = []
        self._collected: list[int] = []
        # outgoing frames; the last may be a batch that items of its stream or sink join
        self._outbox: list[bytes | _Batch] = []
        self._open_batch: _Batch | None = None
        self._outbox_bytes = 0
        self._writer_waiting: trio.lowlevel.Task | None = None
        self._drained_lot = trio.lowlevel.ParkingLot()
        self._handlers: dict[type, Callable[[Any], None]] = {
            Call: self._on_call,
            Return: self._on_return,
            Error: self._on_error,
            Release: self._on_release_msg,
            StreamStart: self._on_stream,
            Items: self._on_items,
            End: self._on_end,
            Credit: self._on_credit,
            Cancel: self._on_cancel,
            SinkStart: self._on_sink,
            Push: self._on_push,
            Ack: self._on_ack,
            Done: self._on_done,
        }

    # --- public ----------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        stream: trio.abc.Stream,
        bootstrap: Capability | None = None,
        *,
        max_frame: int = MAX_FRAME,
        max_answers: int = MAX_ANSWERS,
        name: str | None = None,
    ) -> AsyncIterator[Connection]:
        """Run a connection over `stream` for the duration of the block.

        `bootstrap` is the capability the peer gets from its ``conn.bootstrap()``. Leaving the
        block closes the connection and releases everything exported on it.
        """
        conn = cls(stream, bootstrap, max_frame=max_frame, max_answers=max_answers, name=name)
        try:
            async with trio.open_nursery() as nursery:
                conn._nursery = nursery
                nursery.start_soon(conn._read_loop)
                nursery.start_soon(conn._write_loop)
                try:
                    yield conn
                finally:
                    await conn._shutdown("closed locally", logging.DEBUG)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The connection's own tasks never raise: what is here came from the block.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    def bootstrap(self) -> Ref:
        """A reference to the peer's bootstrap capability."""
        return Ref(self, BOOTSTRAP_ID, tracked=False)

    def export_count(self) -> int:
        """Live capabilities exported on this connection (not counting the bootstrap)."""
        return len(self._exports)

    def import_count(self) -> int:
        """Live capabilities of the peer held through this connection (not its bootstrap)."""
        return len(self._imports)

    async def aclose(self) -> None:
        """Close the connection now (the `open` block also does this when it ends)."""
        await self._shutdown("closed locally", logging.DEBUG)

    # --- asking ----------------------------------------------------------------------------

    def _check_usable(self, ref: Ref) -> None:
        if self._collected:
            self._flush_collected()
        if self._closing:
            raise ConnectionLost(f"connection {self.name} is closed ({self.close_reason})")
        if ref._released:
            raise CapabilityError("this capability reference was released")

    async def _call(self, ref: Ref, method: str, args: tuple[Any, ...]) -> Any:
        if self._closing or ref._released or self._collected:
            self._check_usable(ref)
        if self._outbox_bytes > HIGH_WATER:
            await self._wait_drained()
            self._check_usable(ref)
        qid = self._next_qid
        self._next_qid = qid + 1
        self._send_nowait(self._encode_fields([CALL, qid, ref._id, method, args]))
        task = trio.lowlevel.current_task()
        self._questions[qid] = task

        def abort(_: Any) -> trio.lowlevel.Abort:
            if self._questions.pop(qid, None) is not None and not self._closing:
                self._send_nowait(self._encode(Cancel(qid)))
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    @asynccontextmanager
    async def _stream(
        self, ref: Ref, method: str, args: tuple[Any, ...], window: int
    ) -> AsyncIterator[AsyncIterator[Any]]:
        self._check_usable(ref)
        if window < 1:
            raise ValueError("stream window must be at least 1")
        qid = self._next_qid
        self._next_qid = qid + 1
        state = _Inbound(window)
        self._send_nowait(self._encode(StreamStart(qid, ref._id, method, args, window)))  # type: ignore[arg-type]
        self._inbound[qid] = state
        try:
            yield RefStream(self, qid, state)
        finally:
            if self._inbound.pop(qid, None) is not None and not self._closing:
                self._send_nowait(self._encode(Cancel(qid)))
            # Release capabilities in items that arrived but were never consumed.
            for kind, value in state.items:
                if kind == _ITEM:
                    _release_refs_in(value)
            state.items.clear()

    @asynccontextmanager
    async def _sink(
        self, ref: Ref, method: str, args: tuple[Any, ...], window: int
    ) -> AsyncIterator[RefSink]:
        self._check_usable(ref)
        if not 1 <= window <= MAX_SINK_WINDOW:
            raise ValueError(f"sink window must be from 1 to {MAX_SINK_WINDOW}")
        qid = self._next_qid
        self._next_qid = qid + 1
        state = _Outsink(window)
        self._send_nowait(self._encode(SinkStart(qid, ref._id, method, args, window)))  # type: ignore[arg-type]
        self._questions[qid] = state
        sink = RefSink(self, qid, state)
        try:
            yield sink
        except BaseException:
            if self._questions.pop(qid, None) is not None and not self._closing:
                self._send_nowait(self._encode(Cancel(qid)))
            raise
        await sink._finish()

    # --- answering -------------------------------------------------------------------------

    def _lookup(self, qid: int, cap_id: int, method: str, kind: Kind) -> Any:
        """The function to run for an incoming call or stream (None after answering with
        an error), its target object and the function's nowait twin (see `method_table`)."""
        if len(self._answers) >= self.max_answers:
            self._reply_error(
                qid, "CapabilityError", f"too many concurrent calls (limit {self.max_answers})"
            )
            return None, None, None
        try:
            obj = self._exports.get(cap_id)
        except KeyError:
            if cap_id == BOOTSTRAP_ID:
                why = "this peer offers no bootstrap capability"
            else:
                why = f"unknown or released capability {cap_id}"
            self._reply_error(qid, "CapabilityError", why)
            return None, None, None
        if type(obj) is _Forwarder:
            return (obj._relay_stream if kind is Kind.STREAM else obj._relay), None, None
        entry = method_table(type(obj)).get(method)
        if entry is None or entry[1] is not kind:
            hint = f" ({method!r} is a {entry[1].value})" if entry is not None else ""
            self._reply_error(
                qid,
                "CapabilityError",
                f"{type(obj).__name__} has no {kind.value} {method!r}{hint}",
            )
            return None, None, None
        return entry[0], obj, entry[2]

    def _on_call(self, msg: Call) -> None:
        qid = msg.qid
        fn, obj, nowait = self._lookup(qid, msg.cap, msg.method, Kind.METHOD)
        if fn is None:
            return
        if obj is None:
            if self._relay_now(msg, fn.__self__):
                return
            coro = fn(msg.method, msg.args)
        else:
            if nowait is not None and self._outbox_bytes <= HIGH_WATER:
                if qid in self._answers:
                    raise ProtocolError(f"question id {qid} reused")
                try:
                    result = nowait(obj, *msg.args)
                except Exception:
                    result = NOT_NOW  # the method itself says what went wrong
                if result is not NOT_NOW:
                    self._reply_nowait(qid, result)
                    return
            try:
                coro = fn(obj, *msg.args)
            except TypeError as exc:
                self._reply_error(qid, "CapabilityError", f"bad arguments: {exc}")
                return
        if qid in self._answers:
            coro.close()
            raise ProtocolError(f"question id {qid} reused")
        job = _Job(qid, coro)
        self._answers[qid] = job
        idle = self._idle_workers
        if idle:
            trio.lowlevel.reschedule(idle.pop(), outcome.Value(job))
        else:
            self._nursery.start_soon(self._worker, job)  # type: ignore[union-attr]

    def _relay_now(self, msg: Call, forwarder: _Forwarder) -> bool:
        """Pass a call on a forwarded capability straight on; False when it needs a task
        (the forwarded reference is unusable, or its connection's writer is behind)."""
        ref = forwarder.ref
        target = ref._conn
        if not _relay_ready(ref):
            return False
        qid = msg.qid
        if qid in self._answers:
            raise ProtocolError(f"question id {qid} reused")
        out_qid = target._next_qid
        try:
            frame = target._encode_fields([CALL, out_qid, ref._id, msg.method, msg.args])
        except Exception as exc:
            self._reply_exception(qid, exc)
            return True
        target._next_qid = out_qid + 1
        target._send_nowait(frame)
        relay = _Relay(self, qid, target, out_qid)
        target._questions[out_qid] = relay
        self._answers[qid] = relay
        return True

    async def _reply_later(self, relay: _Relay, value: Any) -> None:
        try:
            await self._reply(Return(relay.qid, value))
        finally:
            if self._answers.get(relay.qid) is relay:
                del self._answers[relay.qid]

    async def _worker(self, job: _Job) -> None:
        """Run incoming calls: this one, then whichever the reader hands over next.

        Handing a call to a parked worker is cheaper than starting a task for it, and one
        cancel scope serves the worker's calls until one of them is cancelled. At most
        MAX_IDLE_WORKERS wait, so a burst of slow calls still gets a task each.
        """
        while True:
            with trio.CancelScope() as scope:
                while True:
                    job.scope = scope
                    if job.cancelled:
                        scope.cancel()
                    try:
                        await self._run_call(job)
                    finally:
                        job.scope = None
                    next_job = await self._next_job()
                    if next_job is None:
                        return
                    job = next_job
            # A call was cancelled, which spends the scope: go on with a fresh one.
            next_job = await self._next_job()
            if next_job is None:
                return
            job = next_job

    async def _next_job(self) -> _Job | None:
        """Park until the reader hands over a call; None when this worker should end."""
        idle = self._idle_workers
        if len(idle) >= MAX_IDLE_WORKERS or self._closing:
            return None
        task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        idle.append(task)
        job: _Job = await trio.lowlevel.wait_task_rescheduled(abort)
        return job

    async def _run_call(self, job: _Job) -> None:
        qid = job.qid
        try:
            try:
                result = await job.coro
            except Exception as exc:
                self._reply_exception(qid, exc)
                return
            await self._reply(Return(qid, result))
        finally:
            self._answers.pop(qid, None)

    def _on_stream(self, msg: StreamStart) -> None:
        qid = msg.qid
        fn, obj, _ = self._lookup(qid, msg.cap, msg.method, Kind.STREAM)
        if fn is None:
            return
        if obj is None:
            if self._relay_stream_now(msg, fn.__self__):
                return
            agen = fn(msg.method, msg.args, msg.credit)
        else:
            try:
                agen = fn(obj, *msg.args)
            except TypeError as exc:
                self._reply_error(qid, "CapabilityError", f"bad arguments: {exc}")
                return
        if qid in self._answers:
            raise ProtocolError(f"question id {qid} reused")
        out = _Outbound(msg.credit)
        self._answers[qid] = out
        self._nursery.start_soon(self._run_stream, qid, out, agen)  # type: ignore[union-attr]

    async def _run_stream(self, qid: int, out: _Outbound, agen: Any) -> None:
        try:
            with out.scope:
                try:
                    while True:
                        while out.credit <= 0:
                            await out.lot.park()
                        try:
                            item = await agen.__anext__()
                        except StopAsyncIteration:
                            await self._reply(End(qid))
                            break
                        out.credit -= 1
                        if not await self._send_item(qid, item):
                            break  # the item could not be sent; the consumer got the error
                except Exception as exc:
                    self._reply_exception(qid, exc)
                finally:
                    with trio.CancelScope(shield=True) as shield:
                        shield.deadline = trio.current_time() + RELEASE_TIMEOUT
                        try:
                            await agen.aclose()
                        except Exception:
                            log.exception("%s: closing stream %d raised", self.name, qid)
        finally:
            self._answers.pop(qid, None)

    def _relay_stream_now(self, msg: StreamStart, forwarder: _Forwarder) -> bool:
        """Pass a stream on a forwarded capability straight through; False when it needs a
        task (the forwarded reference is unusable, or its connection's writer is behind)."""
        ref = forwarder.ref
        target = ref._conn
        if not _relay_ready(ref):
            return False
        qid = msg.qid
        if qid in self._answers:
            raise ProtocolError(f"question id {qid} reused")
        out_qid = target._next_qid
        try:
            frame = target._encode(StreamStart(out_qid, ref._id, msg.method, msg.args, msg.credit))
        except Exception as exc:
            self._reply_exception(qid, exc)
            return True
        target._next_qid = out_qid + 1
        target._send_nowait(frame)
        relay = _StreamRelay(self, qid, target, out_qid, msg.credit)
        target._inbound[out_qid] = relay
        self._answers[qid] = relay
        return True

    def _on_sink(self, msg: SinkStart) -> None:
        qid = msg.qid
        if msg.credit > MAX_SINK_WINDOW:
            self._reply_error(
                qid, "CapabilityError", f"sink window above the limit of {MAX_SINK_WINDOW}"
            )
            return
        fn, obj, nowait = self._lookup(qid, msg.cap, msg.method, Kind.SINK)
        if fn is None:
            return
        if qid in self._answers:
            raise ProtocolError(f"question id {qid} reused")
        if obj is None:
            self._relay_sink(msg, fn.__self__)
            return
        inbox = _SinkInbox(self, qid, msg.credit, obj, nowait, msg.args)
        try:
            coro = fn(obj, inbox, *msg.args)
        except TypeError as exc:
            self._reply_error(qid, "CapabilityError", f"bad arguments: {exc}")
            return
        inbox.job = _Job(qid, coro)
        self._answers[qid] = inbox
        self._nursery.start_soon(self._run_sink, inbox)  # type: ignore[union-attr]

    async def _run_sink(self, inbox: _SinkInbox) -> None:
        assert inbox.job is not None
        with trio.CancelScope() as scope:
            inbox.job.scope = scope
            if inbox.job.cancelled:
                scope.cancel()
            try:
                await self._run_call(inbox.job)
            finally:
                inbox.discard()

    def _relay_sink(self, msg: SinkStart, forwarder: _Forwarder) -> None:
        """Pass a sink on a forwarded capability straight through (its credit bounds what
        the far side's writer can be asked to hold)."""
        ref = forwarder.ref
        target = ref._conn
        qid = msg.qid
        try:
            target._check_usable(ref)
            out_qid = target._next_qid
            frame = target._encode(SinkStart(out_qid, ref._id, msg.method, msg.args, msg.credit))
        except Exception as exc:
            self._reply_exception(qid, exc)
            return
        target._next_qid = out_qid + 1
        target._send_nowait(frame)
        relay = _SinkRelay(self, qid, target, out_qid, msg.credit)
        target._questions[out_qid] = relay
        self._answers[qid] = relay

    def _on_push(self, msg: Push) -> None:
        sink = self._answers.get(msg.qid)
        if sink is None:
            _release_refs_in(msg.values)  # the sink already answered: drop what was in flight
        elif isinstance(sink, _SinkInbox | _SinkRelay):
            sink.pushed(msg.values)
        else:
            raise ProtocolError(f"push to question {msg.qid}, which is not a sink")

    def _on_done(self, msg: Done) -> None:
        sink = self._answers.get(msg.qid)
        if isinstance(sink, _SinkInbox | _SinkRelay):
            sink.finish()

    def _on_ack(self, msg: Ack) -> None:
        sink = self._questions.get(msg.qid)
        if isinstance(sink, _Outsink | _SinkRelay):
            sink.grant(msg.n)

    def _on_credit(self, msg: Credit) -> None:
        out = self._answers.get(msg.qid)
        if isinstance(out, _Outbound):
            out.credit += msg.n
            out.lot.unpark_all()
        elif isinstance(out, _StreamRelay):
            out.grant(msg.n)

    def _on_cancel(self, msg: Cancel) -> None:
        answer = self._answers.get(msg.qid)
        if answer is not None:
            answer.cancel()

    async def _send_item(self, qid: int, value: Any) -> bool:
        """Queue an item of stream `qid`; when it cannot be encoded, send that error instead
        (False)."""
        if self._closing:
            return False
        try:
            part = self._pack_value(value)
        except Exception as exc:
            self._reply_exception(qid, exc)
            return False
        self._queue_part(ITEMS, qid, part)
        if self._outbox_bytes > HIGH_WATER:
            await self._wait_drained()
        return True

    async def _reply(self, msg: Return | End) -> bool:
        """Send an answer; when it cannot be encoded, send that error instead (False)."""
        if self._closing:
            return False
        try:
            body = self._encode(msg)
        except Exception as exc:
            self._reply_exception(msg.qid, exc)
            return False
        if self._outbox_bytes > HIGH_WATER:
            await self._wait_drained()
        self._send_nowait(body)
        return True

    def _reply_nowait(self, qid: int, value: Any) -> None:
        """Return `value` for `qid`, for a caller that checked the writer is not behind."""
        if self._closing:
            return
        try:
            body = self._encode_fields([RETURN, qid, value])
        except Exception as exc:
            self._reply_exception(qid, exc)
            return
        self._send_nowait(body)

    def _reply_exception(self, qid: int, exc: Exception) -> None:
        if isinstance(exc, CapabilityError):
            self._reply_error(qid, "CapabilityError", str(exc))
            return
        if isinstance(exc, RemoteError):
            # A relayed call failed further along: pass the original error on.
            self._reply_error(qid, exc.type, exc.message)
            return
        log.debug("%s: answer %d raised", self.name, qid, exc_info=exc)
        self._reply_error(qid, type(exc).__name__, str(exc))

    def _reply_error(self, qid: int, type_name: str, message: str) -> None:
        if not self._closing:
            if len(message) > MAX_ERROR_MESSAGE:
                message = message[: MAX_ERROR_MESSAGE - 3] + "..."
            self._send_nowait(self._encode(Error(qid, type_name[:200], message)))

    # --- answers to our questions ------------------------------------------------------------

    def _on_return(self, msg: Return) -> None:
        task = self._questions.pop(msg.qid, None)
        if task is None:
            self._discard_decoded()
        elif type(task) is trio.lowlevel.Task:
            trio.lowlevel.reschedule(task, outcome.Value(msg.value))
        else:
            task.answered(msg.value)

    def _on_error(self, msg: Error) -> None:
        error = RemoteError(msg.type, msg.message)
        task = self._questions.pop(msg.qid, None)
        if type(task) is trio.lowlevel.Task:
            trio.lowlevel.reschedule(task, outcome.Error(error))
            return
        if task is not None:
            task.failed(error)
            return
        state = self._inbound.pop(msg.qid, None)
        if state is not None:
            state.push(_FAIL, error)

    def _on_items(self, msg: Items) -> None:
        state = self._inbound.get(msg.qid)
        if state is None:
            self._discard_decoded()
            return
        state.credit -= len(msg.values)
        if state.credit < 0:
            raise ProtocolError(f"stream {msg.qid} sent more items than its credit")
        state.push_items(msg.values)

    def _on_end(self, msg: End) -> None:
        state = self._inbound.pop(msg.qid, None)
        if state is not None:
            state.push(_END, None)

    # --- references ---------------------------------------------------------------------------

    def _on_release_msg(self, msg: Release) -> None:
        try:
            obj = self._exports.release(msg.cap, msg.count)
        except KeyError:
            raise ProtocolError(f"release of unknown capability {msg.cap}") from None
        if obj is not None:
            self._unexported(obj)

    def _unexported(self, obj: object) -> None:
        """`obj` is no longer exported on this connection."""
        if isinstance(obj, _Forwarder):
            self._forwarders.pop(obj.key, None)
            obj.ref._release_now()
            return
        if _HOLDERS.drop(obj) and self._nursery is not None and not self._closing:
            self._nursery.start_soon(_call_on_release, obj)

    def _drop_import(self, cap_id: int) -> None:
        count = self._imports.drop(cap_id)
        if count and not self._closing:
            self._send_nowait(self._encode(Release(cap_id, count)))

    def _drop_collected(self, cap_id: int) -> None:
        """A Ref was garbage collected (may run inside any code, or another thread)."""
        self._collected.append(cap_id)
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._flush_collected)

    def _flush_collected(self) -> None:
        while self._collected:
            self._drop_import(self._collected.pop())

    def _dup(self, ref: Ref) -> Ref:
        if ref._id == BOOTSTRAP_ID:
            return Ref(self, BOOTSTRAP_ID, tracked=False)
        self._imports.dup(ref._id)
        return Ref(self, ref._id)

    def _discard_decoded(self) -> None:
        for ref in self._decoded_refs:
            ref._release_now()

    # --- encoding ------------------------------------------------------------------------------

    def _encode(self, msg: Message) -> Frame:
        """One frame for `msg`; capabilities in it are exported (rolled back on failure)."""
        return self._encode_fields(message_fields(msg))

    def _encode_fields(self, fields: list[Any]) -> Frame:
        """One frame for a message given as its wire array (see `wire.message_fields`)."""
        body = self._pack(fields)
        size = len(body)
        if size > self.max_frame:
            raise CapabilityError(
                f"message of {size} bytes exceeds the frame limit of {self.max_frame} bytes"
            )
        return _LEN.pack(size) + body if size < 512 else (_LEN.pack(size), body)

    def _pack_value(self, value: Any) -> bytes:
        """`value` packed to go into a batch of items (see `_queue_part`)."""
        part = self._pack(value)
        if len(part) > self.max_frame - 32:  # room for the batch's own header
            raise CapabilityError(
                f"item of {len(part)} bytes exceeds the frame limit of {self.max_frame} bytes"
            )
        return part

    def _pack(self, obj: Any) -> bytes:
        """msgpack of `obj`; capabilities in it are exported (rolled back on failure)."""
        encoding = self._encoding
        try:
            packed: bytes = self._packer.pack(obj)
            return packed
        except BaseException:
            self._packer.reset()
            for cap_id in encoding:
                obj = self._exports.release(cap_id, 1)
                if obj is not None:
                    if isinstance(obj, _Forwarder):
                        self._unexported(obj)
                    else:
                        _HOLDERS.drop(obj)
            raise
        finally:
            encoding.clear()

    def _encode_special(self, obj: object) -> msgpack.ExtType:
        if isinstance(obj, Capability):
            return self._export(obj)
        if isinstance(obj, Ref):
            if obj._released:
                raise CapabilityError("cannot send a released capability reference")
            if obj._conn is self:
                return msgpack.ExtType(EXT_RECEIVER_CAP, pack_cap_id(obj._id))
            key = (id(obj._conn), obj._id)
            fwd = self._forwarders.get(key)
            if fwd is None:
                obj._conn._check_usable(obj)
                fwd = _Forwarder(obj._conn._dup(obj), key)
                self._forwarders[key] = fwd
            return self._export(fwd)
        raise TypeError(f"cannot send a {type(obj).__name__} over RPC")

    def _export(self, obj: Capability) -> msgpack.ExtType:
        cap_id, new = self._exports.add(obj)
        if new and not isinstance(obj, _Forwarder):
            _HOLDERS.acquire(obj)
        self._encoding.append(cap_id)
        return msgpack.ExtType(EXT_SENDER_CAP, pack_cap_id(cap_id))

    def _decode_special(self, code: int, data: bytes) -> Any:
        if code == EXT_SENDER_CAP:
            cap_id = unpack_cap_id(data)
            if cap_id == BOOTSTRAP_ID:
                return Ref(self, BOOTSTRAP_ID, tracked=False)
            self._imports.received(cap_id)
            ref = Ref(self, cap_id)
            self._decoded_refs.append(ref)
            return ref
        if code == EXT_RECEIVER_CAP:
            cap_id = unpack_cap_id(data)
            try:
                obj = self._exports.get(cap_id)
            except KeyError:
                raise ProtocolError(f"reference to unknown capability {cap_id}") from None
            if isinstance(obj, _Forwarder):
                return obj.ref._conn._dup(obj.ref)
            return obj
        raise ProtocolError(f"unknown extension type {code}")

    # --- I/O -------------------------------------------------------------------------------------

    def _queue_part(self, tag: int, qid: int, part: bytes) -> None:
        """Queue a packed item of stream or sink `qid`: it joins the batch at the end of the
        outbox when that batch is its own and has room, so items produced while the writer
        is busy go out as one frame."""
        batch = self._open_batch
        size = len(part)
        if (
            batch is not None
            and batch.qid == qid
            and batch.tag == tag
            and batch.size + size <= BATCH_BYTES
        ):
            batch.parts.append(part)
            batch.size += size
        else:
            batch = _Batch(tag, qid, part)
            self._outbox.append(batch)
            self._open_batch = batch
        self._outbox_bytes += size
        writer = self._writer_waiting
        if writer is not None:
            self._writer_waiting = None
            trio.lowlevel.reschedule(writer)

    def _send_nowait(self, frame: Frame) -> None:
        self._open_batch = None
        if isinstance(frame, bytes):
            self._outbox.append(frame)
            self._outbox_bytes += len(frame)
        else:  # a large body beside its header, so it is copied once, by the writer's join
            header, body = frame
            self._outbox.append(header)
            self._outbox.append(body)
            self._outbox_bytes += 4 + len(body)
        writer = self._writer_waiting
        if writer is not None:
            self._writer_waiting = None
            trio.lowlevel.reschedule(writer)

    def _send_control(self, msg: Message) -> None:
        if not self._closing:
            self._send_nowait(self._encode(msg))

    async def _wait_drained(self) -> None:
        while self._outbox_bytes > HIGH_WATER and not self._closing:
            await self._drained_lot.park()

    async def _wait_for_frames(self) -> None:
        """Park the writer until `_send_nowait` queues a frame."""
        self._writer_waiting = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._writer_waiting = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _write_loop(self) -> None:
        reason = None
        try:
            while True:
                if not self._outbox:
                    await self._wait_for_frames()
                    continue
                outbox = self._outbox
                self._open_batch = None
                if len(outbox) == 1:
                    data = outbox[0] if type(outbox[0]) is bytes else outbox[0].frame()  # type: ignore[union-attr]
                else:
                    data = b"".join([f if type(f) is bytes else f.frame() for f in outbox])  # type: ignore[union-attr]
                outbox.clear()
                self._outbox_bytes = 0
                await self.stream.send_all(data)
                self._drained_lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"send failed: {exc or type(exc).__name__}"
        except Exception as exc:
            log.exception("%s: writer failed", self.name)
            reason = f"writer failed: {exc!r}"
        await self._shutdown(reason, logging.INFO)

    async def _read_loop(self) -> None:
        level = logging.DEBUG
        frames = self._frames
        handlers = self._handlers
        decoded = self._decoded_refs
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    reason = "peer closed the connection"
                    if frames.buffered:
                        reason += f" in the middle of a frame ({frames.buffered} bytes)"
                        level = logging.WARNING
                    break
                for body in frames.feed(data):
                    if self._closing:
                        return
                    msg = decode_message(body, self._decode_special)
                    handlers[type(msg)](msg)
                    decoded.clear()
                    del msg
                if self._collected:
                    self._flush_collected()
        except ProtocolError as exc:
            reason, level = f"protocol error: {exc}", logging.WARNING
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"receive failed: {exc or type(exc).__name__}"
        except Exception as exc:
            log.exception("%s: reader failed", self.name)
            reason, level = f"reader failed: {exc!r}", logging.ERROR
        finally:
            decoded.clear()
        await self._shutdown(reason, level)

    async def _shutdown(self, reason: str, level: int) -> None:
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        self.close_reason = reason
        log.log(level, "%s closed: %s", self.name, reason)
        lost = ConnectionLost(f"connection {self.name} closed: {reason}")
        questions = list(self._questions.values())
        self._questions.clear()
        for task in questions:
            if type(task) is trio.lowlevel.Task:
                trio.lowlevel.reschedule(task, outcome.Error(lost))
            else:
                task.failed(lost)
        for state in self._inbound.values():
            state.push(_FAIL, lost)
        self._inbound.clear()
        for answer in list(self._answers.values()):
            answer.cancel()
        self._drained_lot.unpark_all()
        self._outbox.clear()
        self._open_batch = None
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + RELEASE_TIMEOUT
            await trio.aclose_forcefully(self.stream)
            self._imports.clear()
            last = []
            for obj in self._exports.clear():
                if isinstance(obj, _Forwarder):
                    self._forwarders.pop(obj.key, None)
                    obj.ref._release_now()
                elif _HOLDERS.drop(obj):
                    last.append(obj)
            if last:
                async with trio.open_nursery() as nursery:
                    for obj in last:
                        nursery.start_soon(_call_on_release, obj)
        self.closed.set()


async def _call_on_release(obj: object) -> None:
    try:
        await obj._on_release()  # type: ignore[attr-defined]
    except Exception:
        log.exception("_on_release of %r raised", obj)


def _release_refs_in(value: Any) -> None:
    """Release every Ref inside a decoded value nobody will see."""
    if isinstance(value, Ref):
        value._release_now()
    elif isinstance(value, list):
        for v in value:
            _release_refs_in(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _release_refs_in(k)
            _release_refs_in(v)


async def serve_connection(
    stream: trio.abc.Stream,
    bootstrap: Capability | None = None,
    *,
    max_frame: int = MAX_FRAME,
    max_answers: int = MAX_ANSWERS,
    name: str | None = None,
) -> None:
    """Serve `bootstrap` to the peer on `stream` until either side closes; never raises
    (except trio.Cancelled). A bad peer is logged and disconnected."""
    try:
        async with Connection.open(
            stream, bootstrap, max_frame=max_frame, max_answers=max_answers, name=name
        ) as conn:
            await conn.closed.wait()
    except Exception:
        log.exception("%s: connection failed", name or "connection")


def _relay_ready(ref: Ref) -> bool:
    """Whether a call or stream on a forwarded capability can be passed straight on through
    `ref`: it is usable and its connection's writer is not behind."""
    target = ref._conn
    return not (
        target._closing or ref._released or target._collected or target._outbox_bytes > HIGH_WATER
    )
