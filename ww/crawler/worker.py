"""The crawl worker: claim URLs from the frontier, fetch them, and complete each batch at once.

One worker is a trio loop over a queue client (`ww.queue.QueueClient`):

- it claims up to `settings.batch` URLs at once whenever at least half a batch of its
  `settings.concurrency` fetch slots is free (or nothing is in flight);
- each page is fetched by `ww.crawler.fetch.fetch`, parsed by `ww.crawler.parse`, and turned into
  a record by `ww.crawler.record.make_record`;
- finished pages are completed together by ONE `complete` (results appended to
  `crawl.results`, robots policies to `crawl.robots`, new in-scope links put into
  `crawl.frontier`); while a complete is in flight the fetching goes on and the next complete
  gathers every page that finishes meanwhile;
- a failure worth retrying (`ww.crawler.retry.decide`) goes back to the queue with `release`
  and a backoff, so any worker may take it next;
- robots.txt: a host's robots item is claimed before its pages, because the frontier's default
  partition limit lets one item of a host be leased at a time until the worker that fetched
  robots.txt sets the host's own limit (per-host concurrency, and the larger of --delay and
  Crawl-delay). Every worker follows `crawl.robots` to know each host's policy.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx2
import msgpack
import trio

from ww.queue.commands import Item

from .fetch import FetchResult, fetch, fetch_robots, new_client
from .parse import is_html, parse_html
from .record import make_record
from .retry import Retry, backoff, decide
from .robots import Allow, Disallow, RobotsPolicy, Wait, host_delay, robots_url
from .scope import Scope
from .settings import CrawlSettings, claim_interval
from .urls import TrapLimits, host_key, is_trap

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG",
    "FRONTIER",
    "RESULTS",
    "ROBOTS",
    "STATS_TOPIC",
    "HandlerPage",
    "Worker",
    "WorkerStats",
    "frontier_item",
    "read_item",
    "retry_item",
    "robots_item",
    "wait_until_set_up",
]

FRONTIER = "crawl.frontier"
RESULTS = "crawl.results"
ROBOTS = "crawl.robots"
CONFIG = "crawl.config"
STATS_TOPIC = "ww-crawl.stats"
CONTROL_TOPIC = "ww-crawl.control"

ROBOTS_WAIT = 5.0  # how long a claimed page waits for its host's policy before going back
IDLE_POLL = 0.1  # seconds between claims while the frontier has nothing for us
STATS_INTERVAL = 0.25
PUT_MEMORY = 100_000  # frontier keys a worker remembers having put (see Worker._remember_put)
Handler = Callable[["HandlerPage"], Awaitable[Mapping[str, Any] | None]]


class QueueLike(Protocol):
    """The part of `ww.queue.QueueClient` a worker uses."""

    async def claim(self, topic: str, consumer: str, max_items: int, lease: float) -> list[Any]: ...
    async def complete(
        self,
        consumer: str,
        ids: list[int],
        append: dict[str, list[bytes]] | None = None,
        put: dict[str, list[Any]] | None = None,
    ) -> dict[str, Any]: ...
    async def release(self, consumer: str, ids: list[int], delay: float) -> Any: ...
    async def limit(
        self, topic: str, partition: str | None, max_leased: int | None, min_interval: float
    ) -> Any: ...
    async def read(self, topic: str, offset: int, n: int) -> list[tuple[int, bytes]]: ...
    async def stats(self, topic: str) -> dict[str, Any]: ...


async def wait_until_set_up(client: QueueLike, poll: float = 0.05) -> None:
    """Return once the crawl's topics exist in the queue: the CLI records the settings in
    CONFIG after creating every topic and before putting the seeds."""
    from ww.queue.client import QueueError

    while True:
        try:
            if (await client.stats(CONFIG)).get("appended", 0) > 0:
                return
        except QueueError:  # no such topic yet, or no leader yet
            pass
        await trio.sleep(poll)


def frontier_item(url: str, depth: int, referrer: str | None, host: str | None = None) -> Item:
    """The frontier item of a canonical page URL: keyed by it, partitioned by its host
    (`host`: its `host_key`, when the caller has it). The payload leaves out the URL, which
    is the key (a million-URL frontier stores and replicates it once, not twice)."""
    payload = msgpack.packb({"depth": depth, "referrer": referrer})
    return Item(payload=payload, key=url, partition=host_key(url) if host is None else host)


def retry_item(url: str, depth: int, referrer: str | None, generation: int) -> Item:
    """A failed page put back by --retry-failed: a new key, since the seen-set keeps the old."""
    payload = msgpack.packb({"url": url, "depth": depth, "referrer": referrer, "kind": "page"})
    return Item(payload=payload, key=f"{url} retry {generation}", partition=host_key(url))


def robots_item(url: str) -> Item:
    """The item that has robots.txt fetched for the host of `url` (once: its key is unique)."""
    host = host_key(url)
    payload = msgpack.packb(
        {"url": robots_url(url), "depth": 0, "referrer": None, "kind": "robots"}
    )
    return Item(payload=payload, key=f"robots:{host}", partition=host)


def read_item(key: str | None, payload: bytes) -> tuple[str, str, int, str | None]:
    """(kind, url, depth, referrer) of a frontier item made by the functions above; an
    exception for anything else. A page's item has its URL as its key."""
    fields = msgpack.unpackb(payload)
    url = fields.get("url", key)
    if type(url) is not str:
        raise TypeError(f"a frontier item without a URL: {fields!r}")
    return fields.get("kind", "page"), url, int(fields["depth"]), fields.get("referrer")


