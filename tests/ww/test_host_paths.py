import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.host.paths import MAX_DEPTH, MAX_PATH_LENGTH, AnchorPathError, format_path, parse_path


def test_absolute_and_relative_paths_resolve():
    assert parse_path("/") == ()
    assert parse_path("/abc/x.y/z_-1") == ("abc", "x.y", "z_-1")
    assert parse_path("x/y", base=("abc",)) == ("abc", "x", "y")
    assert parse_path("/q", base=("abc",)) == ("q",)
    assert parse_path("/abc/") == ("abc",)
    assert parse_path("", base=("abc",)) == ("abc",)


@pytest.mark.parametrize(
    ("path", "complaint"),
    [
        ("/a//b", "empty component"),
        ("/a/../b", "'..'"),
        ("/a/./b", "'.'"),
        ("/a/b c", "characters other than"),
        ("/a/b\nc", "characters other than"),
        ("/" + "x" * (MAX_PATH_LENGTH + 1), "characters long"),
        ("/x" * (MAX_DEPTH + 1), "levels deep"),
        ("/" + "n" * 129, "at most 128"),
    ],
)
def test_bad_paths_are_refused_with_one_line(path, complaint):
    with pytest.raises(AnchorPathError, match=complaint) as info:
        parse_path(path)
    assert "\n" not in str(info.value)


def test_relative_path_too_deep_with_its_base():
    with pytest.raises(AnchorPathError, match="levels deep"):
        parse_path("a/b", base=("x",) * (MAX_DEPTH - 1))


def test_non_string_path_is_refused():
    with pytest.raises(AnchorPathError, match="must be a string"):
        parse_path(b"/a")


names = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@settings(derandomize=True)
@given(st.lists(names, max_size=MAX_DEPTH))
def test_format_and_parse_round_trip(parts):
    assert parse_path(format_path(tuple(parts))) == tuple(parts)


@settings(derandomize=True)
@given(st.text(max_size=80))
def test_any_text_parses_or_fails_with_path_error(text):
    try:
        parts = parse_path(text)
    except AnchorPathError as e:
        assert "\n" not in str(e)
    else:
        assert all(parts)
