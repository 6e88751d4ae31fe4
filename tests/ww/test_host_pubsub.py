import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.host.pubsub import Envelope, PubSubError, Router


def drain(sub):
    out = []
    while True:
        try:
            out.append(sub.receive.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_local_subscribers_get_published_messages():
    router = Router("a")
    s1, s2 = router.subscribe("t"), router.subscribe("t")
    other = router.subscribe("u")
    assert router.publish("t", b"hi", links=[]) == []
    assert drain(s1) == [b"hi"]
    assert drain(s2) == [b"hi"]
    assert drain(other) == []


async def test_slow_subscriber_loses_messages_but_never_blocks():
    router = Router("a")
    sub = router.subscribe("t", capacity=2)
    for i in range(5):
        router.publish("t", bytes([i]), links=[])
    assert drain(sub) == [b"\x00", b"\x01"]
    assert sub.dropped == 3


async def test_unsubscribe_closes_the_queue():
    router = Router("a")
    sub = router.subscribe("t")
    router.unsubscribe(sub)
    assert router.subscribers("t") == 0
    router.publish("t", b"x", links=[])
    with pytest.raises(trio.EndOfChannel):
        await sub.receive.receive()


class Mesh:
    """Routers wired by explicit links; `run` moves envelopes until quiet."""

    def __init__(self, links):
        self.links = links
        self.routers = {peer: Router(peer) for peer in links}
        self.subs = {peer: r.subscribe("t") for peer, r in self.routers.items()}
        self.sent = 0

    def publish(self, peer, data):
        self.run([(peer, out) for out in self.routers[peer].publish("t", data, self.links[peer])])

    def run(self, queue):
        while queue:
            _sender, (target, env) = queue.pop(0)
            self.sent += 1
            wire = Envelope.from_wire(env.to_wire())
            for out in self.routers[target].receive(wire, self.links[target]):
                queue.append((target, out))


async def test_full_mesh_sends_once_per_host_and_nobody_forwards():
    peers = ["a", "b", "c", "d"]
    mesh = Mesh({p: [q for q in peers if q != p] for p in peers})
    mesh.publish("b", b"m1")
    assert mesh.sent == 3
    assert {p: drain(s) for p, s in mesh.subs.items()} == {p: [b"m1"] for p in peers}


async def test_partial_mesh_floods_without_loops_or_duplicates():
    # a ring with a chord: a-b-c-d-e-a and a-c
    links = {
        "a": ["b", "e", "c"],
        "b": ["a", "c"],
        "c": ["b", "d", "a"],
        "d": ["c", "e"],
        "e": ["d", "a"],
    }
    mesh = Mesh(links)
    mesh.publish("d", b"x")
    mesh.publish("a", b"y")
    for peer, sub in mesh.subs.items():
        assert drain(sub) == [b"x", b"y"], peer
    assert mesh.sent < 2 * sum(len(v) for v in links.values())


async def test_duplicate_envelope_is_dropped():
    a, b = Router("a"), Router("b")
    sub = b.subscribe("t")
    [(_, env)] = a.publish("t", b"once", links=["b"])
    b.receive(env, links=["a"])
    b.receive(env, links=["a"])
    assert drain(sub) == [b"once"]


async def test_a_restarted_origin_is_not_mistaken_for_a_duplicate():
    b = Router("b")
    sub = b.subscribe("t")
    for epoch in (1, 2):
        [(_, env)] = Router("a", epoch=epoch).publish("t", b"hello", links=["b"])
        b.receive(env, links=["a"])
    assert drain(sub) == [b"hello", b"hello"]


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"topic": "t", "origin": "a", "epoch": 1, "seq": 1, "data": "str", "reached": []},
        {"topic": "", "origin": "a", "epoch": 1, "seq": 1, "data": b"", "reached": []},
        {"topic": "t", "origin": "a", "epoch": "1", "seq": 1, "data": b"", "reached": []},
        {"topic": "t", "origin": "a", "epoch": 1, "seq": 1, "data": b"", "reached": [3]},
    ],
)
def test_malformed_envelopes_are_refused(raw):
    with pytest.raises(PubSubError):
        Envelope.from_wire(raw)


def test_bad_topics_and_data_are_refused():
    router = Router("a")
    with pytest.raises(PubSubError, match="non-empty"):
        router.subscribe("")
    with pytest.raises(PubSubError, match="bytes"):
        router.publish("t", "text", links=[])  # type: ignore[arg-type]


@st.composite
def connected_graphs(draw):
    """A random connected undirected graph on 2..7 hosts, as adjacency lists."""
    n = draw(st.integers(2, 7))
    peers = [f"h{i}" for i in range(n)]
    edges = {(peers[i], peers[draw(st.integers(0, i - 1))]) for i in range(1, n)}  # a tree
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=10))
    edges |= {(peers[a], peers[b]) for a, b in extra if a != b}
    links = {p: set() for p in peers}
    for a, b in edges:
        links[a].add(b)
        links[b].add(a)
    return {p: sorted(q) for p, q in links.items()}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(connected_graphs(), st.randoms(use_true_random=False))
def test_any_connected_mesh_delivers_each_message_once_everywhere(links, rng):
    async def run():
        mesh = Mesh(links)
        publishers = rng.choices(sorted(links), k=3)
        queue = []
        for i, peer in enumerate(publishers):
            queue += [
                (peer, out) for out in mesh.routers[peer].publish("t", bytes([i]), links[peer])
            ]
        rng.shuffle(queue)  # envelopes overtake each other on different paths
        mesh.run(queue)
        for peer, sub in mesh.subs.items():
            assert sorted(drain(sub)) == [bytes([i]) for i in range(3)], peer
        assert mesh.sent <= 3 * sum(len(v) for v in links.values())

    trio.run(run)
