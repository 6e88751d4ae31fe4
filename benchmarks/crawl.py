"""Crawl throughput: ww-crawl against Scrapy and a bare trio + httpx2 + selectolax loop.

    python benchmarks/crawl.py [--runs 3] [--sweep 8,16,32,48,64]
    python benchmarks/crawl.py --quick              # a 2,000-page site, one run each
    python benchmarks/crawl.py --frontier-scale     # 1,000,000 discovered URLs, --max-pages

A static site (20,000 pages of about 8 KB with 10 in-site links each, a few hundred binary
files, on three hosts 127.0.0.1-3, generated deterministically from `--seed`) is written to a
temporary directory and served by nginx (a child process with its own configuration, one free
port on the three addresses, access log on). nginx's own rate under a plain fetch loop is
printed first, so a reader can check the server is never the limit.

Then each crawler crawls the whole site from one seed page per host, in the same run:

  1. ww-crawl with its defaults (embedded cluster of 3 hosts, 3 durable Raft replicas, one
     worker per host, dashboard off), politeness opened up for this site (see WW_CRAWL_FLAGS);
  2. Scrapy (a spider written at run time: robots off, AUTOTHROTTLE off, no delay,
     CONCURRENT_REQUESTS = CONCURRENT_REQUESTS_PER_DOMAIN = the concurrency, JSON Lines feed);
  3. the bare loop, benchmarks/_bare_crawl.py (in-memory frontier, no replication).

Scrapy and the bare loop run at every concurrency of `--sweep`; each system is compared at its
own best setting (and also at ww-crawl's setting). For each run: pages/s (unique URLs in the
output over the wall time from start to exit), CPU seconds per 1,000 pages of every process of
the crawler (RUSAGE_CHILDREN around the run, with the process tree also sampled from /proc every
0.2 s in case a descendant is not reaped by its parent), peak RSS of the whole process tree
(sampled every 0.2 s), the pages in the output (unique URLs, duplicates, missing ones), the
requests nginx logged and the share of a core nginx used. Medians of `--runs` runs. The last
line printed is `ratio: ww-crawl/scrapy=R1 ww-crawl/bare=R2` (pages/s, each at its best).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urldefrag

HERE = Path(__file__).resolve().parent
BARE = HERE / "_bare_crawl.py"
LOAD = HERE / "_load.py"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
NGINX_HELP = "install it with `apt-get update && apt-get install -y nginx` (Debian/Ubuntu)"
PAGE_BYTES = 8 * 1024
LINKS_PER_PAGE = 10
FRONTIER_FANOUT = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# ---------------------------------------------------------------------------------------------
# ww-crawl: the command line. Adjust the flags here.

WW_CRAWL_ENV = "WW_CRAWL"
"""An environment variable naming the ww-crawl command to run (default: `ww-crawl` on PATH)."""

WW_CRAWL_IN_FLIGHT = 96
"""Fetches ww-crawl keeps in flight with its defaults: 3 workers (one per embedded host) x 32.
Scrapy and the bare loop are also compared at this concurrency ("the same setting")."""

WW_CRAWL_FLAGS = [
    "--no-dashboard",
    "--ignore-robots",
    "--delay",
    "0",
    "--per-host-concurrency",
    str(WW_CRAWL_IN_FLIGHT),
    "--scope",
    "same-host",
]
"""Politeness opened up for the benchmark site; everything else is ww-crawl's default."""


def ww_crawl_command(
    seeds: Path, data_dir: Path, out: Path, max_pages: int | None = None
) -> list[str]:
    exe = os.environ.get(WW_CRAWL_ENV) or "ww-crawl"
    cmd = [exe, str(seeds), "--data-dir", str(data_dir), "-o", str(out), *WW_CRAWL_FLAGS]
    if max_pages is not None:
        cmd += ["--max-pages", str(max_pages)]
    return cmd


def compile_ww() -> None:
    """Write the bytecode of the `ww` package, as installing it does (Scrapy's is installed):
    with PYTHONDONTWRITEBYTECODE, or a fresh checkout, each of ww-crawl's processes would
    otherwise compile ww from source at every start."""
    import compileall

    try:
        import ww
    except ImportError:  # ww-crawl comes from elsewhere (WW_CRAWL)
        return
    root = Path(ww.__file__).parent
    with contextlib.redirect_stdout(io.StringIO()):
        ok = compileall.compile_dir(root, quiet=1)
    print(f"compiled the bytecode of {root}{'' if ok else ' (some files failed)'}", flush=True)


