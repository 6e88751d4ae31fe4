"""The trio driver: runs a `Replica` with a ticker and a transport.

One task owns the replica. Everything that reaches it — ticks, inbound messages, proposals,
reads — is queued and drained in one go, so a burst of proposals folds into one Ready and one
`save` (one fsync) before the Ready's messages go out through the transport.

    driver = RaftDriver(replica, transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        result = await driver.propose(b"command")   # waits until applied here
        await driver.read_index()                   # then read the state machine

A proposal may be made on any replica: a follower forwards it to the leader and answers it
when the entry is applied locally. If no leader is known it fails at once with
`NotLeaderError` (which names the leader when one is known). A proposal that is lost on the
way (the leader crashed, the message was dropped) raises `RequestTimeoutError` once
`request_timeout` seconds have passed (checked every tick): its outcome is then unknown.
Raft applies a proposal at least once — a retried request, or a forwarded proposal that the
transport delivers twice, is appended twice — so a command that must take effect once carries
its own client id and sequence number, and the state machine answers a repeat with its first
answer.

The transport is anything with a non-blocking `send(messages)`; what it receives it hands to
`driver.step(message)` (or the bytes to `driver.step_encoded`). It reports whether a snapshot
message reached its peer with `driver.report_snapshot(peer, ok)` (the leader otherwise retries
it after a timeout). A snapshot message can be large: a transport with a frame limit splits the
encoded message itself (see `split_frame` / `FrameAssembler`).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import trio

from ww.raft.errors import UncommittedSizeLimitError
from ww.raft.node import NotLeaderError, RaftError, Replica, RequestDroppedError
from ww.raft.rawnode import Ready, Status
from ww.raft.types import ConfChange, ConfState, Message, MessageDecodeError, MessageType

logger = logging.getLogger(__name__)

SLOW_READY = 0.25
"""A Ready that takes longer (seconds) is logged: ticks and heartbeats wait meanwhile."""

__all__ = [
    "FrameAssembler",
    "NotLeaderError",
    "RaftDriver",
    "RaftError",
    "RaftStoppedError",
    "RequestDroppedError",
    "RequestTimeoutError",
    "Transport",
    "split_frame",
]


class Transport(Protocol):
    def send(self, messages: Sequence[Message]) -> None:
        """Queue messages for delivery; must not block. Delivery may fail silently."""
        ...


class RequestTimeoutError(RaftError):
    """No answer in time: the request may or may not have taken effect."""


class RaftStoppedError(RaftError):
    """The driver stopped while the request was waiting."""


class _Waiter:
    """One caller waiting for its request: the caller's task parks itself and whoever settles
    the request reschedules it. No Event and no cancel scope, as there may be thousands."""

    __slots__ = (
        "abandoned",
        "deadline",
        "error",
        "parked",
        "request_id",
        "result",
        "settled",
        "task",
    )

    def __init__(self, deadline: float = math.inf) -> None:
        self.task = trio.lowlevel.current_task()
        self.deadline = deadline
        self.request_id = b""
        self.result: Any = None
        self.error: BaseException | None = None
        self.settled = False
        self.parked = False  # the task sleeps in wait() until settled
        self.abandoned = False  # the caller stopped waiting (cancelled, timed out, answered)

    @property
    def waiting(self) -> bool:
        """Not yet answered, timed out or given up on."""
        return not (self.settled or self.abandoned)

    def resolve(self, result: Any) -> None:
        if not self.settled:
            self.settled = True
            self.result = result
            self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.settled:
            self.settled = True
            self.error = error
            self._wake()

    def _wake(self) -> None:
        if self.parked:
            self.parked = False
            trio.lowlevel.reschedule(self.task)

    async def wait(self) -> Any:
        if self.settled:
            await trio.lowlevel.checkpoint()
        else:
            self.parked = True
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        if self.error is not None:
            raise self.error
        return self.result

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self.parked = False
        self.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED


class RaftDriver:
    """Runs one replica: ticks every `tick_interval` seconds, steps inbound messages,
    processes Readys in batches and sends their messages through `transport`.

    With `persist_in_thread` the storage writes of a Ready run in a worker thread, so new
    messages and proposals keep queueing (and form the next batch) during an fsync.

    Proposals queued between two drains are stepped into the core as one batch. Every request
    has the same timeout, so the waiting requests sit in a queue in deadline order and the
    ticker fails the expired ones from its head: a timeout fires up to one tick late.
    """

    def __init__(
        self,
        replica: Replica,
        transport: Transport,
        *,
        tick_interval: float = 0.05,
        request_timeout: float = 5.0,
        persist_in_thread: bool = False,
    ) -> None:
        self.replica = replica
        self.transport = transport
        self.tick_interval = tick_interval
        self.request_timeout = request_timeout
        self.persist_in_thread = persist_in_thread
        self.dropped_messages = 0
        self._ticks = 0
        self._inbox: list[Message] = []
        self._commands: list[Callable[[], None]] = []
        self._proposals: list[tuple[_Waiter, bytes]] = []
        self._waiters: dict[bytes, _Waiter] = {}  # by request id, once submitted
        self._deadlines: deque[_Waiter] = deque()  # every waiting request, oldest first
        self._wakeup = trio.Event()
        self._running = False

    # -- inputs -----------------------------------------------------------------------------

    def step(self, message: Message) -> None:
        """Hand over a message that arrived from the network. Never blocks."""
        self._inbox.append(message)
        self._wakeup.set()

    def step_encoded(self, data: bytes) -> None:
        """Hand over an encoded message; one that does not decode is dropped and counted in
        `dropped_messages`."""
        try:
            message = Message.decode(data)
        except MessageDecodeError as e:
            self.dropped_messages += 1
            logger.warning("node %d: dropped an undecodable message: %s", self.replica.id, e)
            return
        self.step(message)

    def report_snapshot(self, node_id: int, ok: bool) -> None:
        """For transports: a snapshot message to `node_id` was delivered, or was lost."""
        self._commands.append(lambda: self.replica.node.report_snapshot(node_id, ok))
        self._wakeup.set()

    def report_unreachable(self, node_id: int) -> None:
        """For transports: sending to `node_id` failed."""
        self._commands.append(lambda: self.replica.node.report_unreachable(node_id))
        self._wakeup.set()

    async def propose(self, data: bytes) -> Any:
        """Replicate `data`; returns the state machine's result once it is applied here."""
        if not self._running:
            raise RaftStoppedError("the raft driver is not running")
        waiter = self._new_request_waiter()
        self._proposals.append((waiter, data))
        self._wakeup.set()
        return await self._wait_for(waiter)

    async def propose_conf_change(self, cc: ConfChange) -> ConfState:
        """Change the membership; returns the configuration once the change is applied."""
        result: ConfState = await self._request(lambda: self.replica.propose_conf_change(cc))
        return result

    async def read_index(self) -> int:
        """Wait until a linearizable read may be served from the local state machine;
        returns the read index."""
        index: int = await self._request(self.replica.read_index)
        return index

    async def campaign(self) -> None:
        """Start an election here now."""
        await self._command(self.replica.node.campaign)

    async def transfer_leader(self, node_id: int) -> None:
        """Ask the leader to hand leadership to `node_id`."""
        await self._command(lambda: self.replica.node.transfer_leader(node_id))

    def status(self) -> Status:
        """The core's status: term, vote, commit, role, leader, configuration, and on the
        leader every follower's progress."""
        return self.replica.node.status()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Pending requests then fail with RaftStoppedError."""
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ticker)
                task_status.started()
                await self._loop()
        finally:
            self._running = False
            stopped = RaftStoppedError("the raft driver stopped")
            for waiter in self._deadlines:
                waiter.fail(stopped)
            self._deadlines.clear()
            self._waiters.clear()
            self._proposals.clear()

    async def _ticker(self) -> None:
        """Count the tick intervals that have passed, so that the tick count keeps up with
        the clock even when this task wakes late (a busy loop, a long save): a leader whose
        ticks fell behind would hold its lease too long (see docs/raft.md, Reads)."""
        due = trio.current_time() + self.tick_interval
        while True:
            await trio.sleep_until(due)
            now = trio.current_time()
            passed = 1 + int((now - due) // self.tick_interval)
            due += passed * self.tick_interval
            self._ticks += passed
            self._wakeup.set()
            self._expire(now)

    def _expire(self, now: float) -> None:
        """Fail the requests whose deadline has passed; drop the settled ones at the head."""
        deadlines = self._deadlines
        while deadlines:
            waiter = deadlines[0]
            if waiter.waiting:
                if waiter.deadline > now:
                    return
                waiter.fail(
                    RequestTimeoutError(
                        f"no answer within {self.request_timeout} s; the request may or may "
                        "not have taken effect"
                    )
                )
            deadlines.popleft()

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._drain()
            while self.replica.has_ready():
                ready = self.replica.node.ready()
                early = _appends_with_new_entries(ready)
                if early:
                    self.transport.send(early)
                started = trio.current_time()
                if self.persist_in_thread:
                    await trio.to_thread.run_sync(self.replica.persist, ready)
                else:
                    self.replica.persist(ready)
                persisted = trio.current_time()
                out = self.replica.finish(ready)
                finished = trio.current_time()
                if finished - started > SLOW_READY:
                    logger.warning(
                        "node %d: a Ready took %.2f s (persist %.2f s, apply %.2f s, %d entries "
                        "committed)",
                        self.replica.id,
                        finished - started,
                        persisted - started,
                        finished - persisted,
                        len(ready.committed_entries),
                    )
                if early:
                    out.messages = [m for m in out.messages if m.type != MessageType.APP]
                if out.messages:
                    self.transport.send(out.messages)
                for request_id, result in out.results:
                    self._settle(request_id, result, None)
                for request_id, index in out.reads:
                    self._settle(request_id, index, None)
                for request_id in out.dropped:
                    self._settle(
                        request_id,
                        None,
                        RequestDroppedError("the read was lost to a leadership change; retry it"),
                    )
                self._drain()

    def _drain(self) -> None:
        ticks, self._ticks = self._ticks, 0
        for _ in range(ticks):
            self.replica.tick()
        inbox, self._inbox = self._inbox, []
        for message in inbox:
            try:
                self.replica.step(message)
            except Exception as e:  # a malformed or unexpected message must not stop us
                self.dropped_messages += 1
                logger.warning("node %d: dropped %s: %s", self.replica.id, message.type.name, e)
        commands, self._commands = self._commands, []
        for command in commands:
            command()
        if self._proposals:
            proposals, self._proposals = self._proposals, []
            self._submit_proposals([(w, d) for w, d in proposals if w.waiting])

    def _submit_proposals(self, proposals: list[tuple[_Waiter, bytes]]) -> None:
        """Step all queued proposals into the core at once. The batch is accepted or refused
        whole; refused for the uncommitted-size limit, each is proposed alone, so those that
        still fit get in and only the rest fail."""
        if not proposals:
            return
        try:
            request_ids = self.replica.propose_batch([data for _, data in proposals])
        except UncommittedSizeLimitError as e:
            if len(proposals) == 1:
                proposals[0][0].fail(e)
                return
            for waiter, data in proposals:
                try:
                    waiter.request_id = self.replica.propose(data)
                except RaftError as error:
                    waiter.fail(error)
                else:
                    self._waiters[waiter.request_id] = waiter
        except RaftError as e:  # refused: no leader, a transfer under way, ...
            for waiter, _ in proposals:
                waiter.fail(e)
        else:
            for (waiter, _), request_id in zip(proposals, request_ids, strict=True):
                waiter.request_id = request_id
                self._waiters[request_id] = waiter

    def _settle(self, request_id: bytes, result: Any, error: BaseException | None) -> None:
        waiter = self._waiters.pop(request_id, None)
        if waiter is None:
            return
        if error is None:
            waiter.resolve(result)
        else:
            waiter.fail(error)

    async def _request(self, submit: Callable[[], bytes]) -> Any:
        if not self._running:
            raise RaftStoppedError("the raft driver is not running")
        waiter = self._new_request_waiter()

        def command() -> None:
            if not waiter.waiting:
                return
            try:
                waiter.request_id = submit()
            except RaftError as e:  # refused: no leader, too many uncommitted bytes, ...
                waiter.fail(e)
            else:
                self._waiters[waiter.request_id] = waiter

        self._commands.append(command)
        self._wakeup.set()
        return await self._wait_for(waiter)

    def _new_request_waiter(self) -> _Waiter:
        waiter = _Waiter(trio.current_time() + self.request_timeout)
        self._deadlines.append(waiter)
        return waiter

    async def _wait_for(self, waiter: _Waiter) -> Any:
        try:
            return await waiter.wait()
        finally:
            waiter.abandoned = True
            if waiter.request_id and self._waiters.pop(waiter.request_id, None) is not None:
                self.replica.forget(waiter.request_id)

    async def _command(self, fn: Callable[[], None]) -> None:
        if not self._running:
            raise RaftStoppedError("the raft driver is not running")
        waiter = _Waiter()

        def command() -> None:
            try:
                fn()
            except Exception as e:
                waiter.fail(e)
            else:
                waiter.resolve(None)

        self._commands.append(command)
        self._wakeup.set()
        await waiter.wait()


def _appends_with_new_entries(ready: Ready) -> list[Message]:
    """A leader's appends may leave while it writes the same entries to its own disk (Raft
    thesis 10.2.1). This is safe because the core acknowledges its own entries only in
    `advance`, after the save returns, so the commit index the appends carry covers only
    entries a quorum has saved (even with a single voter). Every other message waits."""
    if not ready.entries:
        return []
    return [m for m in ready.messages if m.type == MessageType.APP]


# -- framing large messages -------------------------------------------------------------------

_HEADER = 9  # 8 bytes of total length, 1 byte "last chunk" flag


def split_frame(data: bytes, max_chunk: int) -> Iterator[bytes]:
    """Split an encoded message into chunks of at most `max_chunk` bytes (plus a small
    header) for transports that limit frame sizes; `FrameAssembler` joins them again."""
    if max_chunk < 1:
        raise ValueError("max_chunk must be positive")
    n = max(1, math.ceil(len(data) / max_chunk))
    for i in range(n):
        piece = data[i * max_chunk : (i + 1) * max_chunk]
        yield len(data).to_bytes(8, "big") + bytes([i == n - 1]) + piece


class FrameAssembler:
    """Joins the chunks of `split_frame` arriving in order on one stream."""

    def __init__(self, max_size: int = 1 << 31) -> None:
        self.max_size = max_size
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes | None:
        """Add one chunk; returns the whole frame when this was its last chunk."""
        if len(chunk) < _HEADER:
            raise ValueError("chunk shorter than its header")
        total = int.from_bytes(chunk[:8], "big")
        if total > self.max_size:
            raise ValueError(f"frame of {total} bytes exceeds the limit of {self.max_size}")
        self._parts.append(chunk[_HEADER:])
        self._size += len(chunk) - _HEADER
        if self._size > total:
            self._parts, self._size = [], 0
            raise ValueError("chunks exceed the announced frame length")
        if not chunk[8]:
            return None
        data = b"".join(self._parts)
        self._parts, self._size = [], 0
        if len(data) != total:
            raise ValueError(f"frame has {len(data)} bytes, announced {total}")
        return data
