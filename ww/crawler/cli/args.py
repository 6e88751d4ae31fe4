"""The command lines of `ww-crawl` and its subcommands, and the crawl settings they give."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from ww.crawler.settings import DEFAULT_USER_AGENT, CrawlSettings, SettingsError

from .errors import EXIT_USAGE, CrawlError

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_OUTPUT",
    "Parser",
    "build_demo_parser",
    "build_export_parser",
    "build_parser",
    "build_status_parser",
    "given_changes",
    "settings_from_args",
]

DEFAULT_DATA_DIR = "ww-crawl-data"
DEFAULT_OUTPUT = "results.jsonl"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


SIZE = re.compile(r"([0-9]+)([KMG]?)(?:i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size, e.g. 512K, 10M or 1G")
    return int(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match[2].lower()]


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def positive(text: str) -> int:
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {exc}") from None
    return text


# Flags that make the settings; each maps to the CrawlSettings field of the same name. Their
# argparse default is None, so a resume knows which flags were given.
SETTING_FLAGS = {
    "scope": "scope",
    "allow": "allow",
    "deny": "deny",
    "max_depth": "max_depth",
    "max_pages": "max_pages",
    "ignore_robots": "ignore_robots",
    "user_agent": "user_agent",
    "per_host_concurrency": "per_host_concurrency",
    "delay": "delay",
    "retries": "retries",
    "max_bytes": "max_bytes",
    "timeout": "timeout",
    "max_text": "max_text",
    "concurrency": "concurrency",
}


def add_crawl_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to crawl")
    g.add_argument(
        "--scope",
        choices=("same-host", "same-domain", "any"),
        help="which hosts links may lead to, relative to the seeds (default: same-host)",
    )
    g.add_argument(
        "--allow",
        type=regex,
        action="append",
        metavar="REGEX",
        help="crawl only URLs matching one of these (repeatable)",
    )
    g.add_argument(
        "--deny",
        type=regex,
        action="append",
        metavar="REGEX",
        help="never crawl URLs matching this (repeatable)",
    )
    g.add_argument("--max-depth", type=count, metavar="N", help="link hops from a seed")
    g.add_argument("--max-pages", type=positive, metavar="N", help="stop after N results")
    g = p.add_argument_group("how to crawl")
    g.add_argument(
        "--ignore-robots", action="store_true", default=None, help="do not fetch or obey robots.txt"
    )
    g.add_argument(
        "--user-agent", metavar="TEXT", help=f"User-Agent header (default: {DEFAULT_USER_AGENT})"
    )
    g.add_argument(
        "--per-host-concurrency",
        type=positive,
        metavar="N",
        help="requests in flight per host, across the whole cluster (default: 2)",
    )
    g.add_argument(
        "--delay",
        type=seconds,
        metavar="SECONDS",
        help="least time between two requests to a host; Crawl-delay raises it (default: 0)",
    )
    g.add_argument(
        "--retries",
        type=count,
        metavar="N",
        help="tries after the first for connect errors, timeouts, 5xx, 429 (default: 3)",
    )
    g.add_argument(
        "--max-bytes",
        type=parse_size,
        metavar="SIZE",
        help="read at most this much of a body (default: 10M)",
    )
    g.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="total time for one request, redirects and body included (default: 30)",
    )
    g.add_argument(
        "--max-text",
        type=count,
        metavar="CHARS",
        help="visible text kept per page (default: 10000)",
    )
    g.add_argument(
        "--concurrency",
        type=positive,
        metavar="N",
        help="fetches in flight per worker (default: 32)",
    )
    g.add_argument(
        "--handler",
        metavar="ROM",
        help="a ROM (file or source dir) whose `async def handle(page)` runs on every page",
    )
    g = p.add_argument_group("output and state")
    g.add_argument(
        "-o", "--output", metavar="FILE", help=f"JSON Lines results (default: {DEFAULT_OUTPUT})"
    )
    g.add_argument("--warc", metavar="FILE", help="also write WARC request/response records")
    g.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"the crawl's hosts, queue and export state (default: ./{DEFAULT_DATA_DIR})",
    )
    g.add_argument("--resume", action="store_true", help="continue the crawl in DATA_DIR")
    g.add_argument(
        "--fresh",
        action="store_true",
        help="start over: remove the crawl in DATA_DIR and its output first",
    )
    g.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: crawl again the URLs whose result was an error",
    )
    g.add_argument(
        "--cluster",
        metavar="HOST:PORT",
        help="run on an existing ww cluster instead of starting one",
    )
    g.add_argument("--key", metavar="FILE", help="cluster key for --cluster")
    g.add_argument(
        "--workers", type=positive, default=1, metavar="N", help="worker ROMs per host (default: 1)"
    )
    g.add_argument(
        "--no-dashboard",
        action="store_true",
        help="a progress line every few seconds instead of the live dashboard",
    )
    g.add_argument("-v", "--verbose", action="count", default=0, help="log more")


def build_parser() -> Parser:
    p = Parser(
        prog="ww-crawl",
        description="Crawl the web from SEEDS (one URL a line) on a replicated queue.",
        epilog="Other commands: `ww-crawl demo`, `ww-crawl status`, `ww-crawl export DATA_DIR "
        "-o FILE` (each with --help).",
    )
    p.add_argument("seeds", metavar="SEEDS", help="a file with one URL a line (# comments)")
    add_crawl_options(p)
    return p


def build_demo_parser() -> Parser:
    p = Parser(prog="ww-crawl demo", description="Crawl a built-in offline site of three hosts.")
    add_crawl_options(p)
    p.set_defaults(data_dir="ww-crawl-demo")
    return p


def build_status_parser() -> Parser:
    p = Parser(prog="ww-crawl status", description="Show the state of a crawl.")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR")
    p.add_argument("--cluster", metavar="HOST:PORT")
    p.add_argument("--key", metavar="FILE")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def build_export_parser() -> Parser:
    p = Parser(prog="ww-crawl export", description="Write a crawl's results as JSON Lines.")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--warc", metavar="FILE", help="also write WARC (when the crawl kept bodies)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def settings_from_args(args: argparse.Namespace, seeds: Sequence[str]) -> CrawlSettings:
    values: dict[str, Any] = {"seeds": tuple(seeds)}
    for flag, name in SETTING_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    values["handler"] = bool(getattr(args, "handler", None))
    values["warc"] = bool(getattr(args, "warc", None))
    try:
        return CrawlSettings(**values)
    except SettingsError as exc:
        raise CrawlError(str(exc)) from None


def given_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The setting flags given on this command line (for a resume)."""
    changes: dict[str, Any] = {}
    for flag, name in SETTING_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            changes[name] = tuple(value) if isinstance(value, list) else value
    return changes