def ww_crawl_missing() -> str | None:
    """Why ww-crawl cannot run here, or None when `ww-crawl --help` works."""
    exe = os.environ.get(WW_CRAWL_ENV) or "ww-crawl"
    if shutil.which(exe) is None:
        return f"`{exe}` is not on PATH"
    try:
        done = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return f"`{exe} --help` did not answer within 60 s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"`{exe} --help` failed: {lines[-1] if lines else f'exit {done.returncode}'}"
    return None


# ---------------------------------------------------------------------------------------------
# The site


@dataclass(slots=True, frozen=True)
class Site:
    root: Path
    pages: dict[str, int]  # host -> HTML pages
    binaries: dict[str, list[str]]  # host -> binary file names
    frontier: bool = False

    def seeds(self, port: int) -> list[str]:
        first = "f/" if self.frontier else "p/00000.html"
        return [f"http://{h}:{port}/{first}" for h in HOSTS]

    def urls(self, port: int) -> set[str]:
        out: set[str] = set()
        for h in HOSTS:
            out.update(f"http://{h}:{port}/p/{i:05d}.html" for i in range(self.pages[h]))
            out.update(f"http://{h}:{port}/b/{name}" for name in self.binaries[h])
        return out

    @property
    def total(self) -> int:
        return sum(self.pages.values()) + sum(len(b) for b in self.binaries.values())


def corpus(rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(2000)]
    return " ".join(rng.choices(words, k=300_000))


def filler(rng: random.Random, text: str, size: int) -> str:
    start = rng.randrange(len(text) - size - 1)
    start = text.index(" ", start) + 1
    chunk = text[start : start + size]
    paras = [chunk[i : i + 700] for i in range(0, len(chunk), 700)]
    return "\n".join(f"<p>{p}</p>" for p in paras)


def page_html(title: str, links: Sequence[tuple[str, str]], body: str) -> str:
    nav = "\n".join(f'<li><a href="{href}">{text}</a></li>' for href, text in links)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title>\n<style>body{{font-family:sans-serif;max-width:60em}}</style>"
        f"</head>\n<body><h1>{title}</h1>\n<nav><ul>\n{nav}\n</ul></nav>\n{body}\n"
        '<p><a href="mailto:web@example.invalid">mail</a></p>\n'
        "<script>window.bench = 1;</script></body></html>\n"
    )


