"""The live crawl dashboard: a frozen `CrawlView` built from plain inputs (the queue's stats,
the Raft group's status, a `CrawlMeter` fed by the workers' stats), a cheap `render` of it, a
one-line `progress_line` for logs, and `run_dashboard`, the trio loop that shows either.

The loop only renders: whatever queries the queue (`poll_queue`) or follows the workers' stats
(`follow_stats`) runs in its own task and leaves its latest answer in a `DashboardState`, so a
slow query never delays a refresh and the refresh never waits on the crawl.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from rich import box
from rich.console import Console, Group, RenderableType
from rich.filesize import decimal
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from ww.crawler.progress import CrawlMeter, ErrorLine, MeterSnapshot, WorkerRow, eta, sparkline

log = logging.getLogger(__name__)

__all__ = [
    "CrawlView",
    "DashboardState",
    "GroupView",
    "HostRow",
    "ReplicaRow",
    "follow_stats",
    "poll_queue",
    "progress_line",
    "render",
    "run_dashboard",
    "run_progress",
    "summary",
]

FRONTIER = "crawl.frontier"
RESULTS = "crawl.results"
SPARK_WIDTH = 30
MAX_HOSTS = 10
PEER_CHARS = 10


@dataclass(frozen=True, slots=True)
class HostRow:
    """One busy host: items ready in its queue, leased now, its politeness delay (when known)
    and the seconds until the queue lets the next item of it be claimed."""

    host: str
    queued: int
    leased: int
    delay: float | None
    next_in: float


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    peer: str
    leader: bool
    term: int | None
    commit: int | None
    applied: int | None
    lag: int | None


@dataclass(frozen=True, slots=True)
class GroupView:
    """The Raft group as last reported; `error` when it could not be asked."""

    leader: str | None = None
    term: int | None = None
    commit: int | None = None
    replicas: tuple[ReplicaRow, ...] = ()
    error: str | None = None

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> GroupView:
        """Read the queue client's `status()` answer: {"leader", "term", "commit", "members"}
        where members is a list of maps (or a map peer → map) with "peer", "leader", "term",
        "commit", "applied", "lag". Missing or mistyped fields show as unknown."""
        if status is None:
            return cls(error="waiting for the Raft group")
        if not isinstance(status, Mapping):
            return cls(error="the Raft group's status is not a map")
        if isinstance(status.get("error"), str):
            return cls(error=status["error"])
        leader = _str(status.get("leader"))
        commit = _int(status.get("commit"))
        members = status.get("members", ())
        if isinstance(members, Mapping):
            members = [
                {"peer": k, **v} if isinstance(v, Mapping) else {} for k, v in members.items()
            ]
        rows = []
        for m in members if isinstance(members, list | tuple) else ():
            if not isinstance(m, Mapping):
                continue
            peer = _str(m.get("peer")) or _str(m.get("id")) or "?"
            applied = _int(m.get("applied"))
            lag = _int(m.get("lag"))
            if lag is None and commit is not None and applied is not None:
                lag = max(0, commit - applied)
            is_leader = m.get("leader")
            rows.append(
                ReplicaRow(
                    peer=peer,
                    leader=is_leader if isinstance(is_leader, bool) else peer == leader,
                    term=_int(m.get("term")),
                    commit=_int(m.get("commit")),
                    applied=applied,
                    lag=lag,
                )
            )
        if leader is None:
            leader = next((r.peer for r in rows if r.leader), None)
        return cls(
            leader=leader, term=_int(status.get("term")), commit=commit, replicas=tuple(rows)
        )


@dataclass(frozen=True, slots=True)
class CrawlView:
    """Everything the dashboard shows at one instant.

    done: results in crawl.results; discovered: URLs ever put in the frontier (its seen-set);
    queued/delayed/leased: the frontier's items; in_flight: pages the live workers are
    fetching; failed/retried: the workers' error and retry counts; dead: items the queue gave
    up on. Times are seconds since the epoch (`now`, `started`) or seconds (`elapsed`, `eta`).
    """

    done: int
    discovered: int
    queued: int
    delayed: int
    leased: int
    in_flight: int
    failed: int
    retried: int
    dead: int
    bytes: int
    pages_per_s: float
    bytes_per_s: float
    history: tuple[float, ...]
    status: tuple[tuple[str, int], ...]
    hosts: tuple[HostRow, ...]
    workers: tuple[WorkerRow, ...]
    group: GroupView
    errors: tuple[ErrorLine, ...]
    max_pages: int | None
    started: float
    now: float
    eta: float | None

    @property
    def elapsed(self) -> float:
        return max(0.0, self.now - self.started)

    @classmethod
    def build(
        cls,
        *,
        frontier: Mapping[str, Any] | None,
        results: Mapping[str, Any] | None,
        group: Mapping[str, Any] | None,
        meter: CrawlMeter | MeterSnapshot,
        max_pages: int | None,
        started: float,
        now: float,
        delays: Mapping[str, float] | None = None,
    ) -> CrawlView:
        """Build a view from the frontier's and results' `stats` answers (None: not known
        yet), the group's `status` answer, the meter, and the per-host delays known from
        crawl.robots (host → seconds)."""
        snap = meter.snapshot(now) if isinstance(meter, CrawlMeter) else meter
        f = frontier if isinstance(frontier, Mapping) else {}
        r = results if isinstance(results, Mapping) else {}
        done = _int(r.get("appended"))
        if done is None:
            done = snap.pages
        delays = delays or {}
        hosts = []
        partitions = f.get("partitions", ())
        for p in partitions if isinstance(partitions, list | tuple) else ():
            if not isinstance(p, list | tuple) or len(p) < 4:
                continue
            host = _str(p[0]) or "(none)"
            next_claim = p[3] if isinstance(p[3], int | float) else 0.0
            hosts.append(
                HostRow(
                    host=host,
                    queued=_int(p[1]) or 0,
                    leased=_int(p[2]) or 0,
                    delay=delays.get(host),
                    next_in=max(0.0, next_claim - now),
                )
            )
        hosts.sort(key=lambda h: (-(h.queued + h.leased), h.host))
        return cls(
            done=done,
            discovered=_int(f.get("seen")) or 0,
            queued=_int(f.get("ready")) or 0,
            delayed=_int(f.get("delayed")) or 0,
            leased=_int(f.get("leased")) or 0,
            in_flight=snap.in_flight,
            failed=snap.errors,
            retried=snap.retries,
            dead=_int(f.get("dead")) or 0,
            bytes=snap.bytes,
            pages_per_s=snap.pages_per_s,
            bytes_per_s=snap.bytes_per_s,
            history=snap.history,
            status=snap.status,
            hosts=tuple(hosts[:MAX_HOSTS]),
            workers=snap.workers,
            group=GroupView.from_status(group),
            errors=snap.errors_last,
            max_pages=max_pages,
            started=started,
            now=now,
            eta=eta(done, max_pages, snap.pages_per_s),
        )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.hex()
    return value if isinstance(value, str) and value else None


# -- formatting ------------------------------------------------------------------------------


def _n(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _peer(peer: str | None) -> str:
    if peer is None:
        return "—"
    return peer[:PEER_CHARS]


def _done(view: CrawlView) -> str:
    if view.max_pages is None:
        return _n(view.done)
    return f"{_n(view.done)} / {_n(view.max_pages)}"


def _status_codes(view: CrawlView) -> str:
    return "  ".join(f"{code}: {_n(n)}" for code, n in view.status) or "—"


# -- rendering -------------------------------------------------------------------------------


def _block(
    title: Text | str,
    header: tuple[str, ...],
    rows: list[tuple[tuple[str, ...], str]],
    numeric: tuple[bool, ...],
    limits: dict[int, int] | None = None,
) -> list[Text]:
    """A small table as lines of text: title, header, one line per (cells, style) row. Cells
    in column i are cut to limits[i] characters; numeric columns are right-aligned."""
    limits = limits or {}
    cut = [tuple(_cut(c, limits.get(i)) for i, c in enumerate(cells)) for cells, _ in rows]
    widths = [max([len(h), *(len(r[i]) for r in cut)]) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if numeric[i] else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [title if isinstance(title, Text) else Text(title, "bold"), Text(line(header), "dim")]
    out.extend(Text(line(c), style) for c, (_, style) in zip(cut, rows, strict=True))
    return out


def _cut(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def _beside(left: list[Text], right: list[Text], gap: int = 4) -> list[Text]:
    width = max((t.cell_len for t in left), default=0) + gap
    out = []
    for i in range(max(len(left), len(right))):
        line = left[i].copy() if i < len(left) else Text()
        if i < len(right):
            line.pad_right(width - line.cell_len)
            line.append_text(right[i])
        out.append(line)
    return out


def render(view: CrawlView) -> RenderableType:
    """The dashboard for one view: counts, rates, hosts, workers, the Raft group, errors.

    Plain lines of text rather than rich tables, so that a frame stays cheap to draw at 4 Hz
    (benchmarks/dashboard_render.py measures it)."""
    lines: list[Text] = []
    failed = f"{_n(view.failed)}" + (f" ({_n(view.dead)} dead)" if view.dead else "")
    lines.append(
        Text.assemble(
            ("done ", "bold"),
            (_done(view), "bold green"),
            ("   discovered ", "bold"),
            _n(view.discovered),
            ("   queued ", "bold"),
            f"{_n(view.queued)} ({_n(view.delayed)} delayed)",
            ("   in flight ", "bold"),
            f"{_n(view.in_flight)} ({_n(view.leased)} leased)",
            ("   failed ", "bold"),
            (failed, "red" if view.failed else ""),
            ("   retried ", "bold"),
            _n(view.retried),
        )
    )
    rates = Text.assemble(
        ("pages/s ", "bold"),
        f"{view.pages_per_s:.1f} ",
        (sparkline(view.history, SPARK_WIDTH), "green"),
        ("   bytes/s ", "bold"),
        f"{decimal(round(view.bytes_per_s))}/s",
        ("   fetched ", "bold"),
        decimal(view.bytes),
    )
    if view.max_pages is not None:
        rates.append_text(Text.assemble(("   ETA ", "bold"), _duration(view.eta)))
    lines.append(rates)
    lines.append(Text.assemble(("status ", "bold"), _status_codes(view)))
    lines.append(Text())

    hosts = _block(
        "hosts",
        ("host", "queued", "leased", "delay", "next"),
        [
            (
                (
                    h.host,
                    _n(h.queued),
                    _n(h.leased),
                    "—" if h.delay is None else f"{h.delay:g}s",
                    f"{h.next_in:.1f}s" if h.next_in > 0 else "now",
                ),
                "",
            )
            for h in view.hosts
        ],
        (False, True, True, True, True),
        {0: 32},
    )
    workers = _block(
        "workers",
        ("worker", "host", "in flight", "pages", "pages/s", "errors"),
        [
            (
                (
                    w.worker,
                    _peer(w.host),
                    "gone" if w.stale else _n(w.in_flight),
                    _n(w.pages),
                    f"{w.pages_per_s:.1f}",
                    _n(w.errors),
                ),
                "dim" if w.stale else "",
            )
            for w in view.workers
        ],
        (False, False, True, True, True, True),
        {0: 24},
    )
    lines.extend(_beside(hosts, workers))
    lines.append(Text())

    g = view.group
    raft_title = Text.assemble(
        ("raft", "bold"),
        f"  leader {_peer(g.leader)}  term {_n(g.term)}  commit {_n(g.commit)}",
    )
    if g.error:
        raft_title.append(f"  {g.error}", "yellow")
    raft = _block(
        raft_title,
        ("replica", "role", "commit", "applied", "lag"),
        [
            (
                (
                    _peer(r.peer),
                    "leader" if r.leader else "follower",
                    _n(r.commit),
                    _n(r.applied),
                    _n(r.lag),
                ),
                "bold" if r.leader else "",
            )
            for r in g.replicas
        ],
        (False, False, True, True, True),
    )
    errors = [Text("last errors", "bold")]
    errors.extend(
        Text.assemble((e.worker, "red"), "  ", _cut(e.message, 80)) for e in reversed(view.errors)
    )
    if not view.errors:
        errors.append(Text("none", "dim"))
    lines.extend(_beside(raft, errors))
    for line in lines:
        line.no_wrap = True
        line.overflow = "ellipsis"
    return Panel(
        Group(*lines),
        title=f"ww-crawl  {_duration(view.elapsed)}",
        title_align="left",
        box=box.ROUNDED,
    )


def progress_line(view: CrawlView) -> str:
    """One plain line for logs and terminals without the dashboard."""
    eta_part = f" | ETA {_duration(view.eta)}" if view.max_pages is not None else ""
    return (
        f"{_duration(view.elapsed)} done {_done(view)} discovered {_n(view.discovered)} "
        f"queued {_n(view.queued)} in flight {_n(view.in_flight)} failed {_n(view.failed)} "
        f"retried {_n(view.retried)} | {view.pages_per_s:.1f} pages/s "
        f"{decimal(round(view.bytes_per_s))}/s{eta_part} | leader {_peer(view.group.leader)} "
        f"term {_n(view.group.term)}"
    )


def summary(view: CrawlView) -> str:
    """What the crawl did, printed when the dashboard closes."""
    rate = view.done / view.elapsed if view.elapsed > 0 else 0.0
    return (
        f"crawled {_n(view.done)} pages in {_duration(view.elapsed)} ({rate:.1f} pages/s, "
        f"{decimal(view.bytes)}); failed {_n(view.failed)}, retried {_n(view.retried)}; "
        f"discovered {_n(view.discovered)}, {_n(view.queued)} still queued; "
        f"status {_status_codes(view)}"
    )


# -- the loops -------------------------------------------------------------------------------

ViewSource = Callable[[], Awaitable[CrawlView]] | Callable[[], CrawlView]


async def _get(get_view: ViewSource) -> CrawlView:
    view = get_view()
    if inspect.isawaitable(view):
        return await view
    return view


async def run_dashboard(
    get_view: ViewSource,
    *,
    console: Console,
    refresh: float = 0.25,
    live: bool | None = None,
    line_interval: float = 5.0,
    summary_on_exit: bool = True,
) -> None:
    """Show the dashboard until cancelled, redrawn every `refresh` seconds of trio's clock.

    `live`: None draws it when `console.is_terminal`; False (--no-dashboard) prints
    `progress_line` every `line_interval` seconds instead. When it stops (cancelled or not),
    the summary of the last view is printed unless `summary_on_exit` is False.
    """
    if refresh <= 0:
        raise ValueError("refresh must be > 0")
    if live is None:
        live = console.is_terminal
    if not live:
        await run_progress(
            get_view, console=console, interval=line_interval, summary_on_exit=summary_on_exit
        )
        return
    view = await _get(get_view)
    try:
        with Live(render(view), console=console, auto_refresh=False) as display:
            deadline = trio.current_time()
            while True:
                deadline += refresh
                now = trio.current_time()
                if deadline < now:  # behind: skip the missed frames rather than catch up
                    deadline = now
                await trio.sleep_until(deadline)
                view = await _get(get_view)
                display.update(render(view), refresh=True)
    finally:
        if summary_on_exit:
            console.print(summary(view), highlight=False, markup=False)


async def run_progress(
    get_view: ViewSource,
    *,
    console: Console,
    interval: float = 5.0,
    summary_on_exit: bool = True,
) -> None:
    """Print one `progress_line` every `interval` seconds until cancelled."""
    if interval <= 0:
        raise ValueError("interval must be > 0")
    view: CrawlView | None = None
    try:
        deadline = trio.current_time()
        while True:
            view = await _get(get_view)
            console.print(progress_line(view), highlight=False, markup=False, soft_wrap=True)
            deadline = max(deadline + interval, trio.current_time())
            await trio.sleep_until(deadline)
    finally:
        if summary_on_exit and view is not None:
            console.print(summary(view), highlight=False, markup=False, soft_wrap=True)


class DashboardState:
    """The latest answers for the dashboard, kept by the polling tasks; `view()` is cheap."""

    def __init__(
        self,
        *,
        max_pages: int | None,
        started: float,
        meter: CrawlMeter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_pages = max_pages
        self.started = started
        self.meter = meter if meter is not None else CrawlMeter()
        self.clock = clock
        self.frontier: Mapping[str, Any] | None = None
        self.results: Mapping[str, Any] | None = None
        self.group: Mapping[str, Any] | None = None
        self.delays: dict[str, float] = {}

    def view(self, now: float | None = None) -> CrawlView:
        return CrawlView.build(
            frontier=self.frontier,
            results=self.results,
            group=self.group,
            meter=self.meter,
            max_pages=self.max_pages,
            started=self.started,
            now=self.clock() if now is None else now,
            delays=self.delays,
        )


class QueueStats(Protocol):
    """The part of the queue client the dashboard reads."""

    async def stats(self, topic: str) -> dict[str, Any]: ...

    async def status(self) -> dict[str, Any]: ...


async def poll_queue(client: QueueStats, state: DashboardState, *, interval: float = 0.5) -> None:
    """Keep `state` holding the frontier's and results' stats and the group's status, asked
    every `interval` seconds until cancelled. A failed question is logged and shown; the loop
    goes on (the group may be electing a leader)."""
    while True:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ask, state, "frontier", client.stats, FRONTIER)
            nursery.start_soon(_ask, state, "results", client.stats, RESULTS)
            nursery.start_soon(_ask, state, "group", client.status)
            nursery.start_soon(trio.sleep, interval)


async def _ask(state: DashboardState, attr: str, call: Callable[..., Any], *args: Any) -> None:
    try:
        answer = await call(*args)
    except Exception as e:  # the dashboard must outlive any one failed question
        log.debug("dashboard: %s failed: %s", attr, e)
        if attr == "group":
            state.group = {"error": f"Raft group unreachable: {e}"}
        return
    setattr(state, attr, answer)


async def follow_stats(
    messages: AsyncIterable[bytes], meter: CrawlMeter, *, clock: Callable[[], float] = time.time
) -> None:
    """Feed every message of the `ww-crawl.stats` subscription to `meter`."""
    async for data in messages:
        meter.feed_packed(data, clock())
