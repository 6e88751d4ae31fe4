"""`ww-crawl` end to end: the real command (a child process) starts its own three hosts, the
Raft replicas and the workers, and crawls sites this test serves on 127.0.0.x with known link
graphs; the test checks the JSON Lines file and the servers' own request logs."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.ww.conftest import HostFactory, host_factory
from ww.crawler.sites import Site, serve_site
from ww.crawler.urls import canonicalize

__all__ = ["host_factory"]  # a fixture

A, B, C = "127.0.0.1", "127.0.0.2", "127.0.0.3"
CRAWL_TIMEOUT = 50.0


@dataclass
class Run:
    code: int
    stderr: str
    rows: list[dict[str, Any]]

    @property
    def urls(self) -> list[str]:
        return [r["url"] for r in self.rows]

    def by_url(self) -> dict[str, dict[str, Any]]:
        return {r["url"]: r for r in self.rows}


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def crawl_argv(tmp: Path, seeds: Sequence[str], *flags: str) -> list[str]:
    seeds_file = tmp / "seeds.txt"
    seeds_file.write_text("".join(f"{s}\n" for s in seeds))
    return [
        sys.executable, "-m", "ww.crawler.cli", str(seeds_file),
        "--data-dir", str(tmp / "data"), "-o", str(tmp / "out.jsonl"),
        "--no-dashboard", "--timeout", "2", *flags,
    ]  # fmt: skip


async def crawl(tmp: Path, seeds: Sequence[str], *flags: str) -> Run:
    argv = crawl_argv(tmp, seeds, *flags)
    with trio.fail_after(CRAWL_TIMEOUT):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    stderr = done.stderr.decode(errors="replace")
    return Run(done.returncode, stderr, read_rows(tmp / "out.jsonl"))


async def serve(nursery: trio.Nursery, site: Site, *hosts: str) -> None:
    for host in hosts:
        await nursery.start(serve_site, site, host)


def reachable(site: Site, start: tuple[str, str], max_depth: int | None = None) -> set[str]:
    """The canonical URLs reachable from `start` through the site's link graph."""
    seen = {start}
    frontier = [start]
    depth = 0
    while frontier and (max_depth is None or depth < max_depth):
        nxt = []
        for node in frontier:
            for link in site.links.get(node, []):
                if link not in seen:
                    seen.add(link)
                    nxt.append(link)
        frontier, depth = nxt, depth + 1
    return {canonicalize(site.url(*n)) for n in seen}


def page_hits(site: Site) -> list[str]:
    return [f"{h.host}{h.target}" for h in site.log if h.target != "/robots.txt"]


def hits_of(site: Site, url: str) -> list[Any]:
    return [h for h in site.log if canonicalize(site.url(h.host, h.target)) == url]


def chain_site(n: int, hosts: Sequence[str]) -> Site:
    """Pages /0../n-1 spread over `hosts`; each links the next two (across hosts)."""
    site = Site()
    nodes = [(hosts[i % len(hosts)], f"/{i}") for i in range(n)]
    for i, (host, path) in enumerate(nodes):
        site.page(path, host=host, links=[nodes[j] for j in (i + 1, i + 2) if j < n])
    return site


async def test_a_crawl_writes_every_reachable_page_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = chain_site(30, [A, B])
    # Equivalent spellings of one page: fetched once, one result.
    site.page("/q", host=A, links=[(A, "/0")])
    site.page("/", host=A, links=[(A, "/0"), "/q?b=2&a=1", "/q?a=1&b=2#part", "/Q/../q?a=1&b=2"])
    site.links[(A, "/")] = [(A, "/0"), (A, "/q?a=1&b=2")]
    await serve(nursery, site, A, B)
    run = await crawl(tmp_path, [site.url(A, "/")], "--scope", "any")
    assert run.code == 0, run.stderr
    expected = reachable(site, (A, "/"))
    assert sorted(run.urls) == sorted(expected)
    assert len(run.urls) == len(set(run.urls))
    assert all(r["status"] == 200 and r["attempts"] == 1 for r in run.rows)
    hits = page_hits(site)
    assert len(hits) == len(set(hits)) == len(expected)
    assert sum(1 for h in site.log if h.target.startswith("/q")) == 1