def generate_site(root: Path, pages: int, binaries: int, seed: int) -> Site:
    """`pages` HTML pages and `binaries` binary files spread over the three hosts.

    Page i of a host links to pages 2i+1 and 2i+2 (a binary tree rooted at the seed page 0, so
    every page is reachable), to i+1, and to 7 pages drawn at random (one of them with a
    #fragment, the same page as without it); page i < the host's binary count also links to
    binary file i. Every page is padded with text to about PAGE_BYTES.
    """
    rng = random.Random(seed)
    text = corpus(rng)
    counts = {h: pages // 3 + (1 if k < pages % 3 else 0) for k, h in enumerate(HOSTS)}
    bins: dict[str, list[str]] = {}
    for k, host in enumerate(HOSTS):
        n = counts[host]
        (root / host / "p").mkdir(parents=True)
        (root / host / "b").mkdir()
        nb = binaries // 3 + (1 if k < binaries % 3 else 0)
        names = [f"{i:05d}.{('png', 'pdf', 'zip', 'bin')[i % 4]}" for i in range(nb)]
        bins[host] = names
        for name in names:
            (root / host / "b" / name).write_bytes(rng.randbytes(rng.randint(2_000, 60_000)))
        for i in range(n):
            targets = [j for j in (2 * i + 1, 2 * i + 2, i + 1) if j < n]
            while len(targets) < LINKS_PER_PAGE:
                targets.append(rng.randrange(n))
            links = [(f"{j:05d}.html", f"page {j}") for j in targets]
            href, label = links[-1]
            links[-1] = (f"{href}#part{rng.randint(1, 9)}", label)
            if i < nb:
                links.append((f"../b/{names[i]}", f"file {names[i]}"))
            head = page_html(f"{host} page {i}", links, "")
            body = filler(rng, text, max(500, PAGE_BYTES - len(head)))
            (root / host / "p" / f"{i:05d}.html").write_text(
                page_html(f"{host} page {i}", links, body)
            )
    return Site(root, counts, bins)


def generate_frontier_site(root: Path, seed: int) -> Site:
    """One template per host, served for every path under /f/ (nginx try_files): it links to
    FRONTIER_FANOUT relative children `0/` .. `49/`, so each crawled page adds 50 new URLs."""
    rng = random.Random(seed)
    text = corpus(rng)
    for host in HOSTS:
        (root / host).mkdir(parents=True)
        links = [(f"{j}/", f"child {j}") for j in range(FRONTIER_FANOUT)]
        head = page_html("frontier page", links, "")
        body = filler(rng, text, max(500, PAGE_BYTES - len(head)))
        (root / host / "template.html").write_text(page_html("frontier page", links, body))
    return Site(root, {h: 0 for h in HOSTS}, {h: [] for h in HOSTS}, frontier=True)


# ---------------------------------------------------------------------------------------------
# nginx


def find_nginx() -> str:
    for path in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if path and os.access(path, os.X_OK):
            return path
    sys.exit(f"crawl.py: nginx not found; {NGINX_HELP}")


def free_port() -> int:
    """A port free on all three addresses (nginx binds it just after; a clash is retried)."""
    for _ in range(50):
        socks = []
        try:
            s = socket.socket()
            s.bind((HOSTS[0], 0))
            socks.append(s)
            port: int = s.getsockname()[1]
            for h in HOSTS[1:]:
                t = socket.socket()
                socks.append(t)
                t.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no port free on 127.0.0.1-3")


NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ text/html html; image/png png; application/pdf pdf; application/zip zip; }}
    default_type application/octet-stream;
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60;
    keepalive_requests 1000000;
{servers}
}}
"""

NGINX_SERVER = """\
    server {{
        listen {host}:{port};
        root {root}/{host};
        location /f/ {{ try_files $uri /template.html; }}
    }}"""


@dataclass(slots=True)
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    access_log: Path

    def requests_logged(self) -> int:
        with open(self.access_log, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def cpu_ticks(self) -> int:
        table = proc_table()
        return sum(table[p].ticks for p in tree_of(table, [self.proc.pid]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nginx(exe: str, site: Site, tmp: Path, workers: int) -> Nginx:
    for _ in range(5):
        port = free_port()
        servers = "\n".join(NGINX_SERVER.format(host=h, port=port, root=site.root) for h in HOSTS)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, workers=workers, tmp=tmp, servers=servers))
        with open(tmp / "nginx.out", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [exe, "-p", str(tmp), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if all(port_open(h, port) for h in HOSTS):
                return Nginx(proc, port, tmp / "access.log")
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    err = (tmp / "error.log").read_text(errors="replace") if (tmp / "error.log").exists() else ""
    sys.exit(f"crawl.py: nginx did not start: {err.strip().splitlines()[-1:] or 'no error log'}")


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Processes: the tree, its CPU and its memory


@dataclass(slots=True, frozen=True)
class Stat:
    ppid: int
    ticks: int  # utime + stime of the process itself
    rss: int  # bytes


def proc_table() -> dict[int, Stat]:
    table: dict[int, Stat] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2 :].split()
        table[int(name)] = Stat(
            int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[21]) * PAGE_SIZE
        )
    return table


def tree_of(table: dict[int, Stat], roots: Sequence[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st.ppid, []).append(pid)
    out: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


def machine_ticks() -> tuple[int, int]:
    """(idle, total) CPU ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def become_subreaper() -> None:
    """Orphaned descendants of a crawler are re-parented to this process (not to init), so they
    are still seen in the tree and their CPU lands in RUSAGE_CHILDREN when reaped here."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


@dataclass(slots=True)
class Measured:
    rc: int
    wall: float
    cpu: float  # seconds, all processes of the tree
    peak_rss: int  # bytes, sum over the tree
    nginx_cpu: float  # seconds
    idle: float  # share of the machine's CPU time left idle during the run
    requests: int  # logged by nginx
    strays: int  # descendants still running `grace` seconds after the main process exited
    log: Path


def measure(
    cmd: list[str],
    log: Path,
    nginx: Nginx,
    timeout: float,
    cwd: Path,
) -> Measured:
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    req0, ng0 = nginx.requests_logged(), nginx.cpu_ticks()
    cpu0 = machine_ticks()
    ignore = {nginx.proc.pid}
    me = os.getpid()
    seen_ticks: dict[int, int] = {}
    peak = 0
    timed_out = False
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        pids: set[int] = {proc.pid}
        try:
            while True:
                table = proc_table()
                orphans = [p for p, st in table.items() if st.ppid == me and p not in ignore]
                pids = tree_of(table, [proc.pid, *orphans])
                peak = max(peak, sum(table[p].rss for p in pids))
                for p in pids:
                    seen_ticks[p] = table[p].ticks
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if time.perf_counter() - t0 > timeout:
                        timed_out = True
                        kill_all(pids)
        except BaseException:  # Ctrl-C: the crawler runs in its own session, so stop it here
            kill_all(pids | {proc.pid})
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    strays = reap_strays(me, ignore)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    cpu = max(cpu, sum(seen_ticks.values()) / CLK_TCK)
    rc = -9 if timed_out else proc.returncode
    return Measured(
        rc,
        wall,
        cpu,
        peak,
        (nginx.cpu_ticks() - ng0) / CLK_TCK,
        idle_share(cpu0, machine_ticks()),
        nginx.requests_logged() - req0,
        strays,
        log,
    )


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def reap_strays(me: int, ignore: set[int], grace: float = 10.0) -> int:
    """Reap the children of ours other than nginx (orphans of the crawler, re-parented here),
    waiting up to `grace` seconds for them to exit; kill the rest. Returns how many were killed.
    """
    deadline = time.monotonic() + grace
    while True:
        table = proc_table()
        left = []
        for pid in (p for p, st in table.items() if st.ppid == me and p not in ignore):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    left.append(pid)
        if not left:
            return 0
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return len(left)
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# The crawlers

SPIDER = '''\
"""Written by benchmarks/crawl.py: crawl the seeds' hosts, one item per URL."""
import hashlib
from urllib.parse import urldefrag, urlsplit

