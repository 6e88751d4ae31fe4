"""Anchor paths: parsing and validation.

A path is absolute (``/<peer id>/name/name``) or relative to an anchor (``name/name``).
Components use letters, digits, ``.``, ``_`` and ``-``; ``.`` and ``..`` are refused, as are
empty components (``//``). Limits keep a hostile client from growing the tree without bound.
"""

from __future__ import annotations

import re

MAX_PATH_LENGTH = 1024
MAX_DEPTH = 32
MAX_COMPONENT_LENGTH = 128

_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")

Parts = tuple[str, ...]


class AnchorPathError(ValueError):
    """An anchor path is malformed; the message is one line saying what is wrong."""


def parse_path(path: object, base: Parts = ()) -> Parts:
    """Return the components of `path`, resolved against `base` when it is relative."""
    if not isinstance(path, str):
        raise AnchorPathError(f"anchor path must be a string, not {type(path).__name__}")
    if len(path) > MAX_PATH_LENGTH:
        raise AnchorPathError(
            f"anchor path is {len(path)} characters long; at most {MAX_PATH_LENGTH}"
        )
    absolute = path.startswith("/")
    body = path[1:] if absolute else path
    if body.endswith("/"):
        body = body[:-1]
    parts: Parts = tuple(body.split("/")) if body else ()
    for part in parts:
        _check_component(part, path)
    full = parts if absolute else base + parts
    if len(full) > MAX_DEPTH:
        raise AnchorPathError(
            f"anchor path {path!r} is {len(full)} levels deep; at most {MAX_DEPTH}"
        )
    return full


def format_path(parts: Parts) -> str:
    """The absolute path string for `parts` (``/`` for the root)."""
    return "/" + "/".join(parts)


def _check_component(part: str, path: str) -> None:
    if not part:
        raise AnchorPathError(f"anchor path {path!r} has an empty component ('//')")
    if part in (".", ".."):
        raise AnchorPathError(f"anchor path {path!r} uses {part!r}; only plain names are allowed")
    if len(part) > MAX_COMPONENT_LENGTH:
        raise AnchorPathError(
            f"anchor name {part[:20]!r}... is {len(part)} characters;"
            f" at most {MAX_COMPONENT_LENGTH}"
        )
    if not _COMPONENT.fullmatch(part):
        raise AnchorPathError(
            f"anchor name {part!r} in {path!r} has characters other than"
            " letters, digits, '.', '_', '-'"
        )
