import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gclip_cli.strict_json import MAX_DIGITS, JsonLimitError, load, shown


def nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def test_depth_is_counted_exactly():
    assert load(nested(3), max_depth=3) == {"a": {"a": {"a": 1}}}
    with pytest.raises(JsonLimitError, match="more than 3 levels deep"):
        load(nested(4), max_depth=3)
    assert load(b'[[], {}, [[1]], {"x": []}]', max_depth=3) == [[], {}, [[1]], {"x": []}]
    with pytest.raises(JsonLimitError, match="more than 2 levels deep"):
        load(b"[[], [[1]]]", max_depth=2)


@pytest.mark.parametrize(
    "text",
    [
        b'{"[[[[": "{{{{", "a\\"[[[[": ["]]]]"]}',  # brackets and quotes inside strings
        b'{"digits": "' + b"9" * 100 + b'"}',  # a long number inside a string is text
        b'{"\\\\": "\\\\\\"[["}',
    ],
)
def test_strings_do_not_count(text):
    assert load(text, max_depth=2) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "levels deep"),
        (b"[" * 100_000, "brackets do not match"),
        (b'{"a": 1' + b"2" * MAX_DIGITS + b"}", "more than 20 digits"),
        (b'{"a": -1.' + b"0" * 50 + b"}", "more than 20 digits"),
        (b'{"a": 1, "b": 2, "a": 3}', "repeats the key 'a'"),
        (b'{"a": {"b": 1, "b": 1}}', "repeats the key 'b'"),
        (b'{"a": "unterminated', "not valid JSON"),
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b"", "not valid JSON"),
    ],
)
def test_what_is_refused(text, problem):
    with pytest.raises(JsonLimitError, match=problem) as refused:
        load(text, max_depth=4)
    assert "\n" not in str(refused.value)


def test_the_largest_numbers_allowed_are_read():
    assert load(b"[18446744073709551615, -99999999999999999999]", max_depth=1) == [
        2**64 - 1,
        -99999999999999999999,
    ]


@pytest.mark.parametrize(
    "text",
    [
        b'"' + b'\\"' * 2_000_000,  # one unterminated string of escaped quotes
        b'"' + b'\\"' * 2_000_000 + b"\\",  # ... ending in a lone backslash
        b'{"' + b'a":1,"' * 500_000 + b'a":1}',  # 500,000 repeats of one key
        b"[" + b"[]," * 1_000_000 + b"[]]",
    ],
)
def test_limits_are_checked_in_linear_time(text):
    started = time.perf_counter()
    with pytest.raises(JsonLimitError):
        load(text, max_depth=1)
    assert time.perf_counter() - started < 10  # quadratic scans took minutes


@given(
    st.recursive(st.none() | st.integers(-(10**19), 10**19) | st.text(), st.lists, max_leaves=20)
)
def test_depth_is_that_of_the_structure(value):
    text = json.dumps(value).encode()
    depth = _depth(value)
    assert load(text, max_depth=max(depth, 1)) == value
    if depth > 1:
        with pytest.raises(JsonLimitError, match="levels deep"):
            load(text, max_depth=depth - 1)


def _depth(value) -> int:
    return 1 + max(map(_depth, value), default=0) if isinstance(value, list) else 0


def test_shown_values_are_short_and_on_one_line():
    assert shown("a\nb") == "'a\\nb'"
    assert len(shown("x" * 1_000_000)) < 80
    assert len(shown([[[[[[1]]]]]] * 100)) < 80
    assert shown(["F32"]) == "['F32']"