import scrapy
from scrapy.http import TextResponse
from scrapy.linkextractors import LinkExtractor

TEXT = "//body//text()[not(ancestor::script or ancestor::style or ancestor::noscript)]"


class BenchSpider(scrapy.Spider):
    name = "bench"

    def __init__(self, seeds, **kwargs):
        super().__init__(**kwargs)
        with open(seeds) as f:
            lines = [line.strip() for line in f]
        self.start_urls = [u for u in lines if u and not u.startswith("#")]
        self.scope = {urlsplit(u).netloc for u in self.start_urls}
        self.links = LinkExtractor(
            deny_extensions=[], tags=("a", "area", "frame", "iframe"), attrs=("href", "src")
        )

    async def start(self):
        # Seeds go through the duplicate filter too (Scrapy's default start bypasses it, so a
        # link back to a seed page would fetch it a second time).
        for url in self.start_urls:
            yield scrapy.Request(url, callback=self.parse)

    def parse(self, response):
        body = response.body
        ctype = response.headers.get("Content-Type", b"").decode("latin-1")
        referrer = response.request.headers.get("Referer")
        item = {
            "url": response.url, "status": response.status, "content_type": ctype,
            "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
            "depth": response.meta.get("depth", 0),
            "referrer": referrer.decode() if referrer else None,
            "title": None, "links": [], "text": None,
        }
        if isinstance(response, TextResponse) and ctype.startswith("text/html"):
            item["title"] = response.css("title::text").get()
            links = []
            for link in self.links.extract_links(response):
                url = urldefrag(link.url)[0]
                if urlsplit(url).netloc in self.scope:
                    links.append(url)
            item["links"] = links = list(dict.fromkeys(links))
            words = (t.strip() for t in response.xpath(TEXT).getall())
            item["text"] = " ".join(w for w in words if w)[:10000]
            for url in links:
                yield scrapy.Request(url, callback=self.parse)
        yield item