async def test_scope_and_max_depth_bound_the_crawl(nursery: trio.Nursery, tmp_path: Path) -> None:
    site = chain_site(12, [A, B])
    site.page("/", host=A, links=[(A, "/0"), (A, "/skip/me")])
    site.page("/skip/me", host=A)
    await serve(nursery, site, A, B)
    run = await crawl(
        tmp_path, [site.url(A, "/")], "--max-depth", "3", "--deny", "/skip/", "--scope", "same-host"
    )
    assert run.code == 0, run.stderr
    # same-host: only A's pages; depth 3 from "/": /0 (1), /2 (2: /1 is on B), /4 (3).
    assert sorted(run.urls) == sorted(canonicalize(site.url(A, p)) for p in ("/", "/0", "/2", "/4"))
    assert {r["depth"] for r in run.rows} == {0, 1, 2, 3}
    assert not site.hits(B) or all(h.target == "/robots.txt" for h in site.hits(B))


async def test_max_pages_stops_the_crawl(nursery: trio.Nursery, tmp_path: Path) -> None:
    site = chain_site(60, [A])
    site.page("/", host=A, links=[(A, "/0")])
    await serve(nursery, site, A)
    run = await crawl(tmp_path, [site.url(A, "/")], "--max-pages", "7")
    assert run.code == 0, run.stderr
    assert len(run.rows) == 7 == len(set(run.urls))
    assert len(page_hits(site)) < 60


