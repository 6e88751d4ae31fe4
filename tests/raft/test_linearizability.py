"""The linearizability checker itself: it must accept what is linearizable and reject what
is not, including with operations whose outcome is unknown."""

from __future__ import annotations

import random

from sim.linearizability import Op, check_kv, check_register


def op(
    kind: str, arg: object, result: object, call: float, ret: float | None, key: str = "k"
) -> Op:
    return Op(0, key, kind, arg, result, call, ret)


def test_sequential_history_is_linearizable() -> None:
    h = [op("put", 1, None, 1, 2), op("get", None, 1, 3, 4), op("cas", (1, 2), True, 5, 6)]
    assert check_register(h)


def test_stale_read_after_a_completed_write_is_not_linearizable() -> None:
    h = [op("put", 1, None, 1, 2), op("put", 2, None, 3, 4), op("get", None, 1, 5, 6)]
    assert not check_register(h)


def test_concurrent_write_may_be_seen_or_not() -> None:
    for seen in (None, 1):
        h = [op("put", 1, None, 1, 10), op("get", None, seen, 2, 3)]
        assert check_register(h)


def test_reads_must_agree_on_the_order_of_concurrent_writes() -> None:
    # Two concurrent writes; one reader sees 1 then 2, another sees 2 then 1: impossible.
    h = [
        op("put", 1, None, 1, 20),
        op("put", 2, None, 1, 20),
        op("get", None, 1, 2, 3),
        op("get", None, 2, 4, 5),
        op("get", None, 2, 6, 7),
        op("get", None, 1, 8, 9),
    ]
    assert not check_register(h)


def test_read_of_a_value_never_written_is_not_linearizable() -> None:
    assert not check_register([op("get", None, 7, 1, 2)])


def test_write_with_unknown_outcome_may_take_effect_late_or_never() -> None:
    late = [op("put", 1, None, 1, None), op("get", None, None, 2, 3), op("get", None, 1, 4, 5)]
    never = [op("put", 1, None, 1, None), op("get", None, None, 2, 3)]
    assert check_register(late)
    assert check_register(never)


def test_unknown_write_cannot_take_effect_before_it_was_called() -> None:
    h = [op("get", None, 1, 1, 2), op("put", 1, None, 3, None)]
    assert not check_register(h)


def test_cas_results_must_match_the_state() -> None:
    assert check_register([op("put", 1, None, 1, 2), op("cas", (1, 3), True, 3, 4)])
    assert not check_register([op("put", 1, None, 1, 2), op("cas", (1, 3), False, 3, 4)])
    assert not check_register([op("cas", (None, 3), True, 1, 2), op("cas", (None, 4), True, 3, 4)])


def test_kv_history_is_checked_per_key() -> None:
    h = [
        op("put", 1, None, 1, 2, key="a"),
        op("put", 1, None, 1, 2, key="b"),
        op("get", None, 1, 3, 4, key="a"),
        op("get", None, None, 3, 4, key="b"),  # b was overwritten... with nothing: stale
    ]
    assert check_kv(h) == ["b"]


def test_a_large_random_linearizable_history_is_accepted_quickly() -> None:
    """Generate a history by running a real register with overlapping operations, each
    taking effect at a random instant inside its interval."""
    rng = random.Random(7)
    state: object = None
    events: list[tuple[float, int, str, object]] = []
    ops: list[Op] = []
    t = 0.0
    for i in range(400):
        t += rng.random()
        call, point = t, t + rng.random() * 3
        kind = rng.choice(["put", "get", "cas"])
        arg: object = (
            i if kind == "put" else (rng.choice([None, i - 1, i - 2]), i) if kind == "cas" else None
        )
        events.append((point, i, kind, arg))
        ops.append(op(kind, arg, None, call, point + rng.random() * 3))
    results: dict[int, object] = {}
    for _, i, kind, arg in sorted(events):
        if kind == "put":
            state = arg
        elif kind == "get":
            results[i] = state
        else:
            assert isinstance(arg, tuple)
            expected, new = arg
            results[i] = state == expected
            if state == expected:
                state = new
    history = [Op(0, "k", o.kind, o.arg, results.get(i), o.call, o.ret) for i, o in enumerate(ops)]
    assert check_register(history)
    # Flip one read: the history must now be rejected.
    i = next(i for i, o in enumerate(history) if o.kind == "get" and o.result is not None)
    bad = history[i]
    history[i] = Op(0, "k", "get", None, "never written", bad.call, bad.ret)
    assert not check_register(history)
