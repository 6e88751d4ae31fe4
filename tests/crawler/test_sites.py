"""The test-and-demo site server: routes, the request log, the in-flight count, the demo graph."""

from __future__ import annotations

import httpx2
import trio

from ww.crawler.parse import parse_html
from ww.crawler.robots import RobotsPolicy
from ww.crawler.sites import Request, Site, demo_site, serve_site

A = "127.0.0.1"


def test_every_demo_page_is_reachable_from_the_first_hosts_home_page() -> None:
    hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    site = demo_site(300, hosts)
    pages = {key for key in site.links if key[1].startswith("/p/")}
    assert len(pages) == 300
    assert {host for host, _ in pages} == set(hosts)
    seen, todo = set(), [(hosts[0], "/")]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(site.links.get(node, []))
    assert pages <= seen


async def test_the_demo_site_serves_linked_pages_robots_and_extras(nursery: trio.Nursery) -> None:
    hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    site = demo_site(30, hosts)
    for h in hosts:
        await nursery.start(serve_site, site, h)
    async with httpx2.AsyncClient() as client:
        home = await client.get(site.url(hosts[0], "/"))
        page = parse_html(home.content, site.url(hosts[0], "/"))
        assert page.links == (site.url(hosts[0], "/p/0.html"), site.url(hosts[0], "/about"))
        p0 = await client.get(site.url(hosts[0], "/p/0.html"))
        assert site.url(hosts[1], "/p/1.html") in parse_html(p0.content, str(p0.url)).links
        robots = await client.get(site.url(hosts[1], "/robots.txt"))
        policy = RobotsPolicy.from_response(robots.status_code, robots.content)
        assert policy.crawl_delay() == 0.1
        assert not policy.allowed(site.url(hosts[1], "/private/secret"))
        assert (await client.get(site.url(hosts[2], "/robots.txt"))).status_code == 404
        assert (await client.get(site.url(hosts[0], "/flaky"))).status_code == 503
        assert (await client.get(site.url(hosts[0], "/flaky"))).status_code == 200
        assert (await client.get(site.url(hosts[0], "/old-home"))).status_code == 301


async def test_the_log_records_each_request_with_host_client_and_agent(
    nursery: trio.Nursery,
) -> None:
    site = Site()
    site.page("/a")
    await nursery.start(serve_site, site, A)
    async with httpx2.AsyncClient(headers={"user-agent": "probe"}) as client:
        await client.get(site.url(A, "/a"))
        await client.get(site.url(A, "/a?x=1"))  # same connection, kept alive
        await client.get(site.url(A, "/nothing"))
    assert [(h.target, h.status, h.user_agent) for h in site.log] == [
        ("/a", 200, "probe"),
        ("/a?x=1", 200, "probe"),
        ("/nothing", 404, "probe"),
    ]
    assert len({h.client for h in site.log}) == 1
    assert site.log[0].time <= site.log[1].time <= site.log[2].time


async def test_the_server_counts_the_most_requests_in_flight_per_host(
    nursery: trio.Nursery,
) -> None:
    site = Site()
    site.trickle("/slow", interval=0.01)
    site.page("/quick")
    await nursery.start(serve_site, site, A)
    await nursery.start(serve_site, site, "127.0.0.2")
    async with httpx2.AsyncClient() as client, trio.open_nursery() as inner:
        for _ in range(3):
            inner.start_soon(client.get, site.url(A, "/slow"))
        while len(site.hits(A, "/slow")) < 3:
            await trio.sleep(0.01)
        assert site.in_flight[A] == 3
        await client.get(site.url("127.0.0.2", "/quick"))
        inner.cancel_scope.cancel()
    assert site.max_in_flight[A] == 3
    assert site.max_in_flight["127.0.0.2"] == 1


async def test_a_failing_route_answers_500_and_the_server_goes_on(nursery: trio.Nursery) -> None:
    site = Site()

    def broken(request: object) -> object:
        raise RuntimeError("bug in a route")

    site.route("/broken", broken)  # type: ignore[arg-type]
    site.page("/fine")
    await nursery.start(serve_site, site, A)
    async with httpx2.AsyncClient() as client:
        assert (await client.get(site.url(A, "/broken"))).status_code == 500
        assert (await client.get(site.url(A, "/fine"))).status_code == 200


def test_a_trap_links_deeper_without_end() -> None:
    site = Site()
    site.trap("/trap/")
    response = site.respond(Request(A, "/trap/a/", (), 0))
    links = parse_html(response.body, "http://h/trap/a/").links
    assert links == ("http://h/trap/a/a/", "http://h/trap/a/?p0=1")
