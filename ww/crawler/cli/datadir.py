"""The data dir of a crawl: crawl.json, what it holds, and the checks before a crawl uses it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CrawlError

__all__ = ["CRAWL_JSON", "EXPORT_STATE", "CrawlInfo", "check_data_dir"]

CRAWL_JSON = "crawl.json"
EXPORT_STATE = "export.json"


@dataclass(slots=True)
class CrawlInfo:
    """crawl.json: what the data dir holds."""

    seeds_file: str
    output: str
    warc: str | None
    settings: dict[str, Any]
    started: str
    hosts: list[str]
    handler: str | None = None
    retry_generation: int = 0
    pending_retry: list[str] | None = None  # URLs being put back by --retry-failed

    @classmethod
    def load(cls, path: Path) -> CrawlInfo:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise CrawlError(f"cannot read {path}: {exc}; start over with --fresh") from None

    def save(self, path: Path) -> None:
        fresh = path.with_name(path.name + ".new")
        fresh.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        fresh.replace(path)


def check_data_dir(data_dir: Path, args: argparse.Namespace, what: str) -> CrawlInfo | None:
    """The earlier crawl in `data_dir` when resuming; None for a new crawl. Refuses to reuse a
    data dir silently."""
    info_path = data_dir / CRAWL_JSON
    if args.resume and args.fresh:
        raise CrawlError("--resume and --fresh contradict each other; pass one")
    if args.retry_failed and not args.resume:
        raise CrawlError("--retry-failed goes with --resume")
    earlier = info_path.exists() or (data_dir / "hosts").exists()
    if args.resume:
        if not info_path.exists():
            raise CrawlError(f"{data_dir} holds no crawl to resume; start one without --resume")
        return CrawlInfo.load(info_path)
    if earlier and not args.fresh:
        raise CrawlError(
            f"{data_dir} holds an earlier crawl; pass --resume to continue it or --fresh to "
            "start over"
        )
    if args.fresh and data_dir.exists():
        from ww.crawler.cluster import stop_stale_hosts

        stop_stale_hosts(data_dir)  # refuses when a ww-crawl is running there
        if info_path.exists():
            old = CrawlInfo.load(info_path)
            for name in (old.output, old.warc):
                if name:
                    Path(name).unlink(missing_ok=True)
        shutil.rmtree(data_dir)
    return None
