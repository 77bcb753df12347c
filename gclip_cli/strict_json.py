"""JSON from files gclip did not write (safetensors headers, checkpoint indexes).

Python's parser recurses once per nesting level (RecursionError 1,000 levels down), refuses
integers of more than 4,300 digits with a ValueError after reading them, and keeps the last of
repeated keys; it also takes NaN, Infinity, 1e400 and unpaired surrogate escapes, which stricter
parsers (the safetensors loader's) refuse.  Here the limits are checked on the raw bytes before
parsing, in time linear in their length: nesting depth, the length of every number; then
repeated keys, non-numbers and lone surrogates while parsing.
"""

from __future__ import annotations

import json
import math
import re

MAX_DIGITS = 20  # 2**64 - 1 has 20 digits: no size, count or offset in a real file is longer

# A string from its opening quote to its closing one, or to the end of the text when it is not
# closed (the parser then says what is wrong): every quote that begins a match ends one, so the
# scan never backtracks and escaped quotes inside a string never begin a match.
_STRING = re.compile(rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_PARENTHESES = bytes.maketrans(b"[]{}", b"()()")
_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_DIGITS + 1))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonLimitError(ValueError):
    """The text is not JSON gclip reads: the message says why (one line)."""


def load(raw: bytes, max_depth: int) -> object:
    """Parse the UTF-8 JSON text *raw*, whose arrays and objects nest at most *max_depth*
    levels deep, whose numbers have at most MAX_DIGITS digits and whose objects repeat no key."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonLimitError("is not valid UTF-8") from None
    _check_limits(raw, max_depth)
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_not_json,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then can a string hold a lone surrogate
        _refuse_lone_surrogates(value)
    return value


def _check_limits(raw: bytes, max_depth: int) -> None:
    outside_strings = _outside_strings(raw)
    if _LONG_NUMBER.search(outside_strings):
        raise JsonLimitError(f"holds a number of more than {MAX_DIGITS} digits")
    brackets = outside_strings.translate(_AS_PARENTHESES, _NOT_BRACKETS)
    if brackets.count(b"(") != brackets.count(b")"):
        raise JsonLimitError("is not valid JSON (its brackets do not match)")
    for _ in range(max_depth):  # each pass removes the innermost level
        brackets = brackets.replace(b"()", b"")
    if brackets:
        raise JsonLimitError(f"nests arrays or objects more than {max_depth} levels deep")


def _outside_strings(raw: bytes) -> bytes:
    """*raw* without its strings (so that brackets and digits in names do not count)."""
    if b"\\" in raw:  # an escaped quote may lie inside a string
        return _STRING.sub(b"", raw)
    return b"".join(raw.split(b'"')[::2])  # the same, twice as fast, when no quote is escaped


def _not_json(constant: str) -> object:
    raise JsonLimitError(f"is not valid JSON ({constant} is not a JSON number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JsonLimitError(f"holds the number {text[:30]}, beyond the range of a float")
    return value


def _refuse_lone_surrogates(value: object) -> None:
    """Python's parser turns an unpaired \\ud800-\\udfff escape into a string that is not
    text (it cannot be printed or encoded); other parsers refuse it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise JsonLimitError(
                    f"holds a lone UTF-16 surrogate in the string {shown(item)}"
                ) from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise JsonLimitError(f"repeats the key {shown(repeated)}")
    return obj


def shown(value: object, limit: int = 60) -> str:
    """repr(*value*) for a message: one line, at most about *limit* characters (a name or a
    field from a hostile file can be megabytes long, or nested beyond what repr can print)."""
    import reprlib

    brief = reprlib.Repr()
    brief.maxstring = brief.maxother = brief.maxlong = limit
    brief.maxlevel, brief.maxlist, brief.maxdict = 2, 6, 4
    text = brief.repr(value)
    return text if len(text) <= limit + 10 else f"{text[:limit]}..."
