"""From HTML bytes to a `Page`: title, visible text, links to follow, robots directives.

Decoding follows the order browsers and w3lib use: a byte-order mark, then the charset of the
Content-Type header, then `<meta charset>` / `http-equiv` (where UTF-16 or UTF-32 means UTF-8,
as in browsers: a `<meta>` that could be read is not UTF-16), then UTF-8. When the bytes are
not valid in the declared encoding (a wrong charset) and are valid in another candidate (the
meta charset, UTF-8, then Windows-1252), that candidate is used instead of decoding with
replacement characters.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from selectolax.lexbor import LexborHTMLParser
from w3lib.encoding import (
    html_body_declared_encoding,
    html_to_unicode,
    http_content_type_encoding,
    read_bom,
)

from .urls import link_resolver

if TYPE_CHECKING:
    from .fetch import FetchResult

__all__ = [
    "DEFAULT_MAX_TEXT",
    "Page",
    "decode_html",
    "is_html",
    "parse_fetched",
    "parse_html",
    "robots_directives",
]

DEFAULT_MAX_TEXT = 100_000
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_SKIP_SCHEMES = ("mailto:", "javascript:", "tel:", "data:", "ftp:", "file:", "about:", "blob:")
_INVISIBLE = ["script", "style", "noscript", "template"]
_LINKS = "a[href], area[href], frame[src], iframe[src]"
_BOT_TOKEN = "ww-crawl"
_ASCII_SPACES = ("\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")  # but " "


@dataclass(frozen=True, slots=True)
class Page:
    """What a crawler keeps of an HTML page. `links` are the canonical URLs to follow, in
    document order without repeats; `nofollow_links` the ones held back by `rel=nofollow` or a
    page-wide nofollow (meta robots or X-Robots-Tag)."""

    url: str
    encoding: str
    title: str | None
    text: str
    links: tuple[str, ...]
    nofollow_links: tuple[str, ...]
    noindex: bool
    nofollow: bool


def is_html(content_type: str | None, body: bytes = b"") -> bool:
    """True for an HTML media type; with no Content-Type, when the body starts like HTML."""
    if content_type:
        return content_type.split(";", 1)[0].strip().lower() in _HTML_TYPES
    head = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<title"))


def robots_directives(value: str | None, bot: str = _BOT_TOKEN) -> set[str]:
    """The directives of a meta robots content or X-Robots-Tag value that apply to us:
    lower-cased, `none` expanded to noindex and nofollow; `otherbot: noindex` is skipped."""
    out: set[str] = set()
    if not value:
        return out
    scoped_to: str | None = None
    for raw in value.split(","):
        part = raw.strip().lower()
        if ":" in part:
            name, _, rest = part.partition(":")
            if name.strip() not in ("unavailable_after",):
                scoped_to, part = name.strip(), rest.strip()
        if scoped_to is not None and scoped_to != bot:
            continue
        if part == "none":
            out.update(("noindex", "nofollow"))
        elif part:
            out.add(part)
    return out


def decode_html(body: bytes, content_type: str | None) -> tuple[str, str]:
    """(encoding, text) of an HTML body, by the rules in this module's docstring."""
    if read_bom(body)[0] is None and not http_content_type_encoding(content_type):
        declared = html_body_declared_encoding(body)
        if declared and codecs.lookup(declared).name.startswith(("utf-16", "utf-32")):
            content_type = "text/html; charset=utf-8"  # a <meta> that can be read is ASCII
    encoding, text = html_to_unicode(content_type, body)
    if "\ufffd" in text and read_bom(body)[0] is None and not _decodes(body, encoding):
        for candidate in (html_body_declared_encoding(body), "utf-8", "cp1252"):
            if candidate and _decodes(body, candidate):
                return codecs.lookup(candidate).name, body.decode(candidate)
    return codecs.lookup(encoding).name, text


def _decodes(body: bytes, encoding: str) -> bool:
    try:
        body.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return False
    return True


def parse_html(
    body: bytes,
    url: str,
    *,
    content_type: str | None = None,
    x_robots_tag: str | None = None,
    max_text: int = DEFAULT_MAX_TEXT,
) -> Page:
    """Parse an HTML page fetched from `url` (its final URL, after redirects)."""
    encoding, html = decode_html(body, content_type)
    tree = LexborHTMLParser(html)

    directives = robots_directives(x_robots_tag)
    for meta in tree.css("meta[name][content]"):
        name = (meta.attributes.get("name") or "").strip().lower()
        if name in ("robots", _BOT_TOKEN):
            directives |= robots_directives(meta.attributes.get("content"))
    noindex, nofollow = "noindex" in directives, "nofollow" in directives

    title_node = tree.css_first("title")
    title = " ".join(title_node.text().split()) if title_node is not None else None

    base = url
    base_node = tree.css_first("base[href]")
    if base_node is not None:
        base = urljoin(url, (base_node.attributes.get("href") or "").strip())

    resolve = link_resolver(base)
    follow: dict[str, None] = {}
    held: dict[str, None] = {}
    for node in tree.css(_LINKS):
        attrs = node.attributes
        ref = (attrs.get("href") if node.tag in ("a", "area") else attrs.get("src")) or ""
        ref = ref.strip()
        if not ref or ref.startswith("#") or ref.lower().startswith(_SKIP_SCHEMES):
            continue
        try:
            link = resolve(ref)
        except ValueError:
            continue
        rel = (attrs.get("rel") or "").lower().split()
        if nofollow or "nofollow" in rel:
            held[link] = None
        else:
            follow[link] = None
    for link in follow:
        held.pop(link, None)

    tree.strip_tags(_INVISIBLE)
    root = tree.body if tree.body is not None else tree.root
    text = (
        _squeeze(root.text(separator=" ", strip=True, skip_empty=True)) if root is not None else ""
    )
    return Page(
        url=url,
        encoding=encoding,
        title=title,
        text=text[:max_text],
        links=tuple(follow),
        nofollow_links=tuple(held),
        noindex=noindex,
        nofollow=nofollow,
    )


def _squeeze(text: str) -> str:
    """`" ".join(text.split())`, without splitting a text that has single spaces only.

    The text of a page is its text nodes, each stripped, joined by spaces: the same words as
    its nodes joined as they are, and most often with nothing left to squeeze."""
    if (
        text.isascii()
        and "  " not in text
        and not any(space in text for space in _ASCII_SPACES)
        and not text.startswith(" ")
        and not text.endswith(" ")
    ):
        return text
    return " ".join(text.split())


def parse_fetched(result: FetchResult, *, max_text: int = DEFAULT_MAX_TEXT) -> Page | None:
    """The page of a fetch that brought HTML with a 2xx status; None for anything else
    (binary content, error pages, redirects not followed, fetches that failed part-way)."""
    if (
        result.error is not None
        or result.status is None
        or not 200 <= result.status < 300
        or not result.body
    ):
        return None
    if not is_html(result.content_type, result.body):
        return None
    return parse_html(
        result.body,
        result.final_url,
        content_type=result.content_type,
        x_robots_tag=result.x_robots_tag,
        max_text=max_text,
    )
