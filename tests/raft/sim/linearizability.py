"""A linearizability checker for histories of a key-value register map.

The algorithm is Wing & Gong's search with Lowe's memoization, as Porcupine implements it:
walk the history's call/return events in real-time order, try to linearize each pending call
against the model, and backtrack when a return is reached before its call was linearized.
A key-value map is checked one key at a time (linearizability is local), which keeps the
search small.

An operation whose outcome the client never learned (it timed out, or its node crashed) has
`ret = None`: it may take effect at any point after its call, or never. A read with an unknown
outcome constrains nothing and is left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Value = Any


@dataclass(frozen=True, slots=True)
class Op:
    """One client operation on one key.

    kind is "put" (arg: value; result: None), "get" (result: value) or "cas" (arg:
    (expected, new); result: bool). call/ret are points on one global event clock; ret is None
    when the outcome is unknown, and then result is ignored.
    """

    client: int
    key: str
    kind: str
    arg: Value
    result: Value
    call: float
    ret: float | None


def step(state: Value, op: Op) -> tuple[bool, Value]:
    """The sequential register: is `op` (with its observed result) legal in `state`, and
    what state follows?"""
    known = op.ret is not None
    if op.kind == "put":
        return True, op.arg
    if op.kind == "get":
        return (not known or op.result == state), state
    if op.kind == "cas":
        expected, new = op.arg
        swapped = state == expected
        if known and op.result != swapped:
            return False, state
        return True, (new if swapped else state)
    raise ValueError(f"unknown operation kind {op.kind!r}")


class _Event:
    __slots__ = ("is_call", "match", "next", "op", "op_id", "prev")

    def __init__(self, op: Op | None, op_id: int, is_call: bool) -> None:
        self.op = op
        self.op_id = op_id
        self.is_call = is_call
        self.match: _Event | None = None
        self.prev: _Event | None = None
        self.next: _Event | None = None


def _lift(call: _Event) -> None:
    """Unlink a call event and its return event from the list."""
    for e in (call, call.match):
        assert e is not None and e.prev is not None
        e.prev.next = e.next
        if e.next is not None:
            e.next.prev = e.prev


def _unlift(call: _Event) -> None:
    for e in (call.match, call):
        assert e is not None and e.prev is not None
        e.prev.next = e
        if e.next is not None:
            e.next.prev = e


def check_register(ops: Sequence[Op], initial: Value = None) -> bool:
    """Is this history of one register linearizable?"""
    ops = [op for op in ops if not (op.kind == "get" and op.ret is None)]
    events: list[tuple[float, int, int, _Event]] = []
    calls: list[_Event] = []
    for i, op in enumerate(ops):
        call = _Event(op, i, True)
        ret = _Event(None, i, False)
        call.match = ret
        calls.append(call)
        # At equal times a return sorts before a call: the earlier op finished first.
        events.append((op.call, 1, i, call))
        events.append((math.inf if op.ret is None else op.ret, 0, i, ret))
    events.sort(key=lambda t: (t[0], t[1], t[2]))
    head = _Event(None, -1, False)
    prev = head
    for *_, e in events:
        prev.next = e
        e.prev = prev
        prev = e

    seen: set[tuple[int, Value]] = set()
    stack: list[tuple[_Event, Value]] = []
    linearized = 0
    state = initial
    entry = head.next
    while head.next is not None:
        assert entry is not None
        if entry.is_call:
            assert entry.op is not None
            ok, new_state = step(state, entry.op)
            if ok:
                new_linearized = linearized | (1 << entry.op_id)
                key = (new_linearized, _freeze(new_state))
                if key not in seen:
                    seen.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = new_linearized
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return False
            call, state = stack.pop()
            linearized &= ~(1 << call.op_id)
            _unlift(call)
            entry = call.next
    return True


def _freeze(v: Value) -> Value:
    return tuple(v) if isinstance(v, list) else v


def check_kv(history: Iterable[Op]) -> list[str]:
    """Check a key-value history key by key; return the keys whose history is not
    linearizable (empty when the whole history is)."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    return sorted(k for k, ops in by_key.items() if not check_register(ops))
