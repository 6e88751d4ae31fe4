"""The entry point of `ww-crawl`: pick the command, set up logging, run it under trio, turn
Ctrl-C into a clean stop and an expected error into one line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from ww.cli import unwrap
from ww.crawler.settings import SettingsError

from .args import build_demo_parser, build_export_parser, build_parser, build_status_parser
from .commands import cmd_demo, cmd_export, cmd_status
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, CrawlError
from .run import RUNNING, cmd_crawl

log = logging.getLogger(__package__)

__all__ = ["main", "parse", "setup_logging"]

COMMANDS = ("status", "export", "demo")


def setup_logging(verbosity: int) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=verbosity > 0)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Any]:
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "status":
            return build_status_parser().parse_args(rest), cmd_status
        if command == "export":
            return build_export_parser().parse_args(rest), cmd_export
        return build_demo_parser().parse_args(rest), cmd_demo
    return build_parser().parse_args(argv), cmd_crawl


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ww-crawl`; returns the exit code."""
    args, command = parse(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        return trio.run(_until_interrupted, command, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as group:
        exc = unwrap(group)
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if isinstance(exc, SystemExit):
            raise
        if args.verbose:
            log.error("failed", exc_info=exc)
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, _known_errors()):
            text = f"{type(exc).__name__}: {text} (run with -v for the traceback)"
        print(f"ww-crawl: error: {text}", file=sys.stderr)
        return EXIT_ERROR


async def _until_interrupted(command: Any, args: argparse.Namespace) -> int:
    """Run the command; the first Ctrl-C (or SIGTERM) asks a crawl to stop cleanly, the second
    stops everything at once."""
    code = EXIT_INTERRUPTED
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal code
                code = await command(args)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            first = True
            async for _ in signals:
                if first and RUNNING:
                    first = False
                    print("ww-crawl: stopping (Ctrl-C again to stop at once)", file=sys.stderr)
                    for crawl in RUNNING:
                        crawl.stopping.set()
                    continue
                nursery.cancel_scope.cancel()
                break
    return code


def _known_errors() -> tuple[type[BaseException], ...]:
    known: list[type[BaseException]] = [CrawlError, SettingsError]
    for module, names in (
        ("ww.crawler.seeds", ("SeedsError",)),
        ("ww.crawler.cluster", ("ClusterError",)),
        ("ww.crawler.export", ("ExportError",)),
        ("ww.crawler.handler", ("HandlerError",)),
        ("ww.queue.client", ("QueueError",)),
        ("ww.rom", ("RomError",)),
        ("ww.auth", ("AuthError",)),
        ("ww.rpc", ("RemoteError", "ConnectionLost", "CapabilityError")),
    ):
        mod = sys.modules.get(module)
        for name in names:
            error = getattr(mod, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                known.append(error)
    return tuple(known)
