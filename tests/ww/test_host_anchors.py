import pytest

from ww.host.anchors import AnchorTree
from ww.host.lease import Lease


def make_tree():
    removed = []
    return AnchorTree(on_removed=removed.append), removed


def test_store_load_and_ls():
    tree, _ = make_tree()
    conn = Lease("conn")
    tree.store(("a", "b"), b"v1", conn)
    tree.store(("a", "c"), b"v2", conn)
    assert tree.load(("a", "b")) == b"v1"
    assert tree.load(("a",)) is None
    assert tree.ls(()) == ["a"]
    assert tree.ls(("a",)) == ["b", "c"]
    assert tree.ls(("nope",)) == []
    assert len(tree) == 2


def test_values_vanish_when_their_lease_ends_and_empty_branches_with_them():
    tree, removed = make_tree()
    conn, proc = Lease("conn"), Lease("proc")
    tree.store(("a", "b", "c"), b"conn's", conn)
    tree.store(("a", "x"), b"proc's", proc)
    conn.end()
    assert removed == [b"conn's"]
    assert tree.ls(("a",)) == ["x"]
    assert tree.ls(()) == ["a"]
    proc.end()
    assert tree.ls(()) == []
    assert len(tree) == 0


def test_a_value_above_another_lease_keeps_its_branch():
    tree, _ = make_tree()
    upper, lower = Lease("upper"), Lease("lower")
    tree.store(("a",), b"up", upper)
    tree.store(("a", "b"), b"low", lower)
    upper.end()
    assert tree.ls(()) == ["a"]
    assert tree.load(("a", "b")) == b"low"
    lower.end()
    assert tree.ls(()) == []


def test_overwrite_transfers_ownership_and_reports_the_old_value():
    tree, removed = make_tree()
    first, second = Lease("first"), Lease("second")
    tree.store(("k",), b"old", first)
    tree.store(("k",), b"new", second)
    assert removed == [b"old"]
    first.end()
    assert tree.load(("k",)) == b"new"
    assert tree.owned_by(second) == [("k",)]
    second.end()
    assert tree.load(("k",)) is None
    assert removed == [b"old", b"new"]


def test_storing_none_clears():
    tree, removed = make_tree()
    lease = Lease("l")
    tree.store(("a", "b"), b"v", lease)
    tree.store(("a", "b"), None, lease)
    assert tree.ls(()) == []
    assert removed == [b"v"]
    assert tree.owned_by(lease) == []


def test_an_ended_lease_cannot_store():
    tree, _ = make_tree()
    lease = Lease("gone")
    lease.end()
    with pytest.raises(ValueError, match="has ended"):
        tree.store(("a",), b"v", lease)
    assert len(tree) == 0


def test_lease_runs_callbacks_once_even_when_one_fails():
    lease = Lease("l")
    ran = []
    lease.on_end(lambda: ran.append(1))
    lease.on_end(lambda: 1 / 0)
    lease.on_end(lambda: ran.append(3))
    lease.end()
    lease.end()
    assert ran == [3, 1]
    lease.on_end(lambda: ran.append("late"))
    assert ran == [3, 1, "late"]
