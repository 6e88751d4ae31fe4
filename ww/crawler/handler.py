"""A user's page handler, shipped as a ROM: `--handler my.rom` (or a ROM source directory).

The ROM's entry names the handler: `entry = "myhandler:handle"`, an
`async def handle(page) -> dict | None` that every worker runs on every fetched page. `page` is a
`ww.crawler.worker.HandlerPage` (url, final_url, status, content_type, headers, body, text,
title, links, depth). The fields of the dict it returns go into the page's result; a "links"
list in it replaces the page's links (each is followed when it is in scope).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ww.rom import Rom, RomError, build_rom

__all__ = ["HandlerError", "load_handler", "read_handler_rom"]


class HandlerError(Exception):
    """A handler ROM that cannot be used; the message is one line."""


def read_handler_rom(path: Path) -> bytes:
    """The bytes of a handler ROM: a `.rom` file, or a ROM source directory built here."""
    try:
        data = build_rom(path) if path.is_dir() else path.read_bytes()
        rom = Rom.load(data)
    except OSError as exc:
        raise HandlerError(f"cannot read handler {path}: {exc.strerror or exc}") from None
    except RomError as exc:
        raise HandlerError(f"handler {path}: {exc}") from None
    with load_handler(rom.data):
        pass  # imports it once here, so a broken handler fails before the crawl starts
    return rom.data


@contextmanager
def load_handler(data: bytes) -> Iterator[Any]:
    """The handler function of a handler ROM, importable while the block runs."""
    from ww.rom.guest import _modules_of

    try:
        rom = Rom.load(data)
        rom.check_requires()
    except RomError as exc:
        raise HandlerError(f"handler ROM: {exc}") from None
    with _modules_of(rom):
        try:
            module = __import__(rom.manifest.entry_module, fromlist=["_"])
        except Exception as exc:
            raise HandlerError(
                f"handler ROM {rom.name}: importing {rom.manifest.entry_module} failed: {exc}"
            ) from None
        function = getattr(module, rom.manifest.entry_function, None)
        if not inspect.iscoroutinefunction(function):
            raise HandlerError(
                f"handler ROM {rom.name}: {rom.manifest.entry} is not an async function; "
                "define `async def handle(page)`"
            )
        yield function
