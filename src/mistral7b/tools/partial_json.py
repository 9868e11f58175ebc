"""JSON the model is still writing. A complete value is read by `json.JSONDecoder.raw_decode`, which
says where it ends (arguments stream as the raw text the model wrote, so their span is needed);
an unfinished one at the end of the text by `pydantic_core.from_json(allow_partial=True)`: what it
refuses can never become JSON. It takes a missing ',' for the end of the text (jiter#162), so such a
text stays unfinished, never complete: it never becomes a call."""

from __future__ import annotations

import json

from pydantic_core import from_json

WHITESPACE = " \t\r\n"
_decode = json.JSONDecoder().raw_decode


class Incomplete(Exception):
    """The text stops inside the value being read."""


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WHITESPACE:
        i += 1
    return i


def expect(s: str, i: int, word: str, problem: str) -> int:
    """Index after `word` at s[i] and the whitespace after it; Incomplete where the text stops inside
    it, ValueError(problem) where something else is there."""
    if s.startswith(word, i):
        return skip_ws(s, i + len(word))
    raise Incomplete if word.startswith(s[i:]) else ValueError(problem)


def value_at(s: str, i: int) -> tuple[object, int]:
    """The JSON value starting at s[i] and the index after it; Incomplete where the text stops inside
    it, ValueError where it cannot become JSON."""
    if i >= len(s):
        raise Incomplete
    try:
        value, end = _decode(s, i)
    except json.JSONDecodeError:
        from_json("[" + s[i:], allow_partial=True)  # inside a list, a bare "tr" or "-" is a prefix too
        raise Incomplete from None
    if end == len(s) and not isinstance(value, (dict, list, str)):
        raise Incomplete  # a number may go on: "12" of "12345"
    return value, end
