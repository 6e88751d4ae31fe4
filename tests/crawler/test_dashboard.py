"""The crawl meter (pure), the view built from queue/group/worker stats, its rendering into a
recording rich Console, the progress line, and the refresh loop under trio's MockClock."""

from __future__ import annotations

import io
import itertools
import re
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from rich.console import Console

from ww.crawler.dashboard import (
    CrawlView,
    DashboardState,
    GroupView,
    follow_stats,
    poll_queue,
    progress_line,
    render,
    run_dashboard,
    summary,
)
from ww.crawler.progress import CrawlMeter, eta, sparkline

PEERS = ["aaaaaaaaaa1111111111xxxxxx", "bbbbbbbbbb2222222222yyyyyy", "cccccccccc3333333333zzzzzz"]


def stats(worker: str, **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "worker": worker,
        "host": PEERS[0],
        "in_flight": 0,
        "pages": 0,
        "errors": 0,
        "retries": 0,
        "bytes": 0,
        "status": {},
        "time": 0.0,
        "last_error": None,
    }
    message.update(fields)
    return message


# -- CrawlMeter --------------------------------------------------------------------------------


def test_rate_is_pages_over_the_window_ending_now() -> None:
    meter = CrawlMeter(window=5.0)
    for t in range(11):  # 10 pages a second for 10 s
        meter.feed(stats("w", pages=10 * t), float(t))
    assert meter.rate(10.0) == pytest.approx(10.0)
    # Nothing new since t=10: over (7.5, 12.5] the counter went from 70 to 100.
    assert meter.rate(12.5) == pytest.approx(30 / 5)
    assert meter.rate(20.0) == 0.0


def test_rate_before_a_full_window_uses_the_time_since_the_first_message() -> None:
    meter = CrawlMeter(window=5.0)
    meter.feed(stats("w", pages=0), 100.0)
    meter.feed(stats("w", pages=10), 102.0)
    assert meter.rate(102.0) == pytest.approx(5.0)
    assert meter.rate(100.0) == 0.0


def test_bytes_per_second_and_totals_sum_the_workers() -> None:
    meter = CrawlMeter(window=2.0)
    for t in range(5):
        meter.feed(stats("a", pages=t, bytes=1000 * t), float(t))
        meter.feed(stats("b", host=PEERS[1], pages=3 * t, bytes=500 * t), float(t))
    snap = meter.snapshot(4.0)
    assert (snap.pages, snap.bytes) == (16, 6000)
    assert snap.pages_per_s == pytest.approx(4.0)
    assert snap.bytes_per_s == pytest.approx(1500.0)


def test_a_restarted_worker_keeps_what_it_counted_before() -> None:
    meter = CrawlMeter(window=5.0)
    meter.feed(stats("w", pages=50, bytes=500, status={"200": 50}), 0.0)
    meter.feed(stats("w", pages=5, bytes=50, status={"200": 4, "404": 1}), 1.0)
    snap = meter.snapshot(1.0)
    assert (snap.pages, snap.bytes) == (55, 550)
    assert snap.status == (("200", 54), ("404", 1))
    assert snap.workers[0].pages == 55
    assert snap.pages_per_s == pytest.approx(5.0)


def test_per_worker_rows_have_host_in_flight_rate_and_errors() -> None:
    meter = CrawlMeter(window=4.0, stale_after=3.0)
    for t in range(5):
        meter.feed(stats("w1", host=PEERS[0], in_flight=3, pages=2 * t, errors=t), float(t))
        meter.feed(stats("w0", host=PEERS[1], in_flight=1, pages=t, retries=2), float(t))
    snap = meter.snapshot(4.0)
    assert [r.worker for r in snap.workers] == ["w0", "w1"]
    w0, w1 = snap.workers
    assert (w0.host, w0.in_flight, w0.pages, w0.retries, w0.stale) == (PEERS[1], 1, 4, 2, False)
    assert (w1.host, w1.in_flight, w1.pages, w1.errors) == (PEERS[0], 3, 8, 4)
    assert w0.pages_per_s == pytest.approx(1.0)
    assert w1.pages_per_s == pytest.approx(2.0)
    assert snap.in_flight == 4


def test_a_silent_worker_goes_stale_and_its_in_flight_stops_counting() -> None:
    meter = CrawlMeter(stale_after=3.0)
    meter.feed(stats("gone", in_flight=5, pages=7), 0.0)
    meter.feed(stats("live", in_flight=2), 3.5)
    snap = meter.snapshot(3.5)
    rows = {r.worker: r for r in snap.workers}
    assert rows["gone"].stale and rows["gone"].in_flight == 0 and rows["gone"].pages == 7
    assert not rows["live"].stale
    assert snap.in_flight == 2


