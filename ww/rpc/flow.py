"""Per-question flow control: the state of each stream and sink, on either side.

A stream's consumer keeps its received items in an `_Inbound` (iterated as a `RefStream`) and
grants credit as it takes them; the producer's `_Outbound` spends that credit. A sink's caller
spends the credit of its `_Outsink` (pushed into through a `RefSink`); the sink's `_SinkInbox`
grants it back as its method takes items. Items of one stream or sink queued together go out as
one `_Batch` frame.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from ww.rpc.errors import CapabilityError, ProtocolError
from ww.rpc.limits import HIGH_WATER
from ww.rpc.ref import _release_refs_in
from ww.rpc.wire import ITEMS, PUSH, Ack, Cancel, Credit, Done

if TYPE_CHECKING:
    from ww.rpc.connection import Connection, _Job

_LEN = struct.Struct(">I")
_packb = msgpack.packb
_ARRAY_HEADER = msgpack.Packer().pack_array_header
_BATCH_HEADS = {tag: b"\x93" + _packb(tag) for tag in (ITEMS, PUSH)}
"""The start of a three-element message array with this tag."""


class _Parked:
    """Holds the one task that waits for something to arrive, and wakes it."""

    __slots__ = ("waiter",)

    def __init__(self) -> None:
        self.waiter: trio.lowlevel.Task | None = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            trio.lowlevel.reschedule(waiter)

    async def _park(self, busy: str) -> None:
        """Until `_wake`; `busy` says what is wrong when another task already waits."""
        if self.waiter is not None:
            raise trio.BusyResourceError(busy)
        self.waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class _Inbound(_Parked):
    """Client side of one stream: received items and the credit owed to the producer."""

    __slots__ = ("consumed", "credit", "grant_every", "items")

    def __init__(self, window: int) -> None:
        super().__init__()
        self.items: deque[tuple[int, Any]] = deque()
        self.credit = window  # items the producer may still send
        self.consumed = 0  # items taken since the last grant
        self.grant_every = max(1, (window + 1) // 2)

    def push(self, kind: int, value: Any) -> None:
        self.items.append((kind, value))
        self._wake()

    def push_items(self, values: list[Any]) -> None:
        self.items.extend([(_ITEM, value) for value in values])
        self._wake()

    async def wait(self) -> None:
        """Until something was pushed (or checkpoint when something already is)."""
        if self.items:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        await self._park("another task is already iterating this stream")


_ITEM, _END, _FAIL = range(3)


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


class _SinkInbox(_Parked):
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
        super().__init__()
        self.conn = conn
        self.qid = qid
        self.credit = credit  # items the asker may still push
        self.grant_every = max(1, (credit + 1) // 2)
        self.taken = 0  # items taken since the last grant
        self.items: deque[Any] = deque()
        self.done = False
        self.busy = False  # the method holds an item it has not finished with
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
                await self._park("another task is already reading this sink")
        self.busy = True
        value = self.items.popleft()
        self._took(1)
        return value


class _Outsink:
    """Client side of one sink: the credit to push, and its answer once it came."""

    __slots__ = ("credit", "error", "finished", "lot", "value")

    def __init__(self, window: int) -> None:
        self.credit = window
        self.finished = False  # the method returned (`value`) or failed (`error`)
        self.value: Any = None
        self.error: Exception | None = None
        self.lot = trio.lowlevel.ParkingLot()  # senders waiting for credit or the answer

    def grant(self, n: int) -> None:
        self.credit += n
        self.lot.unpark_all()

    def answered(self, value: Any) -> None:
        self.finished = True
        self.value = value
        self.lot.unpark_all()

    def failed(self, exc: Exception) -> None:
        self.finished = True
        self.error = exc
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
        if st.credit > 0 and not st.finished:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            while st.credit <= 0 and not st.finished:
                await st.lot.park()
        if st.finished:
            if st.error is not None:
                raise st.error
            raise CapabilityError("the sink returned and takes no more items")
        conn._check_open()
        part = conn._pack_value(value)
        st.credit -= 1
        conn._queue_part(PUSH, self._qid, part)
        if conn._outbox_bytes > HIGH_WATER:
            await conn._wait_drained()

    async def _finish(self) -> None:
        st = self._state
        conn = self._conn
        if not st.finished and not conn._closing:
            conn._send_nowait(conn._encode(Done(self._qid)))
        try:
            while not st.finished:
                await st.lot.park()
        except BaseException:
            if conn._questions.pop(self._qid, None) is not None and not conn._closing:
                conn._send_nowait(conn._encode(Cancel(self._qid)))
            raise
        if st.error is not None:
            raise st.error
        self.result = st.value