@dataclass(frozen=True, slots=True)
class HandlerPage:
    """What a user's `async def handle(page)` gets for each fetched page."""

    url: str
    final_url: str
    status: int | None
    content_type: str | None
    headers: dict[str, str]
    body: bytes
    text: str | None
    title: str | None
    links: tuple[str, ...]
    depth: int


@dataclass(slots=True)
class WorkerStats:
    pages: int = 0
    errors: int = 0
    retries: int = 0
    bytes: int = 0
    in_flight: int = 0
    status: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None

    def to_dict(self, worker: str, host: str) -> dict[str, Any]:
        return {
            "worker": worker,
            "host": host,
            "in_flight": self.in_flight,
            "pages": self.pages,
            "errors": self.errors,
            "retries": self.retries,
            "bytes": self.bytes,
            "status": dict(self.status),
            "time": time.time(),
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class _Outcome:
    """What became of one claimed item: a record to append (done), or a release (retry)."""

    id: int
    result: bytes | None = None  # the msgpack record for crawl.results
    robots: bytes | None = None  # the msgpack record for crawl.robots
    links: list[Any] = field(default_factory=list)  # items to put into the frontier
    release_after: float | None = None  # seconds; set when the item goes back to the queue


class Worker:
    """Crawls from `client` with `settings` until `stop()` (or cancellation)."""

    def __init__(
        self,
        client: QueueLike,
        settings: CrawlSettings,
        name: str,
        *,
        host_id: str = "",
        handler: Handler | None = None,
        publish: Callable[[bytes], Awaitable[None]] | None = None,
        http: httpx2.AsyncClient | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.name = name
        self.host_id = host_id
        self.handler = handler
        self.publish = publish
        self.stats = WorkerStats()
        self.scope = Scope(
            settings.scope,  # type: ignore[arg-type]  # checked by CrawlSettings
            settings.seeds,
            settings.allow,
            settings.deny,
            settings.max_depth,
        )
        self.traps = TrapLimits(
            settings.max_url_length, settings.max_repeated_segments, settings.max_query_params
        )
        self.policies: dict[str, tuple[RobotsPolicy, bool]] = {}  # host -> (policy, final)
        self._robots_offset = 0
        self._robots_changed = trio.Event()
        self._robots_asked = trio.Event()
        self._slots = trio.Semaphore(settings.concurrency)
        self._slot_freed = trio.Event()
        self._unsettled: set[int] = set()  # claimed ids whose fetch has not finished
        self._outcomes: list[_Outcome] = []  # settled, not yet completed or released
        self._settled = trio.Event()
        self._flush_lock = trio.Lock()
        self._stopping = trio.Event()
        self._drain: float | None = None
        self._results_count = 0
        self._robots_put: set[str] = set()
        self._put_keys: set[str] = set()  # frontier keys this worker's completes have put
        self._http = http
        self._own_http = http is None

    def stop(self, drain: float | None = None) -> None:
        """Claim nothing more; the batches in flight finish, or after `drain` seconds what is
        left of them goes back to the queue (see `run`)."""
        if drain is not None:
            self._drain = drain if self._drain is None else min(self._drain, drain)
        self._stopping.set()

    async def run(self) -> None:
        """Crawl until `stop()`; then finish the fetches in flight, complete what they found,
        and return."""
        http = self._http or new_client()
        self._http = http
        try:
            await self._catch_up_results_count()
            async with trio.open_nursery() as background:
                if not self.settings.ignore_robots:
                    background.start_soon(self._follow_robots)
                if self.publish is not None:
                    background.start_soon(self._publish_stats)
                background.start_soon(self._complete_loop)
                try:
                    async with trio.open_nursery() as fetches:
                        await self._claim_loop(fetches)
                        if self._drain is not None:
                            fetches.cancel_scope.deadline = trio.current_time() + self._drain
                finally:
                    # Fetches cut short by the drain time go back to the queue; what finished
                    # is completed.
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        try:
                            if self._unsettled:
                                await self.client.release(self.name, list(self._unsettled), 0.0)
                                self._unsettled.clear()
                            await self._flush()
                        except Exception as exc:  # their leases run out; others take them
                            log.warning("could not settle the last pages: %s", exc)
                background.cancel_scope.cancel()
            if self.publish is not None:
                with trio.move_on_after(1):
                    await self.publish(msgpack.packb(self.stats.to_dict(self.name, self.host_id)))
        finally:
            if self._own_http:
                with trio.CancelScope(shield=True):
                    await http.aclose()

    # -- the claim loop --------------------------------------------------------------------

    async def _claim_loop(self, fetches: trio.Nursery) -> None:
        """Claim whenever at least half a batch of fetch slots is free (or nothing is in
        flight), so that one claim, and later one complete, carries many URLs."""
        s = self.settings
        idle = IDLE_POLL
        low = max(1, min(s.batch, s.concurrency) // 2)
        while not self._stopping.is_set():
            if s.max_pages is not None and self._results_count >= s.max_pages:
                await self._sleep_or_stop(0.5)
                continue
            while self._slots.value < low and self._slots.value < s.concurrency:
                await self._slot_freed.wait()
                self._slot_freed = trio.Event()
            await self._slots.acquire()
            room = 1
            while room < s.batch and self._slots.value > 0:
                self._slots.acquire_nowait()
                room += 1
            try:
                claimed = await self.client.claim(FRONTIER, self.name, room, s.lease)
            except BaseException:
                for _ in range(room):
                    self._slots.release()
                raise
            for _ in range(room - len(claimed)):
                self._slots.release()
            if not claimed:
                await self._sleep_or_stop(idle)
                idle = min(idle * 1.5, 0.5)
                continue
            idle = IDLE_POLL
            self.stats.in_flight += len(claimed)
            for item in claimed:
                self._unsettled.add(item.id)
                fetches.start_soon(self._process, item)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._stopping.wait()

    async def _complete_loop(self) -> None:
        """Complete what the fetches settled, all of it at once: while one complete is in
        flight the next one gathers every page that finishes meanwhile (and the fetching goes
        on)."""
        while True:
            await self._settled.wait()
            self._settled = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        """Release the retries, then complete the rest in one proposal."""
        async with self._flush_lock:
            outcomes, self._outcomes = self._outcomes, []
            if outcomes:
                await self._settle(outcomes)

    async def _settle(self, outcomes: list[_Outcome]) -> None:
        releases: dict[float, list[int]] = {}
        for o in outcomes:
            if o.release_after is not None:
                releases.setdefault(o.release_after, []).append(o.id)
        for delay, ids in releases.items():
            await self.client.release(self.name, ids, delay)
        done = [o for o in outcomes if o.release_after is None]
        if not done:
            return
        results = [o.result for o in done if o.result is not None]
        robots = [o.robots for o in done if o.robots is not None]
        links: dict[str, Any] = {}
        for o in done:
            for item in o.links:
                if item.key not in self._put_keys:
                    links.setdefault(item.key, item)
        append: dict[str, list[bytes]] = {}
        if results:
            append[RESULTS] = results
        if robots:
            append[ROBOTS] = robots
        answer = await self.client.complete(
            self.name,
            [o.id for o in done],
            append=append or None,
            put={FRONTIER: list(links.values())} if links else None,
        )
        self._remember_put(links)
        first = (answer.get("appended") or {}).get(RESULTS)
        if first is not None:
            self._results_count = max(self._results_count, first + len(results))
        if robots:
            self._robots_asked.set()

    def _remember_put(self, keys: Iterable[str]) -> None:
        """Remember keys the queue has seen, so that links found again are not put again:
        the queue would drop them (its seen-set is the authority), after a Raft round, an
        fsync and a lookup per item on every replica. Bounded: forgotten keys are just put."""
        if len(self._put_keys) > PUT_MEMORY:
            self._put_keys.clear()
        self._put_keys.update(keys)

    async def _process(self, item: Any) -> None:
        try:
            outcome = await self._handle(item)
        except Exception as exc:  # a bug in a page's handling must not lose the item
            log.exception("processing %r failed", item)
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            outcome = _Outcome(item.id, release_after=5.0)
        finally:
            self._slots.release()
            self._slot_freed.set()
            self.stats.in_flight -= 1
        self._unsettled.discard(item.id)
        self._outcomes.append(outcome)
        self._settled.set()

    async def _handle(self, item: Any) -> _Outcome:
        try:
            kind, url, depth, referrer = read_item(item.key, item.payload)
        except Exception:
            log.warning("dropping a malformed frontier item %r", item.key)
            return _Outcome(item.id)
        if kind == "robots":
            return await self._fetch_robots(item, url)
        return await self._fetch_page(item, url, depth, referrer)

    # -- robots.txt --------------------------------------------------------------------------

    async def _fetch_robots(self, item: Any, url: str) -> _Outcome:
        """Fetch a host's robots.txt. While it is unavailable (5xx, 429, no answer) the host
        waits: this worker tries again after a backoff, holding the robots item, which is the
        only item of the host that may be leased until its policy is known; when the lease
        has no room left for another try, the item goes back to the queue instead."""
        s = self.settings
        host = host_key(url)
        assert self._http is not None
        claimed = trio.current_time()
        attempt = item.attempts
        while True:
            delay = backoff(attempt)
            policy = await fetch_robots(
                self._http, url, user_agent=s.user_agent, timeout=s.timeout, retry_delay=delay
            )
            if policy.kind != "unavailable" or attempt > s.retries:
                break
            self.stats.retries += 1
            self.stats.last_error = f"{url}: robots.txt unavailable (status {policy.status})"
            used = trio.current_time() - claimed
            if used + delay + s.timeout + 1.0 > s.lease or self._stopping.is_set():
                await self._append_robots(host, policy, final=False)
                return _Outcome(item.id, release_after=delay)
            await trio.sleep(delay)
            attempt += 1
        interval = host_delay(policy, s.user_agent, minimum=s.delay)
        await self.client.limit(FRONTIER, host, s.per_host_concurrency, claim_interval(interval))
        record = {
            "host": host,
            "policy": policy.to_dict(),
            "fetched_at": time.time(),
            "final": True,
        }
        self._learn(host, policy, True)
        return _Outcome(item.id, robots=msgpack.packb(record))

    async def _append_robots(self, host: str, policy: RobotsPolicy, *, final: bool) -> None:
        from ww.queue.client import QueueError

        record = {
            "host": host,
            "policy": policy.to_dict(),
            "fetched_at": time.time(),
            "final": final,
        }
        try:
            await self.client.complete(self.name, [], append={ROBOTS: [msgpack.packb(record)]})
        except QueueError as exc:
            log.warning("could not record robots.txt of %s: %s", host, exc)
        self._learn(host, policy, final)

    def _learn(self, host: str, policy: RobotsPolicy, final: bool) -> None:
        self.policies[host] = (policy, final)
        self._robots_changed.set()
        self._robots_changed = trio.Event()

    async def _follow_robots(self) -> None:
        while True:
            records = await self.client.read(ROBOTS, self._robots_offset, 500)
            for offset, data in records:
                self._robots_offset = offset + 1
                try:
                    rec = msgpack.unpackb(data)
                    policy = RobotsPolicy.from_dict(rec["policy"])
                    host, final = str(rec["host"]), bool(rec.get("final", True))
                except Exception:
                    log.warning("skipping a malformed robots record at offset %d", offset)
                    continue
                self._learn(host, policy, final)
            if len(records) < 500:
                await trio.sleep(0.05)
                with trio.move_on_after(0.5):
                    await self._robots_asked.wait()
                self._robots_asked = trio.Event()

    async def _policy(self, host: str) -> tuple[RobotsPolicy, bool] | None:
        """The host's robots policy, waiting up to ROBOTS_WAIT for it to be known."""
        with trio.move_on_after(ROBOTS_WAIT):
            while host not in self.policies:
                self._robots_asked.set()
                await self._robots_changed.wait()
        return self.policies.get(host)

    # -- pages ---------------------------------------------------------------------------------

    def _robots_decision(self, url: str) -> str | None:
        """Why a redirect hop to `url` is not followed (robots or scope), or None."""
        if self.settings.ignore_robots:
            return None
        known = self.policies.get(host_key(url))
        if known is None:
            return "robots.txt of its host is not known yet"
        if isinstance(known[0].check(url, self.settings.user_agent), Allow):
            return None
        return "disallowed by robots.txt"

    async def _fetch_page(self, item: Any, url: str, depth: int, referrer: str | None) -> _Outcome:
        s = self.settings
        host = host_key(url)
        if not s.ignore_robots:
            known = await self._policy(host)
            if known is None:  # its robots item is still queued: give the page back
                return _Outcome(item.id, release_after=1.0)
            policy, final = known
            decision = policy.check(url, s.user_agent)
            if isinstance(decision, Wait):
                if not final:
                    return _Outcome(item.id, release_after=max(decision.delay, 1.0))
                return self._result(
                    item, url, depth, referrer, error="robots.txt unavailable; the host was skipped"
                )
            if isinstance(decision, Disallow):
                return self._result(item, url, depth, referrer, error="disallowed by robots.txt")

        def check_hop(target: str) -> str | None:
            return self.scope.reason(target, depth) or self._robots_decision(target)

        assert self._http is not None
        result = await fetch(
            self._http,
            url,
            user_agent=s.user_agent,
            max_bytes=s.max_bytes,
            timeout=s.timeout,
            check_hop=check_hop,
        )
        verdict = decide(result, item.attempts, s.retries, time.time())
        if isinstance(verdict, Retry):
            self.stats.retries += 1
            self.stats.last_error = f"{url}: {verdict.reason}"
            return _Outcome(item.id, release_after=verdict.delay)
        return await self._page_result(item, url, depth, referrer, result)

    async def _page_result(
        self, item: Any, url: str, depth: int, referrer: str | None, result: FetchResult
    ) -> _Outcome:
        s = self.settings
        page = None
        if (
            result.status is not None
            and result.error is None
            and is_html(result.content_type, result.body)
        ):
            try:
                page = parse_html(
                    result.body,
                    result.final_url,
                    content_type=result.content_type,
                    x_robots_tag=result.x_robots_tag,
                    max_text=s.max_text,
                )
            except Exception as exc:  # a page the parser cannot read is recorded, not lost
                log.warning("cannot parse %s: %s", url, exc)
        links = list(page.links) if page is not None else []
        extra: dict[str, Any] = {}
        if self.handler is not None and result.status is not None:
            extra, links = await self._run_handler(result, page, depth, links)
        if s.warc and result.status is not None:
            extra.update(
                _body=result.body,
                _headers=[list(h) for h in result.headers],
                _request_headers=[["User-Agent", s.user_agent]],
            )
        record = make_record(
            url,
            depth=depth,
            referrer=referrer,
            fetched_at=time.time(),
            attempts=item.attempts,
            worker=self.name,
            result=result,
            page=page,
            links=links,
            extra=extra,
        )
        if result.truncated:
            record["truncated"] = True
        self._count(result)
        return _Outcome(
            item.id, result=msgpack.packb(record), links=self._follow(url, depth, links)
        )

    def _result(
        self, item: Any, url: str, depth: int, referrer: str | None, *, error: str
    ) -> _Outcome:
        record = make_record(
            url,
            depth=depth,
            referrer=referrer,
            fetched_at=time.time(),
            attempts=item.attempts,
            worker=self.name,
            error=error,
        )
        self.stats.errors += 1
        self.stats.last_error = f"{url}: {error}"
        return _Outcome(item.id, result=msgpack.packb(record))

    def _count(self, result: FetchResult) -> None:
        self.stats.pages += 1
        self.stats.bytes += result.size
        if result.status is not None:
            self.stats.status[str(result.status)] += 1
        if result.error is not None or (result.status or 0) >= 400:
            self.stats.errors += 1
            self.stats.last_error = f"{result.url}: {result.error or result.status}"

    def _follow(self, url: str, depth: int, links: list[str]) -> list[Any]:
        """Frontier items for the in-scope links of a page (robots items first for hosts this
        worker has not put one for yet)."""
        items: list[Any] = []
        pages: list[Any] = []
        for link in links:
            if link in self._put_keys:
                continue
            host = host_key(link)
            if self.scope.reason(link, depth + 1, host) is not None or is_trap(link, self.traps):
                continue
            if not self.settings.ignore_robots and host not in self._robots_put:
                self._robots_put.add(host)
                items.append(robots_item(link))
            pages.append(frontier_item(link, depth + 1, url, host))
        return items + pages

    async def _run_handler(
        self, result: FetchResult, page: Any, depth: int, links: list[str]
    ) -> tuple[dict[str, Any], list[str]]:
        from .urls import canonicalize

        assert self.handler is not None
        hp = HandlerPage(
            url=result.url,
            final_url=result.final_url,
            status=result.status,
            content_type=result.content_type,
            headers={k.lower(): v for k, v in result.headers},
            body=result.body,
            text=page.text if page is not None else None,
            title=page.title if page is not None else None,
            links=tuple(links),
            depth=depth,
        )
        try:
            returned = await self.handler(hp)
        except Exception as exc:
            log.warning("the handler failed on %s: %s", result.url, exc)
            return {"handler_error": f"{type(exc).__name__}: {exc}"}, links
        if returned is None:
            return {}, links
        if not isinstance(returned, Mapping):
            return {
                "handler_error": f"handle() returned {type(returned).__name__}, not a dict"
            }, links
        fields = dict(returned)
        extra_links = fields.pop("links", None)
        if extra_links is not None:
            found: list[str] = []
            for ref in extra_links:
                try:
                    found.append(canonicalize(str(ref)))
                except ValueError:
                    continue
            links = list(dict.fromkeys(found))
        return fields, links

    # -- bookkeeping -------------------------------------------------------------------------

    async def _catch_up_results_count(self) -> None:
        if self.settings.max_pages is None:
            return
        stats = await self.client.stats(RESULTS)
        self._results_count = int(stats.get("appended", 0))

    async def _publish_stats(self) -> None:
        assert self.publish is not None
        while True:
            try:
                await self.publish(msgpack.packb(self.stats.to_dict(self.name, self.host_id)))
            except Exception as exc:  # the dashboard is best effort; the crawl goes on
                log.debug("publishing stats failed: %s", exc)
            await trio.sleep(STATS_INTERVAL)
