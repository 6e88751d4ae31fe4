"""The host's ROM cache: ROM files by content id in one directory, least recently used out.

Also `check_count`, the check the executor's disk limits share with the cache's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

from ww.durable import write_atomic
from ww.rom.archive import Rom, RomError

__all__ = ["ROM_CACHE_LIMIT", "RomCache", "check_count"]

log = logging.getLogger("ww.rom.executor")

ROM_CACHE_LIMIT = 1024 * 1024 * 1024  # bytes of cached ROMs
_CID = re.compile(r"[0-9a-f]{64}")


class RomCache:
    """ROM files by content id in one directory, at most `limit` bytes of them in all.

    Storing a ROM evicts the least recently used others until the cache fits, but never a ROM
    that `in_use()` names (those of starting and running processes), nor the one just stored:
    while they run the cache may exceed its limit. A use stamps the file's access time, so
    the order survives a restart.
    """

    def __init__(self, root: Path, limit: int, in_use: Callable[[], Collection[str]]) -> None:
        self.root = root
        self.limit = check_count("rom_cache_limit", limit, 0)
        self._in_use = in_use
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        root.mkdir(parents=True, exist_ok=True)
        found = []
        for path in root.iterdir():
            cid = path.name.removesuffix(".rom")
            if path.name.endswith(".tmp"):  # a write cut short by a crash
                path.unlink(missing_ok=True)
            elif path.name.endswith(".rom") and _CID.fullmatch(cid):
                st = path.stat()
                found.append((st.st_atime_ns, cid, st.st_size))
        for _, cid, size in sorted(found):
            self._sizes[cid] = size
        self._evict()

    @property
    def size(self) -> int:
        """Bytes of cached ROMs."""
        return sum(self._sizes.values())

    def cids(self) -> list[str]:
        """The content ids cached, least recently used first."""
        return list(self._sizes)

    def path(self, cid: str) -> Path:
        if not isinstance(cid, str) or not _CID.fullmatch(cid):
            raise RomError(f"{cid!r} is not a ROM content id (64 lowercase hex digits)")
        return self.root / f"{cid}.rom"

    def get(self, cid: str) -> Rom | None:
        """The cached ROM with content id `cid`, or None when it is not here."""
        path = self.path(cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._sizes.pop(cid, None)
            return None
        try:
            rom = Rom.load(data)
        except RomError:
            rom = None
        if rom is None or rom.cid != cid:
            log.warning("dropping corrupt cached ROM %s", path)
            path.unlink(missing_ok=True)
            self._sizes.pop(cid, None)
            return None
        self._sizes[cid] = len(data)
        self._used(cid, path)
        return rom

    def put(self, rom: Rom) -> Path:
        """The cache file of `rom`, written (durably) unless an intact copy is there."""
        path = self.path(rom.cid)
        if _sha256_of(path) != rom.cid:
            write_atomic(path, rom.data)
        self._sizes[rom.cid] = len(rom.data)
        self._used(rom.cid, path)
        self._evict(keep=rom.cid)
        return path

    def _used(self, cid: str, path: Path) -> None:
        self._sizes.move_to_end(cid)
        with contextlib.suppress(OSError):  # the order in memory is what counts until restart
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))

    def _evict(self, keep: str | None = None) -> None:
        total = self.size
        if total <= self.limit:
            return
        spared = {*self._in_use(), keep}
        for cid in list(self._sizes):
            if total <= self.limit:
                break
            if cid in spared:
                continue
            size = self._sizes.pop(cid)
            total -= size
            try:
                self.path(cid).unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot evict cached ROM %s: %s", cid, e)
            else:
                log.info("evicted ROM %s (%d bytes) from the cache", cid[:12], size)


def check_count(name: str, value: int, minimum: int) -> int:
    """`value`, when it is a whole number of at least `minimum`; else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, not {value!r}")
    return value


def _sha256_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None
