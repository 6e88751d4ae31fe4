"""The seeds file and the crawl settings: pure parts, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from ww.crawler.seeds import SeedsError, parse_seeds, read_seeds
from ww.crawler.settings import CrawlSettings, SettingsError


def test_seeds_skip_comments_and_blanks_and_canonicalize() -> None:
    text = "# my seeds\n\nhttp://Example.com:80/a#frag\n  https://b.example/x?z=1&a=2  # two\n"
    assert parse_seeds(text) == ["http://example.com/a", "https://b.example/x?a=2&z=1"]


def test_equivalent_seeds_are_listed_once() -> None:
    assert parse_seeds("http://a.example/\nHTTP://A.EXAMPLE:80/#x\n") == ["http://a.example/"]


def test_a_bad_line_is_an_error_naming_its_line() -> None:
    with pytest.raises(SeedsError, match=r"seeds.txt, line 3: .*ftp://x") as info:
        parse_seeds("http://a.example/\n# ok\nftp://x/\n", "seeds.txt")
    assert "\n" not in str(info.value)


def test_a_file_without_urls_is_an_error() -> None:
    with pytest.raises(SeedsError, match="holds no URL"):
        parse_seeds("# nothing\n\n", "empty.txt")


def test_a_missing_seeds_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SeedsError, match="no seeds file"):
        read_seeds(tmp_path / "nope.txt")


def test_settings_round_trip_through_dict_and_argument() -> None:
    s = CrawlSettings(seeds=("http://a.example/",), allow=("x",), max_pages=5, delay=0.5)
    assert CrawlSettings.from_dict(s.to_dict()) == s
    assert CrawlSettings.decode(s.encode()) == s


def test_bad_settings_are_refused_in_one_line() -> None:
    with pytest.raises(SettingsError, match="unknown scope"):
        CrawlSettings(scope="everywhere")
    with pytest.raises(SettingsError, match="per-host-concurrency"):
        CrawlSettings(per_host_concurrency=0)
    with pytest.raises(SettingsError, match="unknown crawl settings bogus"):
        CrawlSettings.from_dict({"bogus": 1})
    with pytest.raises(SettingsError, match="cannot decode"):
        CrawlSettings.decode("!!!")


def test_a_resume_changes_only_how_it_crawls() -> None:
    s = CrawlSettings(seeds=("http://a.example/",), max_depth=2, delay=0.0)
    r = s.resumed({"delay": 1.5, "max_depth": 9})
    assert r.delay == 1.5 and r.max_depth == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume", "--fresh"], "contradict"),
        (["--retry-failed"], "--retry-failed goes with --resume"),
        (["--resume"], "holds no crawl to resume"),
    ],
)
def test_contradicting_flags_are_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    import subprocess
    import sys

    seeds = tmp_path / "seeds.txt"
    seeds.write_text("http://a.example/\n")
    argv = [sys.executable, "-m", "ww.crawler.cli", str(seeds), "--data-dir", str(tmp_path / "d")]
    done = subprocess.run([*argv, *flags], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
