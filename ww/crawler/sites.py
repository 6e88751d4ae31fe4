"""Small HTTP/1.1 sites on loopback for tests and `ww-crawl demo`.

A `Site` is a table of routes, each a function from a request to a response, with helpers for
what a crawler must cope with (robots.txt, redirects and loops, failures before a success, 429
with Retry-After, a page that trickles, a connection cut mid-body, large and binary bodies,
exact bytes and headers for a wrong charset, traps).
`serve_site` serves it on one address with h11 under trio; serve the same site on
127.0.0.1, 127.0.0.2, ... to make several hosts, each on its own port (bind port 0):

    site = Site()
    site.page("/", links=["/a", ("127.0.0.2", "/b")])
    port = await nursery.start(serve_site, site, "127.0.0.1")

The site logs every request (`site.log`: trio time, host, path, client, user agent, status)
and counts responses in progress per host (`site.max_in_flight`), so a test can check a
crawler's delay and concurrency against the server's own view. A response counts as in
progress from the request's arrival until its last byte is written.
"""

from __future__ import annotations

import html
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h11
import trio

__all__ = [
    "Hit",
    "Link",
    "Request",
    "Response",
    "Site",
    "demo_site",
    "serve_site",
]

log = logging.getLogger(__name__)

Link = str | tuple[str, str]
"""A link on a page: a path or URL written as is, or (host, path) for another host of the site."""


@dataclass(frozen=True, slots=True)
class Request:
    host: str
    target: str  # path and query, as sent
    headers: tuple[tuple[str, str], ...]
    count: int  # how many earlier requests this host had for this target


@dataclass(slots=True)
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trickle: float | None = None  # send one byte every `trickle` seconds, without end
    cut_at: int | None = None  # close the connection after this many bytes of the body


@dataclass(frozen=True, slots=True)
class Hit:
    time: float  # trio.current_time() when the request arrived
    host: str
    target: str
    client: str
    user_agent: str
    status: int


Handler = Callable[[Request], Response]


def _label(link: Link) -> str:
    return f"{link[1]} on {link[0]}" if isinstance(link, tuple) else link


def _html_response(body: str, status: int = 200, charset: str = "utf-8") -> Response:
    return Response(
        status, [("content-type", f"text/html; charset={charset}")], body.encode(charset)
    )


