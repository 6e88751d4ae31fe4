"""The trio shell of the RPC: a `Connection` over one stream.

One connection runs a reader that turns frames into messages and dispatches them, and a writer
that sends whatever frames queued up while it was busy in one ``send_all``. Each incoming call
runs in a task of the connection's nursery (a parked worker when one is free), each incoming
stream in a task of its own; the sans-I/O parts live in `wire` and `tables`, `Ref` in `ref`,
the state of each stream and sink in `flow`, and the pass-through of forwarded capabilities in
`relay`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

import msgpack
import outcome
import trio

from ww.rpc.capability import NOT_NOW, Capability, Kind, method_table
from ww.rpc.errors import CapabilityError, ConnectionLost, ProtocolError, RemoteError
from ww.rpc.flow import (
    _END,
    _FAIL,
    _ITEM,
    RefSink,
    RefStream,
    _Batch,
    _Inbound,
    _Outbound,
    _Outsink,
    _SinkInbox,
)
from ww.rpc.limits import (
    BATCH_BYTES,
    HIGH_WATER,
    MAX_ANSWERS,
    MAX_ERROR_MESSAGE,
    MAX_IDLE_WORKERS,
    MAX_SINK_WINDOW,
    RECEIVE_SIZE,
    RELEASE_TIMEOUT,
)
from ww.rpc.ref import Ref, _release_refs_in
from ww.rpc.relay import _Forwarder, _Relay, _relay_ready, _SinkRelay, _StreamRelay
from ww.rpc.tables import BOOTSTRAP_ID, Exports, Holders, Imports
from ww.rpc.wire import (
    CALL,
    EXT_RECEIVER_CAP,
    EXT_SENDER_CAP,
    ITEMS,
    MAX_FRAME,
    RETURN,
    SINK,
    STREAM,
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

_HOLDERS = Holders()
_LEN = struct.Struct(">I")

Frame = bytes | tuple[bytes, bytes]
"""An encoded frame: small ones in one piece, large ones as (header, body)."""


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
        # A batch's own header takes at most 16 bytes: 32 leaves room.
        self._batch_bytes = min(BATCH_BYTES, max_frame - 32)
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

    def _check_open(self) -> None:
        if self._closing:
            raise ConnectionLost(f"connection {self.name} is closed ({self.close_reason})")

    def _check_usable(self, ref: Ref) -> None:
        if self._collected:
            self._flush_collected()
        self._check_open()
        if ref._released:
            raise CapabilityError("this capability reference was released")

    async def _call(
        self, ref: Ref, method: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> Any:
        if self._closing or ref._released or self._collected:
            self._check_usable(ref)
        if self._outbox_bytes > HIGH_WATER:
            await self._wait_drained()
            self._check_usable(ref)
        qid = self._next_qid
        self._next_qid = qid + 1
        fields = [CALL, qid, ref._id, method, args]
        if kwargs:
            fields.append(kwargs)
        self._send_nowait(self._encode_fields(fields))
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
            coro = fn(msg.method, msg.args, msg.kwargs)
        else:
            if nowait is not None and not msg.kwargs and self._outbox_bytes <= HIGH_WATER:
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
                coro = fn(obj, *msg.args, **(msg.kwargs or {}))
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
        fields = [CALL, ref._id, msg.method, msg.args]
        if msg.kwargs:
            fields.append(msg.kwargs)
        out_qid = self._ask_on(target, qid, fields)
        if out_qid is not None:
            relay = _Relay(self, qid, target, out_qid)
            target._questions[out_qid] = relay
            self._answers[qid] = relay
        return True

    def _ask_on(self, target: Connection, qid: int, fields: list[Any]) -> int | None:
        """Pass the peer's question `qid` on as a new question of ours on `target`: `fields`
        is its wire array without the question id. Its id there, or None when it could not
        be encoded (the peer then got the error as its answer)."""
        out_qid = target._next_qid
        fields.insert(1, out_qid)
        try:
            frame = target._encode_fields(fields)
        except Exception as exc:
            self._reply_exception(qid, exc)
            return None
        target._next_qid = out_qid + 1
        target._send_nowait(frame)
        return out_qid

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
        out_qid = self._ask_on(target, qid, [STREAM, ref._id, msg.method, msg.args, msg.credit])
        if out_qid is None:
            return True
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
        except Exception as exc:
            self._reply_exception(qid, exc)
            return
        out_qid = self._ask_on(target, qid, [SINK, ref._id, msg.method, msg.args, msg.credit])
        if out_qid is None:
            return
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
            and batch.size + size <= self._batch_bytes
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