async def test_robots_rules_and_crawl_delay_hold_across_workers(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = chain_site(10, [A])
    site.page("/", host=A, links=[(A, "/0"), (A, "/private/x")])
    site.page("/private/x", host=A)
    site.robots("User-agent: *\nDisallow: /private/\nCrawl-delay: 0.4\n", host=A)
    await serve(nursery, site, A)
    run = await crawl(tmp_path, [site.url(A, "/")], "--per-host-concurrency", "4")
    assert run.code == 0, run.stderr
    private = run.by_url()[canonicalize(site.url(A, "/private/x"))]
    assert private["error"] == "disallowed by robots.txt" and private["status"] is None
    assert not site.hits(A, "/private/x")
    assert len(site.hits(A, "/robots.txt")) == 1
    times = sorted(h.time for h in site.hits(A) if h.target != "/robots.txt")
    assert len(times) == 11
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.4, gaps


async def test_per_host_concurrency_is_never_exceeded(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    pages = [(A, f"/{i}") for i in range(40)] + [(B, f"/{i}") for i in range(40)]
    site.page("/", host=A, links=pages)
    for host, path in pages:
        site.large(path, 200_000, host=host)
    await serve(nursery, site, A, B)
    run = await crawl(tmp_path, [site.url(A, "/")], "--scope", "any", "--per-host-concurrency", "2")
    assert run.code == 0, run.stderr
    assert len(run.rows) == 81
    assert len({r["worker"] for r in run.rows}) > 1
    assert site.max_in_flight[A] <= 2 and site.max_in_flight[B] <= 2


async def test_retries_on_5xx_and_429_with_retry_after(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    site.page("/", host=A, links=["/flaky", "/busy", "/gone", "/down"])
    site.flaky("/flaky", failures=2, status=503, host=A)
    site.flaky("/busy", failures=1, status=429, retry_after="2", host=A)
    site.page("/gone", status=404, host=A)
    site.flaky("/down", failures=10, status=500, host=A)
    await serve(nursery, site, A)
    run = await crawl(tmp_path, [site.url(A, "/")], "--retries", "2")
    assert run.code == 0, run.stderr
    rows = run.by_url()
    flaky = rows[canonicalize(site.url(A, "/flaky"))]
    assert flaky["status"] == 200 and flaky["attempts"] == 3
    busy = rows[canonicalize(site.url(A, "/busy"))]
    assert busy["status"] == 200 and busy["attempts"] == 2
    first, second = (h.time for h in site.hits(A, "/busy"))
    assert second - first >= 2.0 * 0.95
    gone = rows[canonicalize(site.url(A, "/gone"))]
    assert gone["status"] == 404 and gone["attempts"] == 1
    down = rows[canonicalize(site.url(A, "/down"))]
    assert down["status"] == 500 and down["attempts"] == 3
    assert len(site.hits(A, "/down")) == 3
    assert summary_counts(run.stderr) == counts_of(run.rows)


async def test_redirects_are_followed_and_recorded_and_loops_are_errors(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    site.page("/", host=A, links=["/old", "/loop1"])
    site.redirect("/old", (A, "/mid"), host=A)
    site.redirect("/mid", (A, "/new"), status=302, host=A)
    site.page("/new", host=A, title="New")
    site.redirect("/loop1", (A, "/loop2"), host=A)
    site.redirect("/loop2", (A, "/loop1"), host=A)
    await serve(nursery, site, A)
    run = await crawl(tmp_path, [site.url(A, "/")])
    assert run.code == 0, run.stderr
    rows = run.by_url()
    old = rows[canonicalize(site.url(A, "/old"))]
    assert old["final_url"] == canonicalize(site.url(A, "/new")) and old["title"] == "New"
    assert [r["status"] for r in old["redirects"]] == [301, 302]
    loop = rows[canonicalize(site.url(A, "/loop1"))]
    assert "loop" in loop["error"]


async def test_a_data_dir_with_a_crawl_is_not_reused_silently(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    site.page("/", host=A)
    await serve(nursery, site, A)
    first = await crawl(tmp_path, [site.url(A, "/")])
    assert first.code == 0, first.stderr
    again = await crawl(tmp_path, [site.url(A, "/")])
    assert again.code == 1
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "--fresh" in lines[0], again.stderr
    assert read_rows(tmp_path / "out.jsonl") == first.rows  # nothing lost
    fresh = await crawl(tmp_path, [site.url(A, "/")], "--fresh")
    assert fresh.code == 0 and len(fresh.rows) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://a.example/\nnot a url\n", "line 2"),
        ("# only a comment\n", "holds no URL"),
    ],
)
async def test_a_bad_seeds_file_is_one_line_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    seeds = tmp_path / "seeds.txt"
    seeds.write_text(text)
    argv = [sys.executable, "-m", "ww.crawler.cli", str(seeds), "--data-dir", str(tmp_path / "d")]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    err = done.stderr.decode().strip()
    assert done.returncode == 1 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


# -- crashes ----------------------------------------------------------------------------------


def processes_under(data_dir: Path) -> list[tuple[int, str]]:
    """(pid, cmdline) of the processes whose command line names `data_dir` (hosts, ROMs)."""
    marker = str(data_dir.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd:
            found.append((int(entry), cmd))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def slow_site(n: int) -> Site:
    """n pages on three hosts, linked in a chain from "/" on A, with a Crawl-delay: a crawl
    that takes a few seconds."""
    site = chain_site(n, [A, B, C])
    site.page("/", host=A, links=[(A, "/0"), (B, "/1"), (C, "/2")])
    site.robots("User-agent: *\nCrawl-delay: 0.1\n")
    return site


async def wait_for_rows(path: Path, n: int, process: trio.Process) -> None:
    with trio.fail_after(CRAWL_TIMEOUT):
        while len(read_rows(path)) < n:
            assert process.returncode is None, "the crawl ended early"
            await trio.sleep(0.05)


async def busy_worker(data_dir: Path) -> str:
    """The name of a worker that has had a fetch in flight for two stats messages in a row
    (so it holds a trickling page), from the workers' stats on pubsub."""
    import msgpack

    from ww.crawler.cluster import connect

    with trio.fail_after(CRAWL_TIMEOUT):
        path = data_dir / "crawl.json"
        while not (path.exists() and (info := json.loads(path.read_text()))["hosts"]):
            await trio.sleep(0.05)
        async with connect(info["hosts"][0]) as host:
            topic = await (await host.pubsub()).join("ww-crawl.stats")
            busy: set[str] = set()
            async with topic.stream("subscribe") as messages:
                async for message in messages:
                    stats = msgpack.unpackb(message)
                    if stats["in_flight"] == 0:
                        busy.discard(stats["worker"])
                    elif stats["worker"] in busy:
                        return str(stats["worker"])
                    else:
                        busy.add(stats["worker"])
    raise AssertionError("unreachable")


async def test_a_killed_worker_leaves_its_urls_to_the_others(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = chain_site(30, [A, B, C])
    slow = [(h, f"/slow{i}") for i in range(4) for h in (A, B, C)]
    site.page("/", host=A, links=[(A, "/0"), *slow])
    for host, path in slow:
        site.trickle(path, interval=0.1, host=host)
    await serve(nursery, site, A, B, C)
    # No robots and no retries: an attempt after the first can only come from an expired lease.
    argv = crawl_argv(
        tmp_path, [site.url(A, "/")], "--scope", "any", "--ignore-robots", "--retries", "0"
    )
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        victim = await busy_worker(tmp_path / "data")
        pids = {
            pid
            for pid, cmd in processes_under(tmp_path / "data")
            if f"--name {victim} " in cmd + " "
        }
        # A sandboxed ROM runs below a waiter of its own: kill the outermost of its processes.
        outermost = [pid for pid in pids if parent_of(pid) not in pids]
        assert len(outermost) == 1
        os.kill(outermost[0], signal.SIGKILL)
        with trio.fail_after(CRAWL_TIMEOUT):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0
    rows = read_rows(tmp_path / "out.jsonl")
    urls = [r["url"] for r in rows]
    assert sorted(urls) == sorted(reachable(site, (A, "/")))
    assert len(urls) == len(set(urls))
    taken_over = [r for r in rows if r["attempts"] == 2]
    assert taken_over and all(r["worker"] != victim for r in taken_over)


async def test_kill_9_of_everything_then_resume_exports_each_url_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = slow_site(60)
    await serve(nursery, site, A, B, C)
    argv = crawl_argv(tmp_path, [site.url(A, "/")], "--scope", "any")
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_for_rows(tmp_path / "out.jsonl", 15, process)
        for pid, _ in processes_under(tmp_path / "data"):
            with contextlib.suppress(ProcessLookupError):  # gone with its host meanwhile
                os.kill(pid, signal.SIGKILL)
        process.kill()
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    before = read_rows(tmp_path / "out.jsonl")
    assert 15 <= len(before) < 61
    with trio.fail_after(5):
        while processes_under(tmp_path / "data"):
            await trio.sleep(0.05)
    run = await crawl(tmp_path, [site.url(A, "/")], "--resume")
    assert run.code == 0, run.stderr
    assert sorted(run.urls) == sorted(reachable(site, (A, "/")))
    assert len(run.urls) == len(set(run.urls))
    # No page that had a result before the crash was fetched again.
    for row in before:
        assert len(hits_of(site, row["url"])) == 1, row["url"]


async def test_retry_failed_crawls_failures_again_and_keeps_each_url_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    site.page("/", host=A, links=["/ok", "/down"])
    site.page("/ok", host=A)
    site.flaky("/down", failures=1, status=503, host=A)
    await serve(nursery, site, A)
    first = await crawl(tmp_path, [site.url(A, "/")], "--retries", "0")
    assert first.code == 0, first.stderr
    down = canonicalize(site.url(A, "/down"))
    assert first.by_url()[down]["status"] == 503
    again = await crawl(tmp_path, [site.url(A, "/")], "--resume", "--retry-failed")
    assert again.code == 0, again.stderr
    assert sorted(again.urls) == sorted(first.urls)
    assert again.by_url()[down]["status"] == 200
    assert len(site.hits(A, "/ok")) == 1  # a page that succeeded is not fetched again
    # `ww-crawl export` writes the same: each URL once, with its latest result.
    argv = [sys.executable, "-m", "ww.crawler.cli", "export", str(tmp_path / "data")]
    argv += ["-o", str(tmp_path / "all.jsonl")]
    with trio.fail_after(CRAWL_TIMEOUT):
        done = await trio.run_process(argv, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    exported = {r["url"]: r for r in read_rows(tmp_path / "all.jsonl")}
    assert sorted(exported) == sorted(again.urls)
    assert exported[down]["status"] == 200


HANDLERS = Path(__file__).resolve().parents[2] / "examples" / "handlers"


async def test_a_handler_adds_fields_and_chooses_the_links(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    site.page("/", host=A, text="alpha alpha beta", links=["/docs/a", "/other"])
    site.page("/docs/a", host=A, links=["/docs/b", "/other2"])
    site.page("/docs/b", host=A)
    site.page("/other", host=A)
    site.page("/other2", host=A)
    await serve(nursery, site, A)
    run = await crawl(tmp_path, [site.url(A, "/")], "--handler", str(HANDLERS / "word_count"))
    assert run.code == 0, run.stderr
    # word_count follows only links below the page's own directory: not /other2 from /docs/a.
    expected = {canonicalize(site.url(A, p)) for p in ("/", "/docs/a", "/docs/b", "/other")}
    assert set(run.urls) == expected and len(run.urls) == 4
    home = run.by_url()[canonicalize(site.url(A, "/"))]
    assert home["top_words"][0] == "alpha" and home["words"] >= 3


async def test_warc_holds_a_request_and_a_response_per_fetched_page(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from warcio.archiveiterator import ArchiveIterator

    site = Site()
    site.page("/", host=A, links=["/data.bin"])
    body = site.binary("/data.bin", 5000, host=A)
    await serve(nursery, site, A)
    warc = tmp_path / "out.warc.gz"
    run = await crawl(tmp_path, [site.url(A, "/")], "--warc", str(warc))
    assert run.code == 0, run.stderr
    assert all(not k.startswith("_") for r in run.rows for k in r)
    responses: dict[str, bytes] = {}
    requests = 0
    with open(warc, "rb") as f:
        for record in ArchiveIterator(f):
            uri = record.rec_headers.get_header("WARC-Target-URI")
            if record.rec_type == "response":
                responses[uri] = record.content_stream().read()
            elif record.rec_type == "request":
                requests += 1
    assert set(responses) == set(run.urls) and requests == 2
    assert responses[canonicalize(site.url(A, "/data.bin"))] == body


async def test_a_running_crawl_is_left_alone_and_ctrl_c_stops_it_cleanly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = slow_site(60)
    await serve(nursery, site, A, B, C)
    argv = crawl_argv(tmp_path, [site.url(A, "/")], "--scope", "any")
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_for_rows(tmp_path / "out.jsonl", 10, process)
        for extra in (["--resume"], ["--fresh"]):
            meddle = crawl_argv(tmp_path, [site.url(A, "/")], *extra)
            done = await trio.run_process(meddle, capture_stderr=True, check=False)
            err = done.stderr.decode().strip()
            assert done.returncode == 1 and "is running" in err, err
            assert len(err.splitlines()) == 1, err
        assert process.returncode is None
        process.send_signal(signal.SIGINT)
        with trio.fail_after(CRAWL_TIMEOUT):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 130
    stopped = read_rows(tmp_path / "out.jsonl")
    urls = [r["url"] for r in stopped]
    assert len(urls) == len(set(urls)) and len(urls) < 61
    state = json.loads((tmp_path / "data" / "export.json").read_text())
    assert state["offset"] == len(stopped)  # flushed: everything committed is exported
    assert state["length"] == (tmp_path / "out.jsonl").stat().st_size
    assert not processes_under(tmp_path / "data")  # hosts and ROMs are gone
    run = await crawl(tmp_path, [site.url(A, "/")], "--resume")
    assert run.code == 0, run.stderr
    assert sorted(run.urls) == sorted(reachable(site, (A, "/")))
    assert len(run.urls) == len(set(run.urls))


async def test_a_crawl_on_an_existing_cluster_leaves_it_running(
    nursery: trio.Nursery, tmp_path: Path, host_factory: HostFactory
) -> None:
    hosts = await host_factory.cluster(3)
    site = chain_site(10, [A])
    site.page("/", host=A, links=[(A, "/0")])
    await serve(nursery, site, A)
    run = await crawl(tmp_path, [site.url(A, "/")], "--cluster", hosts[0].address)
    assert run.code == 0, run.stderr
    assert sorted(run.urls) == sorted(reachable(site, (A, "/")))
    assert all(h.alive for h in hosts)
    argv = [sys.executable, "-m", "ww.crawler.cli", "status", "--cluster", hosts[1].address]
    status = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert status.returncode == 0, status.stderr
    assert "results: 11" in status.stdout.decode()
    # The group holds this crawl: a new one there is refused, in one line.
    other = tmp_path / "other"
    other.mkdir()
    again = await crawl(other, [site.url(A, "/")], "--cluster", hosts[0].address)
    assert again.code == 1 and "--resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr


async def test_the_crawl_goes_on_when_the_raft_leaders_host_is_killed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The leader is moved to h0, the host ww-crawl talks through, before h0 is killed: the
    crawl loses its Raft leader, a replica, a worker and its own connection at once."""
    from ww.crawler.cluster import connect
    from ww.queue.client import QueueClient

    site = slow_site(60)
    await serve(nursery, site, A, B, C)
    argv = crawl_argv(tmp_path, [site.url(A, "/")], "--scope", "any")
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        await wait_for_rows(tmp_path / "out.jsonl", 10, process)
        data = tmp_path / "data"
        addresses = json.loads((data / "crawl.json").read_text())["hosts"]
        pids = json.loads((data / "hosts" / "pids.json").read_text())
        async with connect(addresses[1]) as host:
            members = {m["addrs"][0]: m["peer"] for m in await (await host.view()).hosts()}
            h0 = members[addresses[0]]
            client = await QueueClient.connect(host, timeout=10)
            with trio.fail_after(20):
                while (await client.status()).get("leader") != h0:
                    with contextlib.suppress(Exception):  # refused while an election is on
                        await client.transfer(h0)
                    await trio.sleep(0.2)
            await client.aclose()
        os.kill(pids[0], signal.SIGKILL)
        with trio.fail_after(CRAWL_TIMEOUT):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, log.read_text()
    assert "going on through" in log.read_text()
    urls = [r["url"] for r in read_rows(tmp_path / "out.jsonl")]
    assert sorted(urls) == sorted(reachable(site, (A, "/")))
    assert len(urls) == len(set(urls))


async def test_hard_pages_are_recorded_and_a_trap_ends(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    import hashlib

    site = Site()
    site.page("/", host=A, links=["/big", "/slow", "/data.bin", "/trap/"])
    site.large("/big", 50_000, host=A)
    site.trickle("/slow", host=A)
    body = site.binary("/data.bin", 3000, host=A)
    site.trap("/trap/", host=A)
    await serve(nursery, site, A)
    run = await crawl(
        tmp_path, [site.url(A, "/")], "--max-bytes", "10K", "--retries", "0", "--max-depth", "30"
    )
    assert run.code == 0, run.stderr
    rows = run.by_url()
    big = rows[canonicalize(site.url(A, "/big"))]
    assert big["size"] == 10 * 1024 and big["status"] == 200
    slow = rows[canonicalize(site.url(A, "/slow"))]
    assert "timeout" in slow["error"] and slow["elapsed_ms"] >= 1900
    binary = rows[canonicalize(site.url(A, "/data.bin"))]
    assert binary["content_type"] == "application/octet-stream"
    assert binary["sha256"] == hashlib.sha256(body).hexdigest() and binary["text"] is None
    trap = [u for u in run.urls if "/trap/" in u]
    assert 5 < len(trap) < 100  # the guards cut the endless space off


async def test_a_host_waits_for_an_unavailable_robots_txt(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    site.page("/", host=A, links=[(A, "/a"), (B, "/"), (B, "/b")])
    site.page("/a", host=A)
    site.page("/", host=B)
    site.page("/b", host=B)
    site.flaky("/robots.txt", failures=1, status=503, host=A)  # then allows everything
    site.robots("", status=500, host=B)  # never available
    await serve(nursery, site, A, B)
    run = await crawl(tmp_path, [site.url(A, "/")], "--scope", "any", "--retries", "1")
    assert run.code == 0, run.stderr
    rows = run.by_url()
    assert len(site.hits(A, "/robots.txt")) == 2
    assert rows[canonicalize(site.url(A, "/a"))]["status"] == 200
    # A's pages waited for its robots.txt: none was fetched before the one that answered.
    first_robots_ok = site.hits(A, "/robots.txt")[1].time
    assert all(h.time > first_robots_ok for h in site.hits(A) if h.target != "/robots.txt")
    assert len(site.hits(B, "/robots.txt")) == 2
    for path in ("/", "/b"):
        row = rows[canonicalize(site.url(B, path))]
        assert row["status"] is None and "robots.txt unavailable" in row["error"]
    assert [h.target for h in site.hits(B)] == ["/robots.txt", "/robots.txt"]
    # Pages waited without being claimed: each took one attempt.
    assert all(r["attempts"] == 1 for r in run.rows), [(r["url"], r["attempts"]) for r in run.rows]


async def test_a_second_ctrl_c_stops_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    site = slow_site(60)
    await serve(nursery, site, A, B, C)
    argv = crawl_argv(tmp_path, [site.url(A, "/")], "--scope", "any")
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_for_rows(tmp_path / "out.jsonl", 5, process)
        process.send_signal(signal.SIGINT)
        await trio.sleep(0.05)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(5):  # the hosts give their ROMs 2 s to stop
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 130
    rows = read_rows(tmp_path / "out.jsonl")  # whole lines, each URL once
    assert len(rows) == len({r["url"] for r in rows})
    with trio.fail_after(5):
        while processes_under(tmp_path / "data"):
            await trio.sleep(0.05)


async def test_a_crawl_on_a_cluster_with_a_key(
    nursery: trio.Nursery, tmp_path: Path, host_factory: HostFactory
) -> None:
    from ww.auth import generate_cluster_key

    key = tmp_path / "cluster.key"
    generate_cluster_key(key)
    hosts = await host_factory.cluster(3, key=key)
    site = chain_site(5, [A])
    site.page("/", host=A, links=[(A, "/0")])
    await serve(nursery, site, A)
    nokey = tmp_path / "nokey"
    nokey.mkdir()
    without = await crawl(nokey, [site.url(A, "/")], "--cluster", hosts[0].address)
    assert without.code == 1 and "--key" in without.stderr, without.stderr
    assert len(without.stderr.strip().splitlines()) == 1, without.stderr
    run = await crawl(
        tmp_path, [site.url(A, "/")], "--cluster", hosts[0].address, "--key", str(key)
    )
    assert run.code == 0, run.stderr
    assert sorted(run.urls) == sorted(reachable(site, (A, "/")))


# -- the summary ------------------------------------------------------------------------------

SUMMARY = re.compile(
    r"crawled ([\d,]+) pages in .*?; failed ([\d,]+), retried ([\d,]+); .*; status (.*)$",
    re.MULTILINE,
)


def summary_counts(stderr: str) -> tuple[int, int, int, dict[str, int]]:
    """(crawled, failed, retried, status codes) from the summary line `ww-crawl` printed."""
    match = SUMMARY.search(stderr)
    assert match is not None, stderr
    crawled, failed, retried = (int(match[i].replace(",", "")) for i in (1, 2, 3))
    codes = {}
    if match[4].strip() != "—":
        for part in match[4].split("  "):
            code, n = part.split(": ")
            codes[code] = int(n.replace(",", ""))
    return crawled, failed, retried, codes


def counts_of(rows: list[dict[str, Any]]) -> tuple[int, int, int, dict[str, int]]:
    """What the summary should say of these results: a failure is an error or a status of 400
    or more; a retry is an attempt after a result's first."""
    failed = sum(1 for r in rows if r["error"] is not None or (r["status"] or 0) >= 400)
    retried = sum(r["attempts"] - 1 for r in rows)
    codes = Counter(str(r["status"]) for r in rows if r["status"] is not None)
    return len(rows), failed, retried, dict(codes)


async def test_the_summary_counts_a_failure_that_ends_the_crawl(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    site = Site()
    site.page("/", host=A)
    site.robots("User-agent: *\nDisallow: /\n", host=A)
    await serve(nursery, site, A)
    run = await crawl(tmp_path, [site.url(A, "/")])
    assert run.code == 0, run.stderr
    assert [r["error"] for r in run.rows] == ["disallowed by robots.txt"]
    assert summary_counts(run.stderr) == counts_of(run.rows) == (1, 1, 0, {})


async def test_the_summary_counts_the_failures_of_the_fetches_a_stop_waits_for(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Ctrl-C ends the crawl while fetches are in flight; they fail afterwards (a timeout) and
    their results are written: the summary counts them."""
    site = Site()
    site.page("/", host=A, links=["/slow"])
    site.trickle("/slow", interval=0.1, host=A)
    await serve(nursery, site, A)
    argv = crawl_argv(tmp_path, [site.url(A, "/")], "--retries", "0")
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = bytearray()
    try:
        async with trio.open_nursery() as reading:

            async def read_stderr() -> None:
                assert process.stderr is not None
                async for chunk in process.stderr:
                    stderr.extend(chunk)

            reading.start_soon(read_stderr)
            with trio.fail_after(CRAWL_TIMEOUT):
                while not site.hits(A, "/slow"):  # it times out 2 s later
                    await trio.sleep(0.01)
                process.send_signal(signal.SIGINT)
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 130, stderr.decode(errors="replace")
    rows = read_rows(tmp_path / "out.jsonl")
    slow = {r["url"]: r for r in rows}[canonicalize(site.url(A, "/slow"))]
    assert "timeout" in slow["error"]
    assert summary_counts(stderr.decode()) == counts_of(rows)
