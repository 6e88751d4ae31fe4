"""Record each HTML page's h1-h3 headings and its declared language."""

from __future__ import annotations

from typing import Any

from selectolax.lexbor import LexborHTMLParser


async def handle(page: Any) -> dict[str, Any] | None:
    if not (page.content_type or "").startswith("text/html"):
        return None  # nothing to add for other content
    tree = LexborHTMLParser(page.body)
    html = tree.css_first("html")
    return {
        "headings": [" ".join(n.text().split()) for n in tree.css("h1, h2, h3")],
        "lang": html.attributes.get("lang") if html is not None else None,
    }
