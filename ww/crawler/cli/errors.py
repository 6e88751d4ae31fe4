"""The error `ww-crawl` reports in one line, and its exit codes."""

from __future__ import annotations

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "CrawlError"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CrawlError(Exception):
    """An expected failure; the message is one line saying what is wrong and what to do."""