def test_status_codes_add_up_across_workers() -> None:
    meter = CrawlMeter()
    meter.feed(stats("a", status={"200": 5, "404": 1}), 0.0)
    meter.feed(stats("b", status={"200": 2, "503": 3}), 0.0)
    assert meter.snapshot(0.0).status == (("200", 7), ("404", 1), ("503", 3))


def test_the_last_errors_are_kept_newest_last_and_bounded() -> None:
    meter = CrawlMeter(max_errors=2)
    meter.feed(stats("a", errors=1, last_error="e1"), 1.0)
    meter.feed(stats("a", errors=1, last_error="e1"), 1.25)  # the same report again
    meter.feed(stats("a", errors=2, last_error="e1"), 1.5)  # a new failure, same text
    meter.feed(stats("b", retries=1, last_error="e2"), 2.0)
    errors = meter.snapshot(2.0).errors_last
    assert [(e.worker, e.message, e.time) for e in errors] == [("a", "e1", 1.5), ("b", "e2", 2.0)]


def test_history_holds_pages_per_second_of_each_completed_bucket() -> None:
    meter = CrawlMeter(bucket=1.0, history=3)
    meter.feed(stats("w", pages=0), 10.0)
    meter.feed(stats("w", pages=4), 10.5)
    meter.feed(stats("w", pages=6), 11.2)
    meter.feed(stats("w", pages=6), 12.9)
    meter.feed(stats("w", pages=9), 13.1)
    assert meter.snapshot(13.5).history == (4.0, 2.0, 0.0)
    assert meter.snapshot(15.0).history == (0.0, 3.0, 0.0)  # the last 3 complete seconds


def test_malformed_stats_are_counted_and_change_nothing() -> None:
    meter = CrawlMeter()
    meter.feed(stats("w", pages=3), 0.0)
    bad: list[Any] = [
        [1, 2],
        {"pages": 3},
        stats("w", pages=-1),
        stats("w", pages="many"),
        stats("w", status={"200": "x"}),
    ]
    assert not any(meter.feed(m, 1.0) for m in bad)
    assert not meter.feed_packed(b"\xc1", 1.0)
    assert meter.malformed == 6
    assert meter.snapshot(1.0).pages == 3
    assert meter.feed_packed(msgpack.packb(stats("w", pages=4)), 1.0)
    assert meter.snapshot(1.0).pages == 4


def test_eta_under_max_pages() -> None:
    assert eta(100, 1000, 10.0) == pytest.approx(90.0)
    assert eta(1000, 1000, 10.0) == 0.0
    assert eta(100, 1000, 0.0) is None
    assert eta(100, None, 10.0) is None
    meter = CrawlMeter(window=5.0)
    meter.feed(stats("w", pages=0), 0.0)
    meter.feed(stats("w", pages=50), 5.0)
    assert meter.eta(5.0, done=50, max_pages=250) == pytest.approx(20.0)


def test_sparkline_scales_to_the_maximum() -> None:
    assert sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█"
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([1, 2, 3], width=2) == "▆█"
    assert sparkline([]) == ""


# -- the view and its rendering ----------------------------------------------------------------

NOW = 1_700_000_100.0
STARTED = NOW - 125.0


def crawl_view() -> CrawlView:
    """3 workers, 10 hosts, 3 replicas, a max of 5,000 pages."""
    meter = CrawlMeter(window=5.0)
    for step in range(41):
        t = NOW - 10 + step * 0.25
        for i in range(3):
            meter.feed(
                stats(
                    f"worker-{i}",
                    host=PEERS[i],
                    in_flight=i + 1,
                    pages=step * (i + 1),
                    errors=i,
                    retries=2 * i,
                    bytes=step * 10_000,
                    status={"200": step * (i + 1), "404": i},
                    last_error=f"timed out: http://127.0.0.{i + 2}/slow" if i else None,
                ),
                t,
            )
    frontier = {
        "kind": "work",
        "ready": 2100,
        "leased": 8,
        "delayed": 12,
        "done": 230,
        "dead": 0,
        "seen": 3456,
        "appended": 0,
        "first": 0,
        "partitions": [
            [f"127.0.0.{i + 2}:80{i:02d}", 100 + 11 * i, i % 3, NOW + 0.5 if i == 9 else 0.0]
            for i in range(10)
        ],
    }
    results = {"kind": "log", "appended": 1234}
    group = {
        "leader": PEERS[1],
        "term": 7,
        "commit": 9876,
        "members": [
            {"peer": p, "term": 7, "commit": 9876, "applied": 9876 - 4 * i}
            for i, p in enumerate(PEERS)
        ],
    }
    return CrawlView.build(
        frontier=frontier,
        results=results,
        group=group,
        meter=meter,
        max_pages=5000,
        started=STARTED,
        now=NOW,
        delays={"127.0.0.11:8009": 2.0},
    )