'''


def scrapy_command(
    spider: Path, seeds: Path, out: Path, concurrency: int, max_pages: int | None = None
) -> list[str]:
    settings = {
        "ROBOTSTXT_OBEY": "False",
        "AUTOTHROTTLE_ENABLED": "False",
        "DOWNLOAD_DELAY": "0",
        "CONCURRENT_REQUESTS": str(concurrency),
        "CONCURRENT_REQUESTS_PER_DOMAIN": str(concurrency),
        "LOG_LEVEL": "INFO",
        "TELNETCONSOLE_ENABLED": "False",
    }
    if max_pages is not None:
        settings["CLOSESPIDER_PAGECOUNT"] = str(max_pages)
    cmd = [sys.executable, "-m", "scrapy", "runspider", str(spider), "-a", f"seeds={seeds}"]
    cmd += ["-O", f"{out}:jsonlines"]
    for k, v in settings.items():
        cmd += ["-s", f"{k}={v}"]
    return cmd


def bare_command(
    seeds: Path, out: Path, concurrency: int, max_pages: int | None = None
) -> list[str]:
    cmd = [sys.executable, str(BARE), str(seeds), "-o", str(out), "--concurrency", str(concurrency)]
    if max_pages is not None:
        cmd += ["--max-pages", str(max_pages)]
    return cmd


# ---------------------------------------------------------------------------------------------
# Checking the output


@dataclass(slots=True)
class Output:
    lines: int
    unique: int
    duplicates: int
    missing: int  # expected URLs not in the output
    unexpected: int  # URLs in the output the site does not have
    not_ok: int  # records whose status is not 200
    discovered: int  # distinct links seen in the records (the frontier-scale run)


def check_output(path: Path, expected: set[str] | None, count_links: bool) -> Output:
    urls: set[str] = set()
    links: set[str] = set()
    lines = not_ok = 0
    if path.exists():
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                lines += 1
                urls.add(urldefrag(str(rec.get("url")))[0])
                if rec.get("status") != 200:
                    not_ok += 1
                if count_links:
                    links.update(rec.get("links") or ())
    exp = expected if expected is not None else urls
    return Output(
        lines,
        len(urls),
        lines - len(urls),
        len(exp - urls),
        len(urls - exp),
        not_ok,
        len(links | urls),
    )


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(slots=True)
class Run:
    system: str
    concurrency: int
    measured: Measured
    output: Output

    @property
    def pages_per_s(self) -> float:
        return self.output.unique / self.measured.wall if self.measured.wall else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return 1000 * self.measured.cpu / max(1, self.output.unique)


@dataclass(slots=True)
class Bench:
    site: Site
    nginx: Nginx
    tmp: Path
    seeds: Path
    spider: Path
    expected: set[str] | None
    timeout: float
    max_pages: int | None = None
    runs: list[Run] = field(default_factory=list)
    counter: int = 0

    def run(self, system: str, concurrency: int) -> Run:
        self.counter += 1
        work = self.tmp / f"run-{self.counter:03d}-{system}-{concurrency}"
        work.mkdir()
        out = work / "out.jsonl"
        if system == "ww-crawl":
            cmd = ww_crawl_command(self.seeds, work / "data", out, self.max_pages)
        elif system == "scrapy":
            cmd = scrapy_command(self.spider, self.seeds, out, concurrency, self.max_pages)
        else:
            cmd = bare_command(self.seeds, out, concurrency, self.max_pages)
        m = measure(cmd, work / "log.txt", self.nginx, self.timeout, work)
        o = check_output(out, self.expected, self.site.frontier)
        r = Run(system, concurrency, m, o)
        self.runs.append(r)
        note = "" if m.rc == 0 else f"  EXIT {m.rc}: {last_line(r)} (log: {m.log})"
        if m.strays:
            note += f"  {m.strays} stray processes killed"
        print(
            f"  {system:8} c={concurrency:<3} {r.pages_per_s:8.1f} pages/s  "
            f"{r.cpu_per_1k:6.2f} CPU-s/1k  {m.peak_rss / 2**20:7.1f} MB  "
            f"{o.unique} pages ({o.duplicates} dup, {o.missing} missing)  {m.wall:6.1f} s  "
            f"idle {m.idle:.0%}{note}",
            flush=True,
        )
        # Keep the logs; drop the bulky output and data.
        if m.rc == 0:
            out.unlink(missing_ok=True)
            shutil.rmtree(work / "data", ignore_errors=True)
        return r


@dataclass(slots=True)
class Summary:
    system: str
    concurrency: int
    pages_per_s: float
    cpu_per_1k: float
    peak_rss: float
    unique: int
    worst_missing: int
    worst_dups: int
    not_ok: int
    requests: int
    nginx_core: float
    idle: float
    failed: int
    discovered: int


def last_line(run: Run) -> str:
    lines = run.measured.log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit {run.measured.rc}, no output"


def summarize(runs: list[Run], failed: int) -> Summary:
    """Medians over the runs that exited with status 0; `failed` counts the others."""
    med = statistics.median
    return Summary(
        runs[0].system,
        runs[0].concurrency,
        med(r.pages_per_s for r in runs),
        med(r.cpu_per_1k for r in runs),
        med(r.measured.peak_rss for r in runs),
        min(r.output.unique for r in runs),
        max(r.output.missing for r in runs),
        max(r.output.duplicates for r in runs),
        max(r.output.not_ok for r in runs),
        int(med(r.measured.requests for r in runs)),
        med(r.measured.nginx_cpu / r.measured.wall for r in runs),
        med(r.measured.idle for r in runs),
        failed,
        int(med(r.output.discovered for r in runs)),
    )


def print_table(rows: list[Summary], expected: int | None) -> None:
    print(
        f"{'system':8} {'conc':>4} {'pages/s':>8} {'CPU-s/1k':>8} {'peak RSS':>9} "
        f"{'in output':>10} {'dup':>4} {'missing':>7} {'not 200':>7} {'nginx req':>9} "
        f"{'nginx core':>10} {'idle':>5}"
    )
    for s in rows:
        out = f"{s.unique}" + (f"/{expected}" if expected else "")
        fail = f"  ({s.failed} runs failed)" if s.failed else ""
        print(
            f"{s.system:8} {s.concurrency:>4} {s.pages_per_s:8.1f} {s.cpu_per_1k:8.2f} "
            f"{s.peak_rss / 2**20:7.1f}MB {out:>10} {s.worst_dups:>4} {s.worst_missing:>7} "
            f"{s.not_ok:>7} {s.requests:>9} {s.nginx_core:9.0%} {s.idle:5.0%}{fail}"
        )


def fmt_ratio(a: Summary | None, b: Summary | None, attr: str = "pages_per_s") -> str:
    if a is None or b is None or not getattr(b, attr):
        return "n/a"
    return f"{getattr(a, attr) / getattr(b, attr):.2f}"


# ---------------------------------------------------------------------------------------------
# nginx's own rate


def nginx_rate(nginx: Nginx, site: Site, tmp: Path, seconds: float, procs: int) -> float:
    """Requests/s nginx serves to `procs` plain fetch loops (32 connections each), and the
    share of a core nginx used meanwhile; prints both and what one core of nginx would serve."""
    if site.frontier:
        urls = [
            f"http://{h}:{nginx.port}/f/{i}/{j}/"
            for h in HOSTS
            for i in range(50)
            for j in range(50)
        ]
    else:
        urls = sorted(site.urls(nginx.port))
    url_file = tmp / "urls.txt"
    url_file.write_text("\n".join(urls))
    ng0, t0 = nginx.cpu_ticks(), time.perf_counter()
    procs_ = [
        subprocess.Popen(
            [
                sys.executable,
                str(LOAD),
                str(url_file),
                "--seconds",
                str(seconds),
                "--concurrency",
                "32",
                "--seed",
                str(k),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        for k in range(procs)
    ]
    results = [json.loads(p.communicate()[0]) for p in procs_]
    wall = time.perf_counter() - t0
    ng_cpu = (nginx.cpu_ticks() - ng0) / CLK_TCK
    total = sum(r["requests"] for r in results)
    errors = sum(r["errors"] for r in results)
    secs = max(r["seconds"] for r in results)
    rate = total / secs
    mb = sum(r["bytes"] for r in results) / secs / 2**20
    per_core = total / ng_cpu if ng_cpu else float("inf")
    print(
        f"nginx: {rate:.0f} requests/s ({mb:.0f} MB/s, {errors} errors) to {procs} plain fetch "
        f"processes x 32 connections over {secs:.1f} s; nginx used {ng_cpu / wall:.0%} of a core "
        f"meanwhile, i.e. about {per_core:.0f} requests per CPU-second of nginx",
        flush=True,
    )
    wrk = shutil.which("wrk")
    if wrk:
        ng0, t0 = nginx.cpu_ticks(), time.perf_counter()
        done = subprocess.run(
            [wrk, f"-t{procs}", "-c64", f"-d{max(1, round(seconds))}s", urls[0]],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        ng_cpu = (nginx.cpu_ticks() - ng0) / CLK_TCK
        rate_line = [x for x in done.stdout.splitlines() if x.startswith("Requests/sec")]
        if rate_line:
            print(
                f"nginx: {rate_line[0].split()[-1]} requests/s to wrk ({procs} threads x 64 "
                f"connections, one page); nginx used {ng_cpu / wall:.0%} of a core meanwhile",
                flush=True,
            )
    return per_core


# ---------------------------------------------------------------------------------------------
# Main


def machine() -> str:
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"machine: {os.cpu_count()} cores, load average {la}"


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="crawl-bench-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2,000-page site, one run each")
    p.add_argument(
        "--frontier-scale",
        action="store_true",
        help="a site that keeps linking to new pages: 1,000,000 discovered URLs",
    )
    p.add_argument("--pages", type=int, help="HTML pages (default 20000; 2000 with --quick)")
    p.add_argument("--binaries", type=int, help="binary files (default 300; 30 with --quick)")
    p.add_argument("--runs", type=int, help="runs per setting (default 3; 1 with --quick)")
    p.add_argument(
        "--sweep",
        default="8,16,32,48,64",
        help="concurrencies for Scrapy and the bare loop (default 8,16,32,48,64)",
    )
    p.add_argument(
        "--max-pages",
        type=int,
        help="--frontier-scale: pages to crawl (default 20000, i.e. 1,000,000 "
        "discovered URLs; 2000 with --quick)",
    )
    p.add_argument(
        "--systems",
        default="ww-crawl,scrapy,bare",
        help="which crawlers to run (default ww-crawl,scrapy,bare)",
    )
    p.add_argument("--seed", type=int, default=1, help="the site's random seed")
    p.add_argument("--nginx-workers", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.pages = args.pages or (2000 if args.quick else 20000)
    args.binaries = args.binaries if args.binaries is not None else (30 if args.quick else 300)
    args.max_pages = args.max_pages or (2000 if args.quick else 20000)
    args.sweep = sorted({int(x) for x in args.sweep.split(",") if x.strip()})
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - {"ww-crawl", "scrapy", "bare"}
    if unknown:
        p.error(f"unknown system {sorted(unknown)}: choose from ww-crawl, scrapy, bare")
    return args


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP stop a run as Ctrl-C does: the crawler and nginx are stopped and the
    temporary directory deleted."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nginx_exe = find_nginx()
    become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's choice stands
            signal.signal(sig, interrupt)
    systems = list(args.systems)
    missing_ww = ww_crawl_missing() if "ww-crawl" in systems else None
    if missing_ww:
        print(f"ww-crawl is not available ({missing_ww}); running Scrapy and the bare loop only")
        systems.remove("ww-crawl")
    print(machine(), flush=True)
    if "ww-crawl" in systems:
        compile_ww()
    with workspace(args.keep) as tmp:
        t0 = time.perf_counter()
        if args.frontier_scale:
            site = generate_frontier_site(tmp / "site", args.seed)
            what = (
                f"frontier site: one template per host served by nginx (try_files) for every "
                f"path, {FRONTIER_FANOUT} new links a page; crawling {args.max_pages} pages "
                f"discovers about {args.max_pages * FRONTIER_FANOUT:,} URLs"
            )
        else:
            site = generate_site(tmp / "site", args.pages, args.binaries, args.seed)
            what = (
                f"site: {sum(site.pages.values())} pages + "
                f"{sum(len(b) for b in site.binaries.values())} binary files on "
                f"{len(HOSTS)} hosts"
            )
        print(f"{what} (generated in {time.perf_counter() - t0:.1f} s)", flush=True)
        nginx = start_nginx(nginx_exe, site, tmp, args.nginx_workers)
        try:
            return crawl_all(args, systems, missing_ww, site, nginx, tmp)
        finally:
            nginx.stop()


def crawl_all(
    args: argparse.Namespace,
    systems: list[str],
    missing_ww: str | None,
    site: Site,
    nginx: Nginx,
    tmp: Path,
) -> int:
    nginx_rate(nginx, site, tmp, seconds=3.0 if args.quick else 5.0, procs=os.cpu_count() or 2)
    seeds = tmp / "seeds.txt"
    seeds.write_text("\n".join(site.seeds(nginx.port)) + "\n")
    spider = tmp / "bench_spider.py"
    spider.write_text(SPIDER)
    frontier = site.frontier
    expected = None if frontier else site.urls(nginx.port)
    total = args.max_pages if frontier else site.total
    bench = Bench(
        site,
        nginx,
        tmp,
        seeds,
        spider,
        expected,
        timeout=max(300.0, total / 25),
        max_pages=args.max_pages if frontier else None,
    )
    if frontier:
        plan = {s: [WW_CRAWL_IN_FLIGHT] for s in systems}
    else:
        sweep = sorted(set(args.sweep) | {WW_CRAWL_IN_FLIGHT})
        plan = {s: ([WW_CRAWL_IN_FLIGHT] if s == "ww-crawl" else sweep) for s in systems}
    for k in range(args.runs):
        print(f"run {k + 1}/{args.runs}:", flush=True)
        for system in systems:
            for c in plan[system]:
                bench.run(system, c)
    print(machine())
    rows: list[Summary] = []
    failed: list[str] = []
    for s in systems:
        for c in plan[s]:
            runs = [r for r in bench.runs if r.system == s and r.concurrency == c]
            ok = [r for r in runs if r.measured.rc == 0]
            if ok:
                rows.append(summarize(ok, len(runs) - len(ok)))
            else:
                failed.append(f"{s} at {c}: all {len(runs)} runs failed ({last_line(runs[-1])})")
    print(
        f"medians of {args.runs} run(s); pages/s = unique URLs in the output / wall time; "
        f"nginx core = share of one core nginx used during the crawl; idle = share of the "
        f"machine's CPU nobody used during the crawl (near 0%: the crawl shared the machine)"
    )
    print_table(rows, None if frontier else site.total)
    for line in failed:
        print(line)
    if frontier:
        for row in rows:
            print(
                f"frontier-scale {row.system}: {row.pages_per_s:.1f} pages/s, total peak RSS "
                f"{row.peak_rss / 2**20:.0f} MB, {row.discovered:,} URLs discovered"
            )
    best = {
        s: max((r for r in rows if r.system == s), key=lambda r: r.pages_per_s, default=None)
        for s in ("ww-crawl", "scrapy", "bare")
    }
    same = {
        s: next((r for r in rows if r.system == s and r.concurrency == WW_CRAWL_IN_FLIGHT), None)
        for s in ("ww-crawl", "scrapy", "bare")
    }
    for label, pick in (("each at its best", best), (f"same setting ({WW_CRAWL_IN_FLIGHT})", same)):
        parts = []
        for name in ("ww-crawl", "scrapy", "bare"):
            one = pick[name]
            if one is not None:
                parts.append(f"{name} {one.pages_per_s:.1f} pages/s at {one.concurrency}")
        print(f"{label}: " + ", ".join(parts))
        ww, sc, bare = pick["ww-crawl"], pick["scrapy"], pick["bare"]
        print(
            f"  ratios {label}: pages/s ww-crawl/scrapy={fmt_ratio(ww, sc)} "
            f"ww-crawl/bare={fmt_ratio(ww, bare)} bare/scrapy={fmt_ratio(bare, sc)}; "
            f"CPU per page ww-crawl/scrapy={fmt_ratio(ww, sc, 'cpu_per_1k')} "
            f"ww-crawl/bare={fmt_ratio(ww, bare, 'cpu_per_1k')} "
            f"bare/scrapy={fmt_ratio(bare, sc, 'cpu_per_1k')}; peak RSS "
            f"ww-crawl/scrapy={fmt_ratio(ww, sc, 'peak_rss')} "
            f"ww-crawl/bare={fmt_ratio(ww, bare, 'peak_rss')}"
        )
    complete = not failed and all(
        s.failed == 0 and s.worst_dups == 0 and (frontier or s.worst_missing == 0) for s in rows
    )
    if not complete:
        print("note: some runs failed or their output has duplicates or missing pages (above)")
    if missing_ww:
        print(f"ww-crawl is not available ({missing_ww}): no ww-crawl numbers")
    print(
        f"ratio: ww-crawl/scrapy={fmt_ratio(best['ww-crawl'], best['scrapy'])} "
        f"ww-crawl/bare={fmt_ratio(best['ww-crawl'], best['bare'])}"
    )
    return 0 if complete and not missing_ww else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("crawl.py: interrupted; the crawler and nginx were stopped")
