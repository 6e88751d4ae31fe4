"""`ww-crawl`: crawl from a seeds file on an embedded local cluster (or an existing one).

    ww-crawl SEEDS [options]            crawl; results stream into results.jsonl
    ww-crawl demo [options]             crawl a built-in offline site of three hosts
    ww-crawl status [--data-dir DIR]    the state of a running crawl, from another terminal
    ww-crawl export DATA_DIR -o FILE    write a crawl's results again

Expected failures raise `CrawlError` (or another error whose message is one line); `main` prints
it as one line and returns 1 (2 for usage errors). Ctrl-C stops a crawl cleanly: the workers
finish or give back what they hold, the export is flushed; a second Ctrl-C stops at once.

The modules, one job each: `main` (the entry point: which command, logging, Ctrl-C, errors as
one line), `args` (the command lines), `datadir` (crawl.json and the checks of a data dir),
`run` (a crawl's run), `prepare` (the queue made ready for a run), `results` (reading results
back), `commands` (status, export, demo), `errors` (`CrawlError`, exit codes). Importing them
loads argparse, trio, msgpack and the crawl settings; the cluster, queue, worker, export and
dashboard modules are imported when a command needs them.
"""

from __future__ import annotations

from .args import build_parser
from .errors import CrawlError
from .main import main

__all__ = ["CrawlError", "build_parser", "main"]