def rendered(view: CrawlView, width: int = 160) -> list[str]:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(view))
    return console.export_text().splitlines()


def line_with(lines: list[str], *needles: str) -> str:
    found = [line for line in lines if all(n in line for n in needles)]
    assert len(found) == 1, (needles, lines)
    return found[0]


def test_view_takes_the_figures_from_the_queue_the_group_and_the_workers() -> None:
    view = crawl_view()
    assert (view.done, view.discovered, view.queued, view.delayed, view.leased) == (
        1234,
        3456,
        2100,
        12,
        8,
    )
    assert (view.in_flight, view.failed, view.retried) == (6, 3, 6)
    assert view.pages_per_s == pytest.approx(24.0)
    assert view.eta == pytest.approx((5000 - 1234) / 24.0)
    assert view.hosts[0].host == "127.0.0.11:8009"  # the busiest first
    assert view.hosts[0].next_in == pytest.approx(0.5)
    assert view.group.leader == PEERS[1]
    assert [r.leader for r in view.group.replicas] == [False, True, False]
    assert [r.lag for r in view.group.replicas] == [0, 4, 8]


def test_the_dashboard_shows_the_numbers_in_their_rows() -> None:
    lines = rendered(crawl_view())
    text = "\n".join(lines)
    assert "ww-crawl  2m05s" in text
    counts = line_with(lines, "done")
    for figure in (
        "done 1,234 / 5,000",
        "discovered 3,456",
        "queued 2,100 (12 delayed)",
        "in flight 6 (8 leased)",
        "failed 3",
        "retried 6",
    ):
        assert figure in counts
    rates = line_with(lines, "pages/s 24.0")
    assert "bytes/s 120.0 kB/s" in rates
    assert re.search(r"pages/s 24\.0 [▁▂▃▄▅▆▇█]{10}", rates)
    assert f"ETA {(5000 - 1234) // 24 // 60}m{round((5000 - 1234) / 24) % 60:02d}s" in rates
    assert "status 200: 240  404: 3" in line_with(lines, "status 200")
    # hosts: queue, leased, delay, next claim — the busiest first
    assert re.search(r"127\.0\.0\.11:8009\s+199\s+0\s+2s\s+0\.5s", line_with(lines, "127.0.0.11:"))
    assert re.search(r"127\.0\.0\.2:8000\s+100\s+0\s+—\s+now", line_with(lines, "127.0.0.2:"))
    # workers: host, in flight, pages, pages/s, errors
    assert re.search(
        r"worker-0\s+aaaaaaaaaa\s+1\s+40\s+4\.0\s+0\s+│$", line_with(lines, "worker-0 ")
    )
    assert re.search(
        r"worker-2\s+cccccccccc\s+3\s+120\s+12\.0\s+2", line_with(lines, "worker-2  ccc")
    )
    # the Raft group: leader, term, commit; per replica role, applied, lag
    assert "leader bbbbbbbbbb  term 7  commit 9,876" in line_with(lines, "raft")
    assert re.search(
        r"bbbbbbbbbb\s+leader\s+9,876\s+9,872\s+4", line_with(lines, "bbbbbbbbbb  leader")
    )
    assert re.search(
        r"cccccccccc\s+follower\s+9,876\s+9,868\s+8", line_with(lines, "cccccccccc  foll")
    )
    # the last errors, newest first
    err_lines = [line for line in lines if "timed out" in line]
    assert "worker-2  timed out: http://127.0.0.4/slow" in err_lines[0]
    assert "worker-1  timed out: http://127.0.0.3/slow" in err_lines[1]


def test_a_narrow_terminal_cuts_lines_rather_than_wrapping_them() -> None:
    wide, narrow = rendered(crawl_view()), rendered(crawl_view(), width=60)
    assert len(narrow) == len(wide)
    assert all(len(line) <= 60 for line in narrow)


def test_no_eta_without_max_pages_and_a_group_that_cannot_be_asked() -> None:
    view = CrawlView.build(
        frontier=None,
        results=None,
        group={"error": "Raft group unreachable: no leader"},
        meter=CrawlMeter(),
        max_pages=None,
        started=NOW,
        now=NOW,
    )
    text = "\n".join(rendered(view))
    assert "ETA" not in text
    assert "Raft group unreachable: no leader" in text
    assert "ETA" not in progress_line(view)