class Site:
    """Routes by (host, target), where host "*" serves on every host; a target with a query
    falls back to the route of its path. See the module doc."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.prefixes: list[tuple[str, str, Handler]] = []
        self.ports: dict[str, int] = {}
        self.log: list[Hit] = []
        self.counts: Counter[tuple[str, str]] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.links: dict[tuple[str, str], list[tuple[str, str]]] = {}

    # -- addresses ------------------------------------------------------------------------

    def origin(self, host: str) -> str:
        """http://host:port of a host being served."""
        return f"http://{host}:{self.ports[host]}"

    def url(self, host: str, target: str = "/") -> str:
        return self.origin(host) + target

    def hits(self, host: str | None = None, target: str | None = None) -> list[Hit]:
        """The logged requests, for one host and/or one target."""
        return [
            h
            for h in self.log
            if (host is None or h.host == host) and (target is None or h.target == target)
        ]

    # -- routes ---------------------------------------------------------------------------

    def route(self, target: str, handler: Handler, *, host: str = "*") -> None:
        self.routes[(host, target)] = handler

    def route_prefix(self, prefix: str, handler: Handler, *, host: str = "*") -> None:
        self.prefixes.append((host, prefix, handler))

    def respond(self, request: Request) -> Response:
        path = request.target.partition("?")[0]
        keys = [(request.host, request.target), ("*", request.target)]
        keys += [(request.host, path), ("*", path)]
        for key in keys:
            if key in self.routes:
                return self.routes[key](request)
        for host, prefix, handler in self.prefixes:
            if host in ("*", request.host) and request.target.startswith(prefix):
                return handler(request)
        return _html_response("<title>Not found</title><p>Not found</p>", 404)

    def page(
        self,
        target: str,
        *,
        links: Sequence[Link] = (),
        title: str | None = None,
        text: str = "",
        head: str = "",
        host: str = "*",
        status: int = 200,
        charset: str = "utf-8",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """An HTML page linking to `links` ((host, path) links get that host's origin)."""
        self.links[(host, target)] = [
            link if isinstance(link, tuple) else (host, link) for link in links
        ]

        def handler(request: Request) -> Response:
            anchors = "\n".join(
                f'<a href="{html.escape(self._href(link))}">{html.escape(_label(link))}</a>'
                for link in links
            )
            body = (
                f"<!doctype html><html><head><title>{html.escape(title or target)}</title>"
                f"{head}</head><body><h1>{html.escape(title or target)}</h1>"
                f"<p>{html.escape(text)}</p>\n{anchors}\n</body></html>"
            )
            response = _html_response(body, status, charset)
            response.headers.extend(headers)
            return response

        self.route(target, handler, host=host)

    def _href(self, link: Link) -> str:
        return self.url(*link) if isinstance(link, tuple) else link

    def raw(
        self,
        target: str,
        body: bytes,
        *,
        content_type: str | None = "text/html",
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        host: str = "*",
    ) -> None:
        """Exactly these bytes and headers (no charset added)."""
        fixed = [("content-type", content_type)] if content_type else []

        def handler(request: Request) -> Response:
            return Response(status, [*fixed, *headers], body)

        self.route(target, handler, host=host)

    def robots(self, text: str, *, status: int = 200, host: str = "*") -> None:
        self.raw("/robots.txt", text.encode(), content_type="text/plain", status=status, host=host)

    def redirect(self, target: str, to: Link, *, status: int = 301, host: str = "*") -> None:
        """`target` answers `status` with Location `to`; a loop is two redirects to each other."""

        def handler(request: Request) -> Response:
            return Response(status, [("location", self._href(to))], b"")

        self.route(target, handler, host=host)

    def flaky(
        self,
        target: str,
        *,
        failures: int = 2,
        status: int = 503,
        retry_after: str | None = None,
        links: Sequence[Link] = (),
        host: str = "*",
    ) -> None:
        """`failures` answers of `status` (with Retry-After when given), then a page."""
        self.page(target, links=links, host=host)
        succeed = self.routes[(host, target)]

        def handler(request: Request) -> Response:
            if request.count >= failures:
                return succeed(request)
            extra = [("retry-after", retry_after)] if retry_after is not None else []
            return Response(status, [("content-type", "text/plain"), *extra], b"try later\n")

        self.route(target, handler, host=host)

    def trickle(self, target: str, *, interval: float = 0.05, host: str = "*") -> None:
        """A page that sends its headers, then one byte every `interval` seconds, forever."""

        def handler(request: Request) -> Response:
            return Response(200, [("content-type", "text/html")], b"", trickle=interval)

        self.route(target, handler, host=host)

    def large(self, target: str, size: int, *, host: str = "*") -> None:
        """An HTML page of `size` bytes."""
        head = b"<!doctype html><html><head><title>large</title></head><body><p>"
        tail = b"</p></body></html>"
        body = head + b"x" * max(0, size - len(head) - len(tail)) + tail
        self.raw(target, body[:size] if size < len(head) + len(tail) else body, host=host)

    def binary(
        self,
        target: str,
        size: int,
        *,
        content_type: str = "application/octet-stream",
        host: str = "*",
    ) -> bytes:
        """`size` pseudo-random bytes (returned, so a test can hash them)."""
        body = random.Random(target).randbytes(size)
        self.raw(target, body, content_type=content_type, host=host)
        return body

    def cut(self, target: str, body: bytes, at: int, *, host: str = "*") -> None:
        """A response that declares all of `body` but closes the connection after `at` bytes."""

        def handler(request: Request) -> Response:
            return Response(200, [("content-type", "text/html")], body, cut_at=at)

        self.route(target, handler, host=host)

    def trap(self, prefix: str = "/trap/", *, host: str = "*") -> None:
        """A space without end: every page under `prefix` links one level deeper and to a
        page with one more query parameter."""

        def handler(request: Request) -> Response:
            path, _, query = request.target.partition("?")
            n = query.count("&") + 1 if query else 0
            deeper = path.rstrip("/") + "/a/"
            more = path + "?" + "&".join(f"p{i}=1" for i in range(n + 1))
            body = f'<title>trap</title><a href="{deeper}">deeper</a><a href="{more}">more</a>'
            return _html_response(body)

        self.route_prefix(prefix, handler, host=host)


async def serve_site(
    site: Site,
    host: str,
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `site` on host:port until cancelled; `nursery.start` returns the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    site.ports[host] = bound
    task_status.started(bound)

    async def handle(stream: trio.SocketStream) -> None:
        await _serve_connection(site, host, stream)

    await trio.serve_listeners(handle, listeners)


class _CloseConnection(Exception):
    pass


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def _serve_connection(site: Site, host: str, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    client = "{}:{}".format(*stream.socket.getpeername()[:2])
    try:
        while True:
            event = await _next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            while not isinstance(await _next_event(conn, stream), h11.EndOfMessage):
                pass
            await _answer(site, host, client, conn, stream, event)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        h11.ProtocolError,
        _CloseConnection,
    ):
        return
    finally:
        await stream.aclose()


async def _answer(
    site: Site,
    host: str,
    client: str,
    conn: h11.Connection,
    stream: trio.SocketStream,
    request: h11.Request,
) -> None:
    target = request.target.decode("ascii", errors="replace")
    headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers)
    count = site.counts[(host, target)]
    site.counts[(host, target)] += 1
    site.in_flight[host] += 1
    site.max_in_flight[host] = max(site.max_in_flight[host], site.in_flight[host])
    try:
        try:
            response = site.respond(Request(host, target, headers, count))
        except Exception:
            log.exception("site handler for %s%s failed", host, target)
            response = _html_response("<title>Server error</title>", 500)
        agent = next((v for k, v in headers if k.lower() == "user-agent"), "")
        site.log.append(Hit(trio.current_time(), host, target, client, agent, response.status))
        out = list(response.headers)
        if response.trickle is None:
            out.append(("content-length", str(len(response.body))))
        if response.cut_at is not None:
            head = conn.send(h11.Response(status_code=response.status, headers=out))
            await stream.send_all(head + response.body[: response.cut_at])
            raise _CloseConnection
        await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=out)))
        if response.trickle is not None:
            while True:
                await stream.send_all(conn.send(h11.Data(data=b" ")))
                await trio.sleep(response.trickle)
        if response.body:
            await stream.send_all(conn.send(h11.Data(data=response.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    finally:
        site.in_flight[host] -= 1


def demo_site(
    n_pages: int = 300,
    hosts: Sequence[str] = ("127.0.0.1", "127.0.0.2", "127.0.0.3"),
    *,
    seed: int = 1,
) -> Site:
    """A site of about `n_pages` pages spread over `hosts`, every page reachable from "/" on
    the first host, with some of what a real crawl meets: a robots.txt with a Crawl-delay and a
    disallowed part on the second host, a redirect, a page that fails once, a binary file, a
    nofollow link and a broken link. Its link graph is in `site.links`."""
    rng = random.Random(seed)
    site = Site()
    names = [(hosts[i % len(hosts)], f"/p/{i}.html") for i in range(n_pages)]
    for i, (host, path) in enumerate(names):
        links: list[Link] = [names[(i + 1) % n_pages]]
        links += [names[rng.randrange(n_pages)] for _ in range(4)]
        site.page(
            path,
            host=host,
            title=f"Page {i}",
            text=f"Page {i} of the demo site on {host}.",
            links=links,
        )
    for h in hosts:
        site.page("/", host=h, title=f"Demo site on {h}", links=[names[0], (h, "/about")])
    site.page(
        "/about",
        host=hosts[0],
        title="About",
        text="Links a crawler should not follow, and some it should.",
        links=[(hosts[0], "/old-home"), (hosts[0], "/files/data.bin"), (hosts[0], "/flaky")],
    )
    site.page(
        "/about",
        host=hosts[-1],
        title="About",
        links=[(hosts[-1], "/missing"), "mailto:demo@example.invalid"],
        head='<meta name="robots" content="nofollow">',
    )
    site.redirect("/old-home", (hosts[0], "/"), host=hosts[0])
    site.binary("/files/data.bin", 4096, host=hosts[0])
    site.flaky("/flaky", failures=1, links=[names[-1]], host=hosts[0])
    if len(hosts) > 1:
        site.robots("User-agent: *\nDisallow: /private/\nCrawl-delay: 0.1\n", host=hosts[1])
        site.page("/about", host=hosts[1], links=[(hosts[1], "/private/secret")])
        site.page("/private/secret", host=hosts[1], title="Secret")
    return site
