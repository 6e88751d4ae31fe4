"""The fetcher against real HTTP servers on 127.0.0.x (port 0), served by ww.crawler.sites."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import AsyncIterator

import httpx2
import pytest
import trio
from tenacity import wait_fixed

from ww.crawler.fetch import FetchResult, fetch, fetch_robots, new_client
from ww.crawler.parse import is_html, parse_html
from ww.crawler.retry import Retry, decide
from ww.crawler.robots import Wait
from ww.crawler.sites import Site, serve_site

A, B = "127.0.0.1", "127.0.0.2"
UA = "ww-crawl-test/1"


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(follow_redirects=False) as c:
        yield c


@pytest.fixture
async def site(nursery: trio.Nursery) -> Site:
    site = Site()
    await nursery.start(serve_site, site, A)
    await nursery.start(serve_site, site, B)
    return site


async def get(client: httpx2.AsyncClient, site: Site, path: str, **kw: object) -> FetchResult:
    return await fetch(client, site.url(A, path), user_agent=UA, **kw)  # type: ignore[arg-type]


async def test_a_page_comes_back_with_status_type_size_hash_and_our_user_agent(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.page("/", title="Home", links=["/a"], headers=[("x-robots-tag", "nofollow")])
    result = await get(client, site, "/")
    assert result.ok and result.status == 200 and result.error is None
    assert result.content_type == "text/html; charset=utf-8"
    assert result.x_robots_tag == "nofollow"
    assert result.size == len(result.body) > 0
    assert result.sha256 == hashlib.sha256(result.body).hexdigest()
    assert result.redirects == () and not result.truncated
    assert result.final_url == site.url(A, "/")
    assert [h.user_agent for h in site.hits(A, "/")] == [UA]
    assert parse_html(result.body, result.final_url).title == "Home"


async def test_a_redirect_chain_is_followed_and_every_hop_recorded(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.redirect("/r1", "/r2", status=301)
    site.redirect("/r2", (A, "/r3"), status=302)
    site.redirect("/r3", "/final?b=2&a=1#frag", status=307)
    site.page("/final")
    seen: list[str] = []

    def check(url: str) -> None:
        seen.append(url)

    result = await get(client, site, "/r1", check_hop=check)
    assert result.status == 200 and result.error is None
    assert result.final_url == site.url(A, "/final?a=1&b=2")
    assert result.redirects == (
        {"url": site.url(A, "/r1"), "status": 301},
        {"url": site.url(A, "/r2"), "status": 302},
        {"url": site.url(A, "/r3"), "status": 307},
    )
    assert seen == [site.url(A, "/r2"), site.url(A, "/r3"), site.url(A, "/final?a=1&b=2")]


async def test_a_hop_refused_by_check_hop_is_not_requested(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.redirect("/away", (B, "/elsewhere"))
    site.page("/elsewhere", host=B)

    def same_host(url: str) -> str | None:
        return None if url.startswith(site.origin(A)) else "out of scope"

    result = await get(client, site, "/away", check_hop=same_host)
    assert result.error_kind == "redirect-blocked"
    assert result.error == f"redirect to {site.url(B, '/elsewhere')} not followed: out of scope"
    assert result.status == 301 and result.final_url == site.url(A, "/away")
    assert result.redirects == ({"url": site.url(A, "/away"), "status": 301},)
    assert site.hits(B) == []


async def test_a_redirect_loop_is_an_error(client: httpx2.AsyncClient, site: Site) -> None:
    site.redirect("/l1", "/l2")
    site.redirect("/l2", "/l1")
    result = await get(client, site, "/l1")
    assert result.error_kind == "redirect-loop"
    assert result.error == f"redirect loop: {site.url(A, '/l1')} again"
    assert [r["url"] for r in result.redirects] == [site.url(A, "/l1"), site.url(A, "/l2")]
    assert len(site.hits(A, "/l1")) == 1 and len(site.hits(A, "/l2")) == 1


async def test_more_redirects_than_allowed_is_an_error(
    client: httpx2.AsyncClient, site: Site
) -> None:
    for i in range(12):
        site.redirect(f"/c{i}", f"/c{i + 1}")
    site.page("/c12")
    result = await get(client, site, "/c0", max_redirects=10)
    assert result.error_kind == "too-many-redirects"
    assert result.error == "more than 10 redirects"
    assert len(result.redirects) == 11
    assert len(site.log) == 11  # /c0 .. /c10: the 11th Location is not requested
    ok = await get(client, site, "/c2", max_redirects=10)
    assert ok.status == 200 and len(ok.redirects) == 10


async def test_a_redirect_to_a_non_http_url_is_an_error(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.redirect("/ftp", "ftp://files.example/x")
    result = await get(client, site, "/ftp")
    assert result.error_kind == "bad-redirect"
    assert "not an http(s) URL" in (result.error or "")


async def test_a_body_longer_than_max_bytes_is_cut_and_marked(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.large("/big", 200_000)
    site.large("/exact", 10_000)
    result = await get(client, site, "/big", max_bytes=10_000)
    assert result.status == 200 and result.truncated and result.error is None
    assert result.size == len(result.body) == 10_000
    assert result.sha256 == hashlib.sha256(result.body).hexdigest()
    exact = await get(client, site, "/exact", max_bytes=10_000)
    assert exact.size == 10_000 and not exact.truncated


async def test_max_bytes_counts_decoded_bytes(client: httpx2.AsyncClient, site: Site) -> None:
    bomb = gzip.compress(b"0" * 5_000_000)
    site.raw("/gz", bomb, content_type="text/plain", headers=[("content-encoding", "gzip")])
    result = await get(client, site, "/gz", max_bytes=100_000)
    assert len(bomb) < 100_000
    assert result.truncated and result.size == 100_000 and set(result.body) == {ord("0")}


async def test_a_trickling_page_is_cut_off_by_the_total_timeout(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.trickle("/slow", interval=0.02)  # a byte every 20 ms, without end
    start = trio.current_time()
    result = await get(client, site, "/slow", timeout=0.5)
    took = trio.current_time() - start
    assert result.error_kind == "timeout"
    assert result.error == "timeout: no complete response within 0.5 s"
    assert result.status == 200 and result.size > 0  # bytes did arrive, too slowly
    assert 0.5 <= took < 5.0
    assert result.elapsed_ms >= 500


async def test_binary_content_is_recorded_with_its_hash_and_not_parsed(
    client: httpx2.AsyncClient, site: Site
) -> None:
    data = site.binary("/f.bin", 50_000, content_type="application/pdf")
    result = await get(client, site, "/f.bin")
    assert result.status == 200 and result.content_type == "application/pdf"
    assert result.size == 50_000 and result.body == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert not is_html(result.content_type, result.body)


async def test_a_5xx_is_returned_as_a_status_and_then_succeeds(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.flaky("/flaky", failures=2, status=503, retry_after="7")
    first = await get(client, site, "/flaky")
    assert first.status == 503 and first.error is None and first.retry_after == "7"
    assert decide(first, 1, 3, 0.0, wait=wait_fixed(1)) == Retry(7.0, "status 503")
    assert (await get(client, site, "/flaky")).status == 503
    assert (await get(client, site, "/flaky")).status == 200


async def test_a_429_carries_its_retry_after_date(client: httpx2.AsyncClient, site: Site) -> None:
    site.flaky("/busy", failures=1, status=429, retry_after="Fri, 15 Jan 2027 08:01:00 GMT")
    result = await get(client, site, "/busy")
    assert result.status == 429
    decision = decide(result, 1, 3, 1_800_000_000.0)
    assert isinstance(decision, Retry) and decision.delay >= 60.0


async def test_a_refused_connection_is_a_connect_error(client: httpx2.AsyncClient) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        result = await fetch(client, f"http://127.0.0.1:{port}/", user_agent=UA)
    assert result.status is None and result.error_kind == "connect"
    assert (result.error or "").startswith("connect error: ")
    assert isinstance(decide(result, 1, 3, 0.0), Retry)


async def test_a_connection_cut_mid_body_is_a_network_error(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.cut("/cut", b"<p>" + b"x" * 10_000, at=100)
    result = await get(client, site, "/cut")
    assert result.status == 200 and result.error_kind == "network"
    assert isinstance(decide(result, 1, 3, 0.0), Retry)


async def test_a_wrongly_declared_charset_is_read_right(
    client: httpx2.AsyncClient, site: Site
) -> None:
    site.raw(
        "/latin",
        "<title>Déjà vu</title>".encode("cp1252"),
        content_type="text/html; charset=utf-8",
    )
    result = await get(client, site, "/latin")
    assert parse_html(result.body, result.final_url, content_type=result.content_type).title == (
        "Déjà vu"
    )


async def test_fetch_robots_reads_rules_follows_redirects_and_waits_on_failure(
    site: Site,
) -> None:
    site.robots("User-agent: *\nDisallow: /private/\nCrawl-delay: 1.5\n", host=A)
    async with new_client() as c:
        rules = await fetch_robots(c, site.url(A, "/any/page"), user_agent=UA)
        assert rules.kind == "rules" and rules.crawl_delay(UA) == 1.5
        assert not rules.allowed(site.url(A, "/private/x"), UA)
        assert site.hits(A, "/robots.txt")[0].user_agent == UA

        none = await fetch_robots(c, site.url(B, "/"), user_agent=UA)  # 404 on B
        assert none.kind == "allow-all"

        site.redirect("/robots.txt", (A, "/robots.txt"), host=B)  # to the other host's file
        moved = await fetch_robots(c, site.url(B, "/"), user_agent=UA)
        assert moved.kind == "rules" and moved.crawl_delay(UA) == 1.5

        site.robots("", status=503, host=A)
        down = await fetch_robots(c, site.url(A, "/"), user_agent=UA, retry_delay=9.0)
        assert down.check(site.url(A, "/")) == Wait(9.0)


async def test_fetch_robots_waits_when_the_host_is_unreachable_or_too_slow(site: Site) -> None:
    site.trickle("/robots.txt", host=A)
    async with new_client() as c:
        slow = await fetch_robots(c, site.url(A, "/"), user_agent=UA, timeout=0.3)
        assert slow.kind == "unavailable"
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            gone = await fetch_robots(c, f"http://127.0.0.1:{port}/", user_agent=UA)
        assert gone.kind == "unavailable" and gone.status is None