def test_group_status_as_a_map_of_members_computes_the_lag() -> None:
    group = GroupView.from_status(
        {
            "term": 2,
            "commit": 50,
            "members": {"p1": {"leader": True, "applied": 50}, "p2": {"applied": 41}},
        }
    )
    assert group.leader == "p1"
    assert [(r.peer, r.leader, r.lag) for r in group.replicas] == [
        ("p1", True, 0),
        ("p2", False, 9),
    ]
    assert GroupView.from_status("garbage").error  # type: ignore[arg-type]


def test_progress_line_and_summary_carry_the_figures() -> None:
    view = crawl_view()
    line = progress_line(view)
    assert "\n" not in line
    for figure in (
        "2m05s",
        "done 1,234 / 5,000",
        "discovered 3,456",
        "queued 2,100",
        "in flight 6",
        "failed 3",
        "retried 6",
        "24.0 pages/s",
        "120.0 kB/s",
        "ETA 2m37s",
        "leader bbbbbbbbbb term 7",
    ):
        assert figure in line
    text = summary(view)
    assert "crawled 1,234 pages in 2m05s (9.9 pages/s" in text
    assert "failed 3, retried 6" in text
    assert "status 200: 240  404: 3" in text


# -- the loops ---------------------------------------------------------------------------------


def counting_view() -> tuple[list[float], Any]:
    """A view source whose `done` counts the calls; records trio's clock at each."""
    calls: list[float] = []

    def get_view() -> CrawlView:
        calls.append(trio.current_time())
        return CrawlView.build(
            frontier=None,
            results={"appended": len(calls)},
            group=None,
            meter=CrawlMeter(),
            max_pages=None,
            started=0.0,
            now=float(len(calls)),
        )

    return calls, get_view


async def test_the_dashboard_redraws_at_least_four_times_a_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    calls, get_view = counting_view()
    with trio.move_on_after(10):
        await run_dashboard(get_view, console=console, refresh=0.25)
    assert len(calls) >= 40
    assert max(b - a for a, b in itertools.pairwise(calls)) <= 0.25 + 1e-9
    text = out.getvalue()
    for n in (2, 20, len(calls)):  # each view was drawn, not only asked for
        assert f"done {n} " in text
    assert f"crawled {len(calls)} pages" in text  # the summary when it closes


async def test_an_async_view_source_is_awaited(autojump_clock: trio.testing.MockClock) -> None:
    calls, get_view = counting_view()

    async def get_view_async() -> CrawlView:
        await trio.sleep(0)
        view: CrawlView = get_view()
        return view

    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    with trio.move_on_after(2):
        await run_dashboard(get_view_async, console=console, refresh=0.25)
    assert len(calls) >= 8


async def test_without_a_terminal_it_prints_a_line_every_few_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    calls, get_view = counting_view()
    with trio.move_on_after(12):
        await run_dashboard(get_view, console=console, line_interval=5.0)
    lines = out.getvalue().splitlines()
    assert [line.split(" discovered")[0] for line in lines[:3]] == [
        "1s done 1",
        "2s done 2",
        "3s done 3",
    ]
    assert calls == [0.0, 5.0, 10.0]
    assert lines[3].startswith("crawled 3 pages")
    assert len(lines) == 4


async def test_follow_stats_feeds_the_meter() -> None:
    send, receive = trio.open_memory_channel[bytes](10)
    meter = CrawlMeter()
    async with send:
        await send.send(msgpack.packb(stats("w", pages=3)))
        await send.send(b"not msgpack \xc1")
        await send.send(msgpack.packb(stats("w", pages=5)))
    await follow_stats(receive, meter, clock=lambda: 1.0)
    assert meter.snapshot(1.0).pages == 5
    assert meter.malformed == 1


class Queue:
    """Answers the two questions the dashboard asks; the group cannot answer."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def stats(self, topic: str) -> dict[str, Any]:
        self.asked.append(topic)
        return {"ready": 5, "seen": 9} if topic == "crawl.frontier" else {"appended": 4}

    async def status(self) -> dict[str, Any]:
        raise ConnectionError("no replica answers")


async def test_poll_queue_keeps_the_latest_answers(autojump_clock: trio.testing.MockClock) -> None:
    state = DashboardState(max_pages=None, started=0.0, clock=lambda: 1.0)
    queue = Queue()
    with trio.move_on_after(1.25):
        await poll_queue(queue, state, interval=0.5)
    assert queue.asked.count("crawl.frontier") == 3  # at 0, 0.5 and 1.0
    view = state.view()
    assert (view.done, view.queued, view.discovered) == (4, 5, 9)
    assert view.group.error == "Raft group unreachable: no replica answers"
