"""The seeds file: one URL a line; `#` starts a comment; blank lines are skipped."""

from __future__ import annotations

import re
from pathlib import Path

from .urls import canonicalize

__all__ = ["SeedsError", "parse_seeds", "read_seeds"]


class SeedsError(ValueError):
    """A seeds file that cannot be used; the message is one line naming the file and line."""


def parse_seeds(text: str, source: str = "seeds") -> list[str]:
    """The canonical URLs of a seeds file's text, in order, each once."""
    seeds: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()  # a comment after the URL
        if not line or line.startswith("#"):
            continue
        try:
            url = canonicalize(line)
        except ValueError as exc:
            raise SeedsError(
                f"{source}, line {number}: {exc}; write one http(s) URL a line"
            ) from None
        if url not in seen:
            seen.add(url)
            seeds.append(url)
    if not seeds:
        raise SeedsError(f"{source} holds no URL; write one http(s) URL a line")
    return seeds


def read_seeds(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SeedsError(f"no seeds file {path}; pass a file with one URL a line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SeedsError(f"cannot read seeds file {path}: {exc}") from None
    return parse_seeds(text, str(path))
