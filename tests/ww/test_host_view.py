import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.host.view import GossipError, HostRecord, Membership


def rec(peer, ttl=5.0, **meta):
    return HostRecord(peer, (f"127.0.0.1:{len(peer)}",), meta, ttl)


def test_heartbeat_adds_and_ttl_expires():
    view = Membership(rec("me"))
    assert view.observe(rec("b"), age=0.0, now=10.0)
    assert [m.record.peer for m in view.live(now=12.0)] == ["me", "b"]
    assert view.expire(now=14.9) == []
    assert view.expire(now=15.0) == ["b"]
    assert [m.record.peer for m in view.live(now=15.0)] == ["me"]


def test_a_fresh_heartbeat_keeps_a_host_alive():
    view = Membership(rec("me"))
    view.observe(rec("b"), 0.0, now=0.0)
    for t in range(1, 20):
        assert not view.observe(rec("b"), 0.0, now=float(t))
        assert view.expire(now=t + 0.5) == []
    assert "b" in view


def test_gossip_carries_age_so_second_hand_news_expires_on_time():
    a = Membership(rec("a"))
    b = Membership(rec("b"))
    a.observe(rec("c", ttl=3.0), 0.0, now=100.0)
    # b hears of c through a, 2 seconds after c's last heartbeat
    assert b.merge(a.gossip(now=102.0), now=50.0) == ["a", "c"]
    assert b.get("c", now=50.5) is not None
    assert b.expire(now=50.9) == []
    assert b.expire(now=51.0) == ["c"]


def test_stale_gossip_does_not_revive_or_rewind():
    view = Membership(rec("me"))
    view.observe(rec("b", ttl=2.0), 0.0, now=10.0)
    assert not view.observe(rec("b", ttl=2.0), age=1.5, now=10.5)  # older news than we have
    assert view.get("b", now=11.9) is not None
    view.expire(now=12.0)
    assert not view.observe(rec("b", ttl=2.0), age=2.0, now=12.0)  # news as old as the TTL
    assert "b" not in view


def test_newer_record_replaces_meta_and_addrs():
    view = Membership(rec("me"))
    view.observe(rec("b", role="old"), 0.0, now=1.0)
    view.observe(HostRecord("b", ("127.0.0.1:9",), {"role": "new"}, 5.0), 0.0, now=2.0)
    member = view.get("b", now=2.0)
    assert member is not None
    assert member.record.meta == {"role": "new"}
    assert member.record.addrs == ("127.0.0.1:9",)


def test_own_record_is_never_taken_from_gossip():
    view = Membership(rec("me", role="real"))
    view.observe(HostRecord("me", (), {"role": "fake"}, 5.0), 0.0, now=1.0)
    assert view.live(now=1.0)[0].record.meta == {"role": "real"}


def test_gossip_lists_self_with_age_zero():
    view = Membership(rec("me"))
    view.observe(rec("b"), 0.5, now=1.0)
    wire = view.gossip(now=2.0)
    assert [(r["peer"], r["age"]) for r in wire] == [("me", 0.0), ("b", 1.5)]


@pytest.mark.parametrize(
    "raw",
    [
        "nope",
        {"addrs": [], "ttl": 1, "age": 0},
        {"peer": "x", "addrs": "127.0.0.1:1", "ttl": 1, "age": 0},
        {"peer": "x", "addrs": [], "meta": {"k": 1}, "ttl": 1, "age": 0},
        {"peer": "x", "addrs": [], "ttl": -1, "age": 0},
        {"peer": "x", "addrs": [], "ttl": True, "age": 0},
        {"peer": "x", "addrs": [], "ttl": 1, "age": float("nan")},
    ],
)
def test_malformed_gossip_is_refused_with_one_line(raw):
    view = Membership(rec("me"))
    with pytest.raises(GossipError) as info:
        view.merge([raw], now=0.0)
    assert "\n" not in str(info.value)
    assert [m.record.peer for m in view.live(0.0)] == ["me"]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=200),
    st.integers(1, 150),
)
def test_relayed_gossip_never_keeps_a_silent_host_past_its_ttl(exchanges, stops_at):
    """Hosts gossip in any order, one exchange per tick of 0.1 s; h0 stops heartbeating at
    tick `stops_at`. No view may list h0 once its TTL has passed since its last heartbeat."""
    ttl, tick = 1.0, 0.1
    views = [Membership(rec(f"h{i}", ttl=ttl)) for i in range(5)]
    last_heartbeat = 0.0
    for step, (src, dst) in enumerate(exchanges):
        now = step * tick
        if src == dst:
            continue
        if src == 0 and step >= stops_at:
            continue  # h0 is silent: it sends nothing any more
        if src == 0:
            last_heartbeat = now
        views[dst].merge(views[src].gossip(now), now)
        for view in views[1:]:
            member = view.get("h0", now)
            if now - last_heartbeat >= ttl:
                assert member is None
            elif member is not None:
                assert member.last_seen <= last_heartbeat + 1e-9
