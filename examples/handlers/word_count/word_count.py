"""Count the words of each page; follow only the links below the page's own directory."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

WORD = re.compile(r"[^\W\d_]{3,}")


async def handle(page: Any) -> dict[str, Any]:
    words = [w.lower() for w in WORD.findall(page.text or "")]
    here = urlsplit(page.final_url)
    directory = here.path.rsplit("/", 1)[0] + "/"

    def below(link: str) -> bool:
        parts = urlsplit(link)
        return parts.netloc == here.netloc and parts.path.startswith(directory)

    return {
        "words": len(words),
        "top_words": [w for w, _ in Counter(words).most_common(5)],
        "links": [link for link in page.links if below(link)],
    }
