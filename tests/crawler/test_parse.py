"""Link extraction, robots directives, text and decoding, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from selectolax.lexbor import LexborHTMLParser

from ww.crawler.fetch import FetchResult
from ww.crawler.parse import decode_html, is_html, parse_fetched, parse_html, robots_directives

URL = "http://e.com/dir/page.html"


def test_links_from_a_area_frame_and_iframe_resolved_canonical_without_repeats() -> None:
    page = parse_html(
        b"""<a href="a.html#top">a</a><map><area href="/area?b=2&a=1"></map>
        <iframe src="//other.org/if"></iframe>
        <a href="HTTP://E.com:80/x">x</a><a href=" a.html ">dup</a><a>no href</a>""",
        URL,
    )
    assert page.links == (
        "http://e.com/dir/a.html",
        "http://e.com/area?a=1&b=2",
        "http://other.org/if",
        "http://e.com/x",
    )
    frames = parse_html(
        b'<html><head></head><frameset><frame src="f1.html"><frame src="/f2"></frameset></html>',
        URL,
    )
    assert frames.links == ("http://e.com/dir/f1.html", "http://e.com/f2")


def test_base_href_is_honoured() -> None:
    page = parse_html(
        b'<head><base href="http://cdn.e.com/root/"></head><a href="x/y">y</a><a href="/z">z</a>',
        URL,
    )
    assert page.links == ("http://cdn.e.com/root/x/y", "http://cdn.e.com/z")


def test_a_relative_base_href_is_resolved_against_the_page() -> None:
    page = parse_html(b'<base href="../other/"><a href="p">p</a>', URL)
    assert page.links == ("http://e.com/other/p",)


@pytest.mark.parametrize(
    "href",
    [
        "mailto:a@e.com",
        "JavaScript:void(0)",
        "tel:+123",
        "data:text/html,hi",
        "ftp://e.com/f",
        "#section",
        "",
        "http://[broken/",
    ],
)
def test_links_that_are_not_web_pages_are_skipped(href: str) -> None:
    assert parse_html(f'<a href="{href}">x</a>'.encode(), URL).links == ()


def test_rel_nofollow_holds_back_that_link_only() -> None:
    page = parse_html(b'<a href="/a" rel="external NoFollow">a</a><a href="/b">b</a>', URL)
    assert page.links == ("http://e.com/b",)
    assert page.nofollow_links == ("http://e.com/a",)
    assert not page.nofollow


def test_a_link_also_given_without_nofollow_is_followed() -> None:
    page = parse_html(b'<a href="/a" rel="nofollow">a</a><a href="/a">a</a>', URL)
    assert page.links == ("http://e.com/a",)
    assert page.nofollow_links == ()


@pytest.mark.parametrize(
    ("content", "noindex", "nofollow"),
    [
        ("noindex", True, False),
        ("NOFOLLOW", False, True),
        ("noindex, nofollow", True, True),
        ("none", True, True),
        ("all", False, False),
    ],
)
def test_meta_robots(content: str, noindex: bool, nofollow: bool) -> None:
    html = f'<meta name="Robots" content="{content}"><a href="/a">a</a>'.encode()
    page = parse_html(html, URL)
    assert (page.noindex, page.nofollow) == (noindex, nofollow)
    assert page.links == (() if nofollow else ("http://e.com/a",))
    assert page.nofollow_links == (("http://e.com/a",) if nofollow else ())


def test_x_robots_tag_header() -> None:
    page = parse_html(b'<a href="/a">a</a>', URL, x_robots_tag="noindex, nofollow")
    assert page.noindex and page.nofollow and page.links == ()
    other = parse_html(b'<a href="/a">a</a>', URL, x_robots_tag="otherbot: nofollow")
    assert not other.nofollow and other.links == ("http://e.com/a",)


def test_robots_directives_scoped_to_a_bot() -> None:
    assert robots_directives("ww-crawl: noindex, nofollow") == {"noindex", "nofollow"}
    assert robots_directives("googlebot: noindex, nofollow") == set()
    assert robots_directives(None) == set()


def test_title_and_visible_text_without_scripts_styles_and_templates() -> None:
    page = parse_html(
        b"""<html><head><title>  The   Title </title><style>p{color:red}</style>
        <script>var hidden = 1;</script></head>
        <body><h1>Head</h1>\n<p>one\n\n two\t three</p><script>alert(1)</script>
        <noscript>enable js</noscript><template><p>tpl</p></template><p>four</p></body></html>""",
        URL,
    )
    assert page.title == "The Title"
    assert page.text == "Head one two three four"


# Pages of words, single spaces and tags (text the fast path keeps as it is), with one odd
# piece put anywhere in most of them: other white space, runs of it, non-ASCII, entities.
_PLAIN_PIECES = ["word", "wé", " ", "<p>", "</p>", "<b>", "</b>", "<br>", "<div>", "</div>"]
_ODD_PIECES = [
    "  ",
    "\n",
    "\t",
    "\r",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x1f",
    "\xa0",
    "\x85",
    "\u2028",
    "\u3000",
    "&nbsp;",
    "&#11;",
    "&#13;",
    "&#x1c;",
    "<!-- c -->",
    "<script>s</script>",
    "<pre> a  b </pre>",
    "<body>",
    "</body>",
    "<head>",
    "<title>t</title>",
    "\u4e2d",
]


@st.composite
def _pages(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.sampled_from(_PLAIN_PIECES), max_size=20))
    if draw(st.integers(0, 4)) > 0:
        pieces.insert(draw(st.integers(0, len(pieces))), draw(st.sampled_from(_ODD_PIECES)))
    return "".join(pieces)


def _text_split_and_joined(html: str) -> str:
    tree = LexborHTMLParser(html)
    tree.strip_tags(["script", "style", "noscript", "template"])
    root = tree.body if tree.body is not None else tree.root
    return " ".join(root.text(separator=" ").split()) if root is not None else ""


@settings(max_examples=1500)
@given(html=_pages())
@example(html="<p>one two</p>\n<p>three</p>")
def test_text_is_the_words_of_the_text_nodes_joined_by_single_spaces(html: str) -> None:
    page = parse_html(html.encode(), URL, content_type="text/html; charset=utf-8")
    assert page.text == _text_split_and_joined(html)


def test_text_is_capped_at_max_text() -> None:
    page = parse_html(b"<p>" + b"word " * 1000 + b"</p>", URL, max_text=12)
    assert page.text == "word word wo"


def test_no_title_is_none_and_an_empty_body_is_an_empty_page() -> None:
    page = parse_html(b"", URL)
    assert page.title is None and page.text == "" and page.links == ()


def test_encoding_from_the_content_type_header() -> None:
    body = "<p>café</p>".encode("latin-1")
    page = parse_html(body, URL, content_type="text/html; charset=ISO-8859-1")
    assert page.text == "café"
    assert page.encoding == "cp1252"  # the WHATWG reading of latin-1


def test_encoding_from_meta_charset_and_http_equiv() -> None:
    meta = '<meta charset="koi8-r"><title>привет</title>'.encode("koi8-r")
    assert parse_html(meta, URL).title == "привет"
    equiv = (
        '<meta http-equiv="Content-Type" content="text/html; charset=shift_jis">'
        "<title>日本語</title>"
    ).encode("shift_jis")
    assert parse_html(equiv, URL).title == "日本語"


def test_a_bom_wins_over_the_declared_charset() -> None:
    body = "\ufeff<title>naïve</title>".encode("utf-16-le")
    page = parse_html(body, URL, content_type="text/html; charset=iso-8859-1")
    assert page.title == "naïve"
    assert page.encoding == "utf-16-le"
    utf8 = b"\xef\xbb\xbf<title>na\xc3\xafve</title>"
    assert parse_html(utf8, URL, content_type="text/html; charset=koi8-r").title == "naïve"


def test_a_wrong_declared_charset_falls_back_to_one_that_fits_the_bytes() -> None:
    body = "<title>café crème</title>".encode("cp1252")
    page = parse_html(body, URL, content_type="text/html; charset=utf-8")
    assert page.title == "café crème"
    assert page.encoding == "cp1252"


def test_a_wrong_meta_charset_falls_back_to_utf8_when_the_bytes_are_utf8() -> None:
    body = '<meta charset="utf-16"><title>日本</title>'.encode()
    assert parse_html(body, URL).title == "日本"


def test_an_unknown_charset_name_is_ignored() -> None:
    body = "<title>café</title>".encode()
    assert parse_html(body, URL, content_type="text/html; charset=no-such-thing").title == "café"


def test_undecodable_bytes_become_replacement_characters_not_errors() -> None:
    encoding, text = decode_html(b"<p>\x81\x8d\xff\xfe</p>", "text/html; charset=utf-8")
    assert "\ufffd" in text
    assert encoding == "utf-8"


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("text/html; charset=utf-8", b"", True),
        ("application/xhtml+xml", b"", True),
        ("TEXT/HTML", b"", True),
        ("application/pdf", b"<html>", False),
        ("image/png", b"", False),
        (None, b"  <!DOCTYPE html><html>", True),
        (None, b"\xef\xbb\xbf<html>", True),
        (None, b"%PDF-1.4", False),
    ],
)
def test_is_html(content_type: str | None, body: bytes, expected: bool) -> None:
    assert is_html(content_type, body) is expected


def _fetched(**kw: object) -> FetchResult:
    fields: dict[str, object] = {
        "url": URL,
        "final_url": URL,
        "status": 200,
        "content_type": "text/html",
        "body": b"<title>T</title><a href='/a'>a</a>",
    }
    fields.update(kw)
    return FetchResult(**fields)  # type: ignore[arg-type]


def test_parse_fetched_parses_2xx_html_at_its_final_url_with_its_headers() -> None:
    page = parse_fetched(_fetched(final_url="http://e.com/moved/", x_robots_tag="nofollow"))
    assert page is not None and page.title == "T" and page.url == "http://e.com/moved/"
    assert page.nofollow and page.nofollow_links == ("http://e.com/a",)
    assert parse_fetched(_fetched(truncated=True)) is not None


@pytest.mark.parametrize(
    "changes",
    [
        {"status": 404},
        {"status": 301},
        {"status": None, "error": "connect error: refused", "error_kind": "connect"},
        {"error": "timeout: ...", "error_kind": "timeout"},
        {"content_type": "application/pdf"},
        {"body": b""},
    ],
)
def test_parse_fetched_leaves_other_fetches_unparsed(changes: dict[str, object]) -> None:
    assert parse_fetched(_fetched(**changes)) is None
