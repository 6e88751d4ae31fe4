"""robots.txt decisions from a fetch's status and body, without sockets."""

from __future__ import annotations

import pickle

import pytest

from ww.crawler.robots import (
    DEFAULT_USER_AGENT,
    MAX_ROBOTS_BYTES,
    Allow,
    Disallow,
    RobotsPolicy,
    Wait,
    host_delay,
    robots_url,
)

ROBOTS = b"""\
User-agent: *
Disallow: /private/
Allow: /private/open
Crawl-delay: 2

User-agent: ww-crawl
Disallow: /not-for-us
Crawl-delay: 0.5
"""


def test_2xx_rules_are_applied_to_our_user_agent_group() -> None:
    policy = RobotsPolicy.from_response(200, ROBOTS)
    assert policy.kind == "rules"
    assert policy.check("http://e.com/not-for-us/x") == Disallow()
    assert policy.check("http://e.com/private/x") == Allow()  # our group replaces `*`
    assert policy.allowed("http://e.com/anything")
    assert policy.crawl_delay() == 0.5


def test_other_agents_get_the_star_group() -> None:
    policy = RobotsPolicy.from_response(200, ROBOTS)
    assert not policy.allowed("http://e.com/private/x", "otherbot")
    assert policy.allowed("http://e.com/private/open", "otherbot")
    assert policy.allowed("http://e.com/not-for-us", "otherbot")
    assert policy.crawl_delay("otherbot") == 2.0


def test_request_rate_counts_as_a_crawl_delay() -> None:
    policy = RobotsPolicy.from_response(200, b"User-agent: *\nRequest-rate: 1/5\n")
    assert policy.crawl_delay() == 5.0


def test_no_crawl_delay_is_none() -> None:
    assert RobotsPolicy.from_response(200, b"User-agent: *\nDisallow:\n").crawl_delay() is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 301])
def test_4xx_and_unfollowed_redirects_allow_everything(status: int) -> None:
    policy = RobotsPolicy.from_response(status, b"User-agent: *\nDisallow: /\n")
    assert policy.kind == "allow-all"
    assert policy.check("http://e.com/private/") == Allow()
    assert policy.crawl_delay() is None


@pytest.mark.parametrize("status", [None, 429, 500, 502, 503])
def test_5xx_429_or_no_response_means_wait_and_fetch_robots_again(status: int | None) -> None:
    policy = RobotsPolicy.from_response(status, b"", retry_delay=30.0)
    assert policy.kind == "unavailable"
    assert policy.check("http://e.com/") == Wait(30.0)
    assert not policy.allowed("http://e.com/")


def test_an_empty_or_garbage_robots_txt_allows_everything() -> None:
    assert RobotsPolicy.from_response(200, b"").allowed("http://e.com/x")
    assert RobotsPolicy.from_response(200, b"\xff\xfe<html>oops</html>").allowed("http://e.com/x")


def test_rules_past_the_size_limit_are_not_read() -> None:
    body = b"User-agent: *\n" + b"#" * MAX_ROBOTS_BYTES + b"\nDisallow: /\n"
    assert RobotsPolicy.from_response(200, body).allowed("http://e.com/x")


def test_a_policy_round_trips_through_bytes_dict_and_pickle() -> None:
    policy = RobotsPolicy.from_response(200, ROBOTS)
    for again in (
        RobotsPolicy.from_bytes(policy.to_bytes()),
        RobotsPolicy.from_dict(policy.to_dict()),
        pickle.loads(pickle.dumps(policy)),
    ):
        assert again == policy
        assert again.check("http://e.com/not-for-us") == Disallow()


def test_a_record_that_is_not_a_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a robots policy record"):
        RobotsPolicy.from_bytes(b"\x93garbage")


def test_robots_url_and_default_user_agent() -> None:
    assert robots_url("http://127.0.0.2:8080/a/b?c#d") == "http://127.0.0.2:8080/robots.txt"
    assert DEFAULT_USER_AGENT.startswith("ww-crawl/")


def test_host_delay_is_the_minimum_raised_by_crawl_delay_up_to_a_cap() -> None:
    slow = RobotsPolicy.from_response(200, b"User-agent: *\nCrawl-delay: 5\n")
    glacial = RobotsPolicy.from_response(200, b"User-agent: *\nCrawl-delay: 86400\n")
    assert host_delay(None, minimum=0.5) == 0.5
    assert host_delay(RobotsPolicy.from_response(404), minimum=0.5) == 0.5
    assert host_delay(slow, minimum=0.5) == 5.0
    assert host_delay(slow, minimum=10.0) == 10.0
    assert host_delay(glacial) == 60.0
    assert host_delay(glacial, maximum=600.0) == 600.0
    assert host_delay(glacial, minimum=120.0, maximum=60.0) == 120.0
