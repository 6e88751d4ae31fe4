"""The queue state machine, op by op: answers, refusals, sessions, snapshots, restarts."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest

from ww.queue import state as state_module
from ww.queue.commands import Command, Item, Query, claimed_from_answer, stamp
from ww.queue.state import QueueState, QueueStateError

from .conftest import Driver


def items(*payloads: bytes, **fields) -> list[Item]:
    return [Item(p, **fields) for p in payloads]


# -- create / put ---------------------------------------------------------------------------


def test_create_is_idempotent_for_the_same_kind_and_refuses_another(q: Driver) -> None:
    assert q(Command.create("w")) == {"created": True}
    assert q(Command.create("w")) == {"created": False}
    assert "error" in q(Command.create("w", kind="log"))
    assert "error" in q(Command.create("x", kind="stack"))
    assert q.query(op="topics") == {"topics": ["w"]}


def test_put_counts_duplicates_by_key_across_batches_and_within_one(q: Driver) -> None:
    assert q(Command.put("w", [Item(b"a", key="1"), Item(b"b", key="1"), Item(b"c")])) == {
        "added": 2,
        "duplicates": 1,
    }
    assert q(Command.put("w", [Item(b"d", key="1"), Item(b"e", key="2")])) == {
        "added": 1,
        "duplicates": 1,
    }
    s = q.stats("w")
    assert (s["kind"], s["ready"], s["seen"]) == ("work", 3, 2)


def test_keys_that_share_a_long_prefix_are_told_apart(q: Driver) -> None:
    base = "https://example.org/" + "p" * 200
    keys = [base + "1", base + "2", base[:10], base[:19], base[:40], "é" * 40 + "x", "é" * 40 + "y"]
    put = Command.put("w", [Item(k.encode(), key=k) for k in keys])
    assert q(put) == {"added": len(keys), "duplicates": 0}
    assert q(put) == {"added": 0, "duplicates": len(keys)}


def test_a_large_batch_keeps_its_order_and_its_duplicates(q: Driver) -> None:
    keys = [f"k{i % 963}" for i in range(1000)]  # the last 37 repeat the first
    assert q(Command.put("w", [Item(k.encode(), key=k) for k in keys])) == {
        "added": 963,
        "duplicates": 37,
    }
    got = claimed_from_answer(q.ok(Command.claim("w", "c", 1000, 60.0)))
    assert [(c.payload, c.key) for c in got] == [(k.encode(), k) for k in keys[:963]]
    assert [c.id for c in got] == sorted(c.id for c in got)


def test_a_key_stays_seen_after_its_item_is_done(q: Driver) -> None:
    q.ok(Command.put("w", [Item(b"a", key="k")]))
    ids = q.claim_ids("w")
    q.ok(Command.complete("c", ids))
    assert q(Command.put("w", [Item(b"again", key="k")])) == {"added": 0, "duplicates": 1}


def test_put_to_a_log_topic_and_append_to_a_work_topic_are_refused(q: Driver) -> None:
    q.ok(Command.create("log", kind="log"))
    q.ok(Command.put("w", items(b"a")))
    assert "log topic" in q(Command.put("log", items(b"a")))["error"]
    assert "work topic" in q(Command.append("w", [b"r"]))["error"]
    assert q.stats("w")["ready"] == 1 and q.stats("log")["appended"] == 0


# -- claim ----------------------------------------------------------------------------------


def test_claim_gives_the_oldest_ready_items_with_their_fields(q: Driver) -> None:
    q.ok(Command.put("w", [Item(b"a", key="ka", partition="p"), Item(b"b"), Item(b"c")]))
    answer = q.ok(Command.claim("w", "c1", 2, 30))
    got = claimed_from_answer(answer)
    assert [(c.payload, c.key, c.partition, c.attempts) for c in got] == [
        (b"a", "ka", "p", 1),
        (b"b", None, None, 1),
    ]
    s = q.stats("w")
    assert (s["ready"], s["leased"]) == (1, 2)


def test_claim_on_an_unknown_topic_is_empty_and_on_a_log_topic_refused(q: Driver) -> None:
    assert q(Command.claim("nothing", "c", 5, 10)) == {"items": []}
    q.ok(Command.create("log", kind="log"))
    assert "error" in q(Command.claim("log", "c", 5, 10))
    assert q.query(op="topics") == {"topics": ["log"]}


def test_not_before_holds_an_item_back_until_the_log_clock_reaches_it(q: Driver) -> None:
    q.ok(Command.put("w", [Item(b"later", not_before=q.time + 10), Item(b"now")]))
    assert q.stats("w")["delayed"] == 1
    assert q.claim_ids("w") == [2]
    q.time += 10
    assert q.claim_ids("w") == [1]
    assert q.stats("w")["delayed"] == 0


def test_an_expired_lease_returns_the_item_with_its_attempts_counted(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    assert q.claim_ids("w", "c1", lease=5) == [1]
    q.time += 4.9
    assert q.claim_ids("w", "c2") == []
    q.time += 0.1
    answer = q.ok(Command.claim("w", "c2", 1, 5))
    assert [c.attempts for c in claimed_from_answer(answer)] == [2]


def test_tick_expires_leases_without_a_claim(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    q.claim_ids("w", lease=5)
    q.time += 5
    assert q(Command.tick()) == {}
    s = q.stats("w")
    assert (s["ready"], s["leased"]) == (1, 0)


def test_after_max_attempts_an_expired_item_goes_to_the_dead_letter_topic(q: Driver) -> None:
    q.ok(Command.create("w", max_attempts=2))
    q.ok(Command.put("w", [Item(b"poison", key="k", partition="h")]))
    for _ in range(2):
        assert q.claim_ids("w", lease=1) == [1]
        q.time += 1
        q.ok(Command.tick())
    s = q.stats("w")
    assert (s["ready"], s["leased"], s["dead"]) == (0, 0, 1)
    dead = q.ok(Command.claim("w.dead", "d", 5, 10))["items"]
    assert [(c["payload"], c["key"], c["partition"], c["attempts"]) for c in dead] == [
        (b"poison", "k", "h", 1)
    ]


def test_a_log_topic_as_dead_letter_topic_keeps_the_payload(q: Driver) -> None:
    q.ok(Command.create("graveyard", kind="log"))
    q.ok(Command.create("w", max_attempts=1, dead_letter="graveyard"))
    q.ok(Command.put("w", items(b"poison")))
    q.claim_ids("w", lease=1)
    q.time += 1
    q.ok(Command.tick())
    assert q.query(**Query.read("graveyard", 0, 10))["records"] == [[0, b"poison"]]


def test_claim_refuses_bad_limits(q: Driver) -> None:
    for bad in (Command.claim("w", "c", 0, 10), Command.claim("w", "c", 5, 0)):
        assert "error" in q(bad)
    assert "error" in q(Command.claim("w", "", 5, 10))


# -- partition limits -----------------------------------------------------------------------


def test_max_leased_caps_the_leases_of_one_key_without_blocking_others(q: Driver) -> None:
    q.ok(Command.limit("w", "busy", 2, 0))
    q.ok(Command.put("w", [*items(b"1", b"2", b"3", partition="busy"), Item(b"x", partition="o")]))
    got = q.ok(Command.claim("w", "c", 10, 30))["items"]
    assert sorted(c["payload"] for c in got) == [b"1", b"2", b"x"]
    assert q.claim_ids("w") == []
    q.ok(Command.complete("c", [got[0]["id"]]))
    assert len(q.claim_ids("w")) == 1


def test_min_interval_spaces_claims_of_one_key_by_log_time(q: Driver) -> None:
    q.ok(Command.limit("w", None, None, 2.0))  # the topic's default for every key
    q.ok(Command.put("w", items(b"1", b"2", partition="h") + items(b"a", b"b", partition="g")))
    assert q.claim_ids("w") == [1, 3]  # one per key per claim
    q.time += 1.9
    assert q.claim_ids("w") == []
    q.time += 0.1
    assert q.claim_ids("w") == [2, 4]


def test_a_key_of_its_own_overrides_the_topic_default(q: Driver) -> None:
    q.ok(Command.limit("w", None, 1, 100.0))
    q.ok(Command.limit("w", "free", None, 0.0))
    q.ok(
        Command.put(
            "w", items(b"1", b"2", b"3", partition="free") + items(b"a", b"b", partition="h")
        )
    )
    got = q.ok(Command.claim("w", "c", 10, 30))["items"]
    assert [c["payload"] for c in got] == [b"1", b"a", b"2", b"3"]


def test_items_without_partition_ignore_limits(q: Driver) -> None:
    q.ok(Command.limit("w", None, 1, 100.0))
    q.ok(Command.put("w", items(b"1", b"2", b"3")))
    assert q.claim_ids("w") == [1, 2, 3]


def test_claim_is_fair_across_keys_round_by_round(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a1", b"a2", b"a3", b"a4", partition="a")))
    q.ok(Command.put("w", items(b"b1", b"b2", partition="b") + items(b"n1")))
    got = q.ok(Command.claim("w", "c", 6, 30))["items"]
    assert [c["payload"] for c in got] == [b"a1", b"b1", b"n1", b"a2", b"b2", b"a3"]


def test_raising_a_limit_frees_a_waiting_key(q: Driver) -> None:
    q.ok(Command.limit("w", "h", 1, 0))
    q.ok(Command.put("w", items(b"1", b"2", partition="h")))
    assert q.claim_ids("w") == [1]
    assert q.claim_ids("w") == []
    q.ok(Command.limit("w", "h", 2, 0))
    assert q.claim_ids("w") == [2]


def test_limit_refusals(q: Driver) -> None:
    q.ok(Command.create("log", kind="log"))
    assert "error" in q(Command.limit("log", "h", 1, 0))
    assert "error" in q(Command.limit("w", "h", 0, 0))
    assert "error" in q(Command.limit("w", "h", 1, -1))


def test_stats_lists_the_busiest_keys_with_their_next_claim_time(q: Driver) -> None:
    q.ok(Command.limit("w", None, None, 5.0))
    q.ok(Command.put("w", items(b"1", b"2", partition="h") + items(b"a", partition="g")))
    q.claim_ids("w", n=1)
    assert q.stats("w")["partitions"] == [["h", 1, 1, q.time + 5.0], ["g", 1, 0, 0.0]]


# -- complete / release ---------------------------------------------------------------------


def test_complete_acknowledges_appends_and_puts_in_one_command(q: Driver) -> None:
    q.ok(Command.create("results", kind="log"))
    q.ok(Command.append("results", [b"r0"]))
    q.ok(Command.put("w", items(b"a", b"b")))
    ids = q.claim_ids("w")
    answer = q(
        Command.complete(
            "c", ids, append={"results": [b"r1", b"r2"], "fresh": [b"x"]}, put={"w": items(b"n")}
        )
    )
    assert answer == {
        "done": 2,
        "appended": {"fresh": 0, "results": 1},
        "added": 1,
        "duplicates": 0,
    }
    s = q.stats("w")
    assert (s["done"], s["ready"], s["leased"]) == (2, 1, 0)
    assert q.stats("fresh")["kind"] == "log"


def test_complete_is_all_or_nothing(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a", b"b")))
    ids = q.claim_ids("w")
    answer = q(Command.complete("c", [*ids, 99], append={"r": [b"x"]}))
    assert answer["lost"] == [99]
    assert "error" in answer
    assert q.stats("w")["leased"] == 2
    assert "r" not in q.query(op="topics")["topics"]
    answer = q(Command.complete("c", ids, put={"r": items(b"x")}, append={"r": [b"y"]}))
    assert "error" in answer  # r becomes a log topic, then put to it is refused
    assert q.stats("w")["leased"] == 2


def test_complete_by_another_consumer_or_twice_is_refused(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    ids = q.claim_ids("w", "c1")
    assert q(Command.complete("c2", ids))["lost"] == ids
    q.ok(Command.complete("c1", ids))
    assert q(Command.complete("c1", ids))["lost"] == ids


def test_an_expired_lease_is_still_accepted_until_claimed_again(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a", b"b")))
    a, b = q.claim_ids("w", "c1", lease=5)
    q.time += 5
    q.ok(Command.tick())
    assert q(Command.complete("c1", [a])) == {
        "done": 1,
        "appended": {},
        "added": 0,
        "duplicates": 0,
    }
    assert q.claim_ids("w", "c2") == [b]
    assert q(Command.complete("c1", [b]))["lost"] == [b]
    s = q.stats("w")
    assert (s["done"], s["ready"], s["leased"]) == (1, 0, 1)


def test_release_requeues_after_a_delay_keeping_attempts(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    ids = q.claim_ids("w")
    assert q(Command.release("c", ids, 10)) == {"released": 1}
    s = q.stats("w")
    assert (s["delayed"], s["leased"]) == (1, 0)
    assert q.claim_ids("w") == []
    q.time += 10
    got = q.ok(Command.claim("w", "c", 1, 5))["items"]
    assert [(c["id"], c["attempts"]) for c in got] == [(ids[0], 2)]
    assert q(Command.release("other", ids))["lost"] == ids


def test_release_without_delay_makes_the_item_ready_at_once(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a", partition="h")))
    ids = q.claim_ids("w")
    q.ok(Command.release("c", ids))
    assert q.claim_ids("w") == ids


def test_repeated_ids_are_refused(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    ids = q.claim_ids("w")
    assert "repeat" in q(Command.complete("c", ids * 2))["error"]


# -- log topics -----------------------------------------------------------------------------


def test_append_read_trim_and_cursors(q: Driver) -> None:
    assert q(Command.append("log", [b"a", b"b", b"c"])) == {"first": 0}
    assert q(Command.append("log", [b"d"])) == {"first": 3}
    assert q.query(**Query.read("log", 1, 2)) == {
        "records": [[1, b"b"], [2, b"c"]],
        "next": 3,
        "first": 0,
    }
    assert q(Command.trim("log", 2)) == {"trimmed": 2}
    assert q(Command.trim("log", 1)) == {"trimmed": 0}
    assert q.query(**Query.read("log", 0, 10)) == {
        "records": [[2, b"c"], [3, b"d"]],
        "next": 4,
        "first": 2,
    }
    assert q.query(**Query.read("log", 9, 10)) == {"records": [], "next": 9, "first": 2}
    assert q(Command.trim("log", 100)) == {"trimmed": 2}
    s = q.stats("log")
    assert (s["appended"], s["first"]) == (4, 4)
    assert q.query(**Query.cursor_get("log", "me")) == {"offset": 0}
    assert q(Command.cursor("log", "me", 3)) == {}
    assert q.query(**Query.cursor_get("log", "me")) == {"offset": 3}
    assert "unknown topic" in q(Command.cursor("nope", "me", 1))["error"]


def test_queries_refuse_bad_requests(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    for bad in (
        {"op": "stats", "topic": "nope"},
        {"op": "read", "topic": "w", "offset": 0, "n": 1},
        {"op": "read", "topic": "w"},
        {"op": "drop"},
        {"op": "stats", "topic": 5},
        [1, 2],
    ):
        answer = q.state.query(bad)
        assert set(answer) == {"error"} and "\n" not in answer["error"], bad


# -- malformed commands ---------------------------------------------------------------------


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


BAD_COMMANDS = [
    b"",
    b"\xc1",
    b"\x93\x01\x02\x03",
    pack([1, 2]),
    pack({"op": "put", "topic": "w", "items": []}),  # no time
    pack({"op": "explode", "time": 1.0}),
    pack({"op": 5, "time": 1.0}),
    pack({"op": "put", "time": float("nan"), "topic": "w", "items": []}),
    pack({"op": "put", "time": 1e300, "topic": "w", "items": []}),
    pack({"op": "put", "time": 1.0, "topic": "w"}),
    pack({"op": "put", "time": 1.0, "topic": "w", "items": {"payload": b"x"}}),
    pack({"op": "put", "time": 1.0, "topic": "w", "items": [{"payload": "str"}]}),
    pack({"op": "put", "time": 1.0, "topic": "w", "items": [{"payload": b"x", "key": 5}]}),
    pack({"op": "put", "time": 1.0, "topic": "w", "items": [{"payload": b"x", "colour": 1}]}),
    pack({"op": "put", "time": 1.0, "topic": "w", "items": [{"payload": b"x", "not_before": "x"}]}),
    pack({"op": "put", "time": 1.0, "topic": "", "items": []}),
    pack({"op": "put", "time": 1.0, "topic": ["w"], "items": []}),
    pack({"op": "put", "time": 1.0, "client": "c", "seq": 0, "topic": "w", "items": []}),
    pack({"op": "put", "time": 1.0, "client": "c", "seq": 2**64 - 1, "topic": "w", "items": []}),
    pack({"op": "put", "time": 1.0, "client": 7, "seq": 1, "topic": "w", "items": []}),
    pack(
        {"op": "claim", "time": 1.0, "topic": "w", "consumer": "c", "max_items": 2**63, "lease": 1}
    ),
    pack(
        {"op": "claim", "time": 1.0, "topic": "w", "consumer": "c", "max_items": True, "lease": 1}
    ),
    pack(
        {"op": "claim", "time": 1.0, "topic": "w", "consumer": "c", "max_items": 1, "lease": 1e300}
    ),
    pack({"op": "complete", "time": 1.0, "consumer": "c", "ids": [-1]}),
    pack({"op": "complete", "time": 1.0, "consumer": "c", "ids": [2**64 - 1]}),
    pack({"op": "complete", "time": 1.0, "consumer": "c", "ids": [1], "append": [b"x"]}),
    pack({"op": "complete", "time": 1.0, "consumer": "c", "ids": "1"}),
    pack({"op": "release", "time": 1.0, "consumer": "c", "ids": [1], "delay": -5}),
    pack({"op": "append", "time": 1.0, "topic": "l", "records": ["text"]}),
    pack({"op": "trim", "time": 1.0, "topic": "l", "offset": 2**70 // 2**10}),
    pack({"op": "create", "time": 1.0, "topic": "t", "max_attempts": 0}),
    pack({"op": "create", "time": 1.0, "topic": "t", "dead_letter": "t"}),
    pack({"op": "limit", "time": 1.0, "topic": "w", "partition": 1, "max_leased": 1}),
]


def test_malformed_commands_answer_one_line_errors_and_change_nothing(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    before = q.stats("w")
    for data in BAD_COMMANDS:
        index = q.index
        answer = q.raw(data)
        assert set(answer) <= {"error", "lost"} and "error" in answer, (data, answer)
        assert "\n" not in answer["error"]
        assert q.state.applied_index == index + 1
    assert q.stats("w") == before
    assert q.query(op="topics") == {"topics": ["w"]}


def test_an_entry_at_or_below_the_applied_index_is_not_applied_again(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    answer = q.state.apply(q.index, Command.put("w", items(b"b")).encode(time=q.time))
    assert "already applied" in answer["error"]
    assert q.stats("w")["ready"] == 1


def test_the_clock_never_goes_back(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")))
    q.claim_ids("w", lease=10)
    q.time += 10
    q.ok(Command.tick())
    q.time -= 100  # a new leader with a slow clock
    assert q.state.clock == 1010.0
    assert q.claim_ids("w", "c2", lease=5) == [1]
    q.time = 1014.9
    q.ok(Command.tick())
    assert q.stats("w")["leased"] == 1  # the lease runs until 1015 on the log clock


def test_stamp_sets_the_time_and_refuses_non_commands() -> None:
    data = stamp(Command.tick().encode(client="c", seq=1), 5.0)
    assert msgpack.unpackb(data)["time"] == 5.0
    with pytest.raises(ValueError):
        stamp(b"\xc1", 5.0)
    with pytest.raises(ValueError):
        stamp(Command.tick().encode(), math.inf)


# -- sessions -------------------------------------------------------------------------------


def test_a_retried_command_returns_its_first_answer_and_takes_effect_once(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a", b"b")))
    first = q(Command.claim("w", "c", 1, 30), client="cl", seq=1)
    again = q(Command.claim("w", "c", 1, 30), client="cl", seq=1)
    assert first == again and len(first["items"]) == 1
    assert q.stats("w")["leased"] == 1
    put = Command.put("w", items(b"x"))
    assert q(put, client="cl", seq=2) == q(put, client="cl", seq=2) == {"added": 1, "duplicates": 0}
    assert q.stats("w")["ready"] == 2


def test_a_refused_command_is_remembered_too(q: Driver) -> None:
    bad = Command.complete("c", [5])
    first = q(bad, client="cl", seq=1)
    q.ok(Command.put("w", items(b"a", b"b", b"c", b"d", b"e")))
    q.claim_ids("w", "c")  # now id 5 is leased by c
    assert q(bad, client="cl", seq=1) == first


def test_an_acknowledged_answer_is_forgotten(q: Driver) -> None:
    q.ok(Command.put("w", items(b"a")), client="cl", seq=1)
    q.ok(Command.put("w", items(b"b")), client="cl", seq=2, ack=2)
    answer = q(Command.put("w", items(b"a")), client="cl", seq=1, ack=2)
    assert "duplicate request" in answer["error"]
    assert q(Command.put("w", items(b"b")), client="cl", seq=2, ack=2) == {
        "added": 1,
        "duplicates": 0,
    }
    assert q.stats("w")["ready"] == 2


def test_an_idle_session_expires_by_log_time(q: Driver) -> None:
    put = Command.put("w", items(b"a"))
    q.ok(put, client="cl", seq=1)
    q.time += 3599
    assert q(put, client="cl", seq=1) == {"added": 1, "duplicates": 0}  # remembered
    q.time += 3601
    q.ok(Command.tick())
    assert q(put, client="cl", seq=1) == {"added": 1, "duplicates": 0}  # executed again
    assert q.stats("w")["ready"] == 2


def test_sessions_are_bounded_least_recently_used_first(
    q: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "SESSION_LIMIT", 3)
    put = Command.put("w", items(b"a"))
    for client in ("a", "b", "c"):
        q.ok(put, client=client, seq=1)
    q.ok(put, client="a", seq=1)  # a is now the most recently used
    q.ok(put, client="d", seq=1)  # b goes
    assert q.stats("w")["ready"] == 4
    for client in ("a", "c", "d"):
        q.ok(put, client=client, seq=1)
    assert q.stats("w")["ready"] == 4
    q.ok(put, client="b", seq=1)
    assert q.stats("w")["ready"] == 5


def test_a_session_keeps_a_bounded_window_of_unacknowledged_answers(
    q: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "ANSWER_WINDOW", 2)
    put = Command.put("w", items(b"a"))
    for seq in (1, 2, 3):
        q.ok(put, client="cl", seq=seq)  # never acknowledges
    assert q(put, client="cl", seq=2) == {"added": 1, "duplicates": 0}  # still remembered
    assert "duplicate request" in q(put, client="cl", seq=1)["error"]  # forgotten, not redone
    assert q.stats("w")["ready"] == 3


# -- determinism, snapshots, restarts -------------------------------------------------------


def busy_log(q: Driver) -> None:
    q.ok(Command.create("results", kind="log"))
    q.ok(Command.limit("w", None, 2, 0.5))
    for round_ in range(20):
        q.time += 0.3
        q.ok(
            Command.put(
                "w",
                [
                    Item(b"p%d" % i, key=f"k{round_}-{i % 7}", partition=f"h{i % 3}")
                    for i in range(8)
                ],
            ),
            client="cl",
            seq=round_ + 1,
            ack=round_,
        )
        got = q.claim_ids("w", f"c{round_ % 2}", n=3, lease=1.0)
        if round_ % 3:
            q(Command.complete(f"c{round_ % 2}", got[:2], append={"results": [b"r"]}))
        q(Command.release(f"c{round_ % 2}", got[2:], 0.2))


def test_two_states_fed_the_same_log_are_identical(q: Driver, tmp_path: Path) -> None:
    busy_log(q)
    other = QueueState(tmp_path / "other.db")
    answers = [other.apply(i, data) for i, data in q.log]
    assert other.digest() == q.state.digest()
    assert other.snapshot() == q.state.snapshot()
    replay = QueueState(tmp_path / "third.db")
    assert [replay.apply(i, data) for i, data in q.log] == answers
    other.close()
    replay.close()


def test_snapshot_restore_round_trip_then_the_same_future(q: Driver, tmp_path: Path) -> None:
    busy_log(q)
    half = len(q.log) // 2
    other = QueueState(tmp_path / "other.db")
    for i, data in q.log[:half]:
        other.apply(i, data)
    snap = other.snapshot()
    fresh = QueueState(tmp_path / "fresh.db")
    fresh.apply(1, Command.put("junk", items(b"x")).encode(time=1.0))
    fresh.restore(snap)
    assert fresh.applied_index == half
    assert fresh.digest() == other.digest()
    for i, data in q.log[half:]:
        fresh.apply(i, data)
    assert fresh.digest() == q.state.digest()
    fresh.close()
    reopened = QueueState(tmp_path / "fresh.db")
    assert reopened.digest() == q.state.digest()
    other.close()
    reopened.close()


def test_a_snapshot_through_a_file_round_trips(q: Driver, tmp_path: Path) -> None:
    busy_log(q)
    q.state.snapshot_to(tmp_path / "snap.db")
    fresh = QueueState(tmp_path / "fresh.db")
    fresh.restore_from(tmp_path / "snap.db")
    assert (fresh.applied_index, fresh.digest()) == (q.state.applied_index, q.state.digest())
    with pytest.raises(QueueStateError):
        fresh.restore_from(tmp_path / "missing.db")
    (tmp_path / "bad.db").write_bytes(b"SQLite format 3\x00" + b"\x01" * 5000)
    with pytest.raises(QueueStateError):
        fresh.restore_from(tmp_path / "bad.db")
    assert fresh.digest() == q.state.digest()
    fresh.close()


@pytest.mark.parametrize(
    "garbage",
    [b"", b"not a database at all", b"SQLite format 3\x00" + b"\x00" * 200],
)
def test_restoring_garbage_is_refused_and_keeps_the_state(q: Driver, garbage: bytes) -> None:
    busy_log(q)
    before = q.state.digest()
    with pytest.raises(QueueStateError) as info:
        q.state.restore(garbage)
    assert "\n" not in str(info.value)
    assert q.state.digest() == before
    assert q.ok(Command.tick()) == {}


def test_restoring_a_damaged_snapshot_is_refused(q: Driver) -> None:
    busy_log(q)
    snap = bytearray(q.state.snapshot())
    snap[4096:8192] = b"\xff" * 4096
    before = q.state.digest()
    with pytest.raises(QueueStateError):
        q.state.restore(bytes(snap))
    assert q.state.digest() == before


def test_a_restart_keeps_the_applied_index_and_the_state(q: Driver) -> None:
    busy_log(q)
    digest, index = q.state.digest(), q.state.applied_index
    q.state.close()
    q.state = QueueState(q.path)
    assert (q.state.applied_index, q.state.digest()) == (index, digest)
    assert q.ok(Command.tick()) == {}


def test_without_autocommit_only_committed_entries_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    state = QueueState(path, autocommit=False)
    state.apply(1, Command.put("w", items(b"a")).encode(time=1.0))
    state.commit()
    state.apply(2, Command.put("w", items(b"b")).encode(time=1.0))
    # a crash: the open transaction is lost with the connection
    state._conn.close()
    again = QueueState(path)
    assert again.applied_index == 1
    assert again.query(Query.stats("w"))["ready"] == 1
    again.close()


def test_a_damaged_database_file_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(QueueStateError) as info:
        QueueState(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_database_with_a_damaged_page_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    state = QueueState(path)
    for i in range(1, 40):
        state.apply(
            i,
            Command.put("w", [Item(b"x" * 200, key=f"k{i}-{j}") for j in range(20)]).encode(
                time=1.0
            ),
        )
    state.close()
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b"\x13" * 4096
    path.write_bytes(bytes(data))
    with pytest.raises(QueueStateError) as info:
        QueueState(path)
    assert "\n" not in str(info.value)


def test_a_database_of_another_schema_version_is_refused_with_one_line(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "queue.db"
    QueueState(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET version = ?", (state_module.SCHEMA_VERSION - 1,))
    conn.commit()
    conn.close()
    with pytest.raises(QueueStateError) as info:
        QueueState(path)
    message = str(info.value)
    assert "schema version" in message and "move it away" in message and "\n" not in message


def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    with pytest.raises(QueueStateError):
        QueueState(path)


def test_the_seen_set_places_the_links_of_one_directory_together() -> None:
    digest = state_module._key_digest
    siblings = [digest(f"http://a.example/f/1/{j}/") for j in range(50)]
    siblings.append(digest("http://a.example/f/1/page.html"))
    assert len({d[:8] for d in siblings}) == 1  # one place: host and directory
    assert len({d[8:] for d in siblings}) == len(siblings)  # each its own 16-byte digest
    elsewhere = digest("http://a.example/f/2/0/")
    assert elsewhere[:4] == siblings[0][:4] and elsewhere[4:8] != siblings[0][4:8]
    assert digest("http://b.example/f/1/0/")[:4] != siblings[0][:4]
    assert digest("http://a.example")[:8] == digest("http://a.example/")[:8]
    assert digest("job-000017")[:10] == b"job-000017" and len(digest("job-000017")) == 26
