"""Tool calls out of model text, whole or streamed, in OpenAI's shapes (formats: tool_calls.py).

One scanner serves both: it walks the call list as far as the text goes, so a streamed call is
announced (index, id, name) as soon as its name is complete, and its arguments are sent as the raw
text the model wrote, piece by piece. Arguments written as a JSON string are sent once decoded.
Anything that does not scan as calls is plain content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .tool_calls import HERMES_CLOSE, HERMES_OPEN, MISTRAL_MARKER, new_call_id

MARKERS = {"mistral": MISTRAL_MARKER, "hermes": HERMES_OPEN}
_WS = " \t\r\n"


class _Incomplete(Exception):
    """The text ends inside the value being scanned."""


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _expect(s: str, i: int, char: str, problem: str) -> int:
    """Index after `char` at s[i], whitespace skipped; _Incomplete at the end, ValueError(problem) if not."""
    if i >= len(s):
        raise _Incomplete
    if s[i] != char:
        raise ValueError(problem)
    return _ws(s, i + 1)


def _string_end(s: str, i: int) -> int:
    """Index after the JSON string starting at s[i] == '"'."""
    i += 1
    while i < len(s):
        if s[i] == "\\":
            i += 2
        elif s[i] == '"':
            return i + 1
        else:
            i += 1
    raise _Incomplete


def _value_end(s: str, i: int) -> int:
    """Index after the JSON value starting at s[i]; ValueError if it is not one."""
    if i >= len(s):
        raise _Incomplete
    if s[i] == '"':
        end = _string_end(s, i)
    elif s[i] in "{[":
        depth, j = 0, i
        while True:
            if j >= len(s):
                raise _Incomplete
            c = s[j]
            if c == '"':
                j = _string_end(s, j)
                continue
            depth += c in "{[" or -(c in "}]")
            j += 1
            if depth == 0:
                break
        end = j
    else:  # number, true, false, null: runs to a delimiter, and the text may stop inside it
        end = i
        while end < len(s) and s[end] not in _WS + ",}]":
            end += 1
        if end == len(s):
            raise _Incomplete
    json.loads(s[i:end])  # raises ValueError (JSONDecodeError) on malformed JSON
    return end


@dataclass
class _Call:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None  # after the closing brace

    def arguments(self, s: str) -> str | None:
        """The arguments text so far (None while a string-typed value is unfinished)."""
        if self.args_start is None or self.args_start >= len(s):
            return ""
        if s[self.args_start] == '"':
            return None if self.args_end is None else json.loads(s[self.args_start:self.args_end])
        return s[self.args_start:self.args_end if self.args_end is not None else len(s)].rstrip(_WS)


def _scan_call(s: str, i: int, call: _Call) -> int:
    """Scan one {"name": ..., "arguments": ...} object into `call`; index after it."""
    i = _expect(s, i, "{", "a tool call is a JSON object")
    while True:
        if i >= len(s):
            raise _Incomplete
        if s[i] == "}":
            break
        key_end = _string_end(s, i) if s[i] == '"' else -1
        if key_end < 0:
            raise ValueError("expected a key")
        key = json.loads(s[i:key_end])
        i = _expect(s, _ws(s, key_end), ":", "expected ':'")
        if key == "arguments":
            call.args_start = i
        end = _value_end(s, i)
        if key == "arguments":
            call.args_end = end
        elif key == "name":
            call.name = json.loads(s[i:end])
        i = _ws(s, end)
        if i < len(s) and s[i] == ",":
            i = _ws(s, i + 1)
        elif i < len(s) and s[i] != "}":
            raise ValueError("expected ',' or '}'")
    if not isinstance(call.name, str) or call.args_end is None:
        raise ValueError("a tool call needs a string name and arguments")
    call.end = i + 1
    return i + 1


def _scan_calls(fmt: str, s: str, i: int, calls: list[_Call]) -> bool:
    """Fill `calls` from the text after the marker at s[i:]; True once the whole list is complete."""
    calls.clear()
    try:
        if fmt == "mistral":
            i = _expect(s, _ws(s, i), "[", "[TOOL_CALLS] is followed by a JSON list")
            while True:
                calls.append(_Call())
                i = _ws(s, _scan_call(s, i, calls[-1]))
                if i < len(s) and s[i] == "]":
                    return True
                if i >= len(s) or s[i] != ",":
                    raise (_Incomplete if i >= len(s) else ValueError("expected ',' or ']'"))
                i = _ws(s, i + 1)
        while True:  # hermes: {json}</tool_call>, then maybe more <tool_call> blocks
            i = _ws(s, i)
            calls.append(_Call())
            i = _ws(s, _scan_call(s, i, calls[-1]))
            if not s.startswith(HERMES_CLOSE, i):
                raise (_Incomplete if HERMES_CLOSE.startswith(s[i:]) else ValueError("expected </tool_call>"))
            i = _ws(s, i + len(HERMES_CLOSE))
            if not s.startswith(HERMES_OPEN, i):
                if i < len(s) and HERMES_OPEN.startswith(s[i:]):
                    raise _Incomplete
                return True
            i += len(HERMES_OPEN)
    except _Incomplete:
        return False


def _openai_call(call: _Call, s: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments(s)}}


def _scan_reply(text: str, fmt: str) -> tuple[int, list[_Call], bool] | None:
    """(marker index, calls scanned, whether the list is complete), or None: no marker, or calls that do not scan."""
    start = text.find(MARKERS[fmt])
    if start < 0:
        return None
    calls: list[_Call] = []
    try:
        return start, calls, _scan_calls(fmt, text, start + len(MARKERS[fmt]), calls)
    except ValueError:
        return None


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply; a reply whose calls do not scan is all content."""
    scanned = _scan_reply(text, fmt)
    if scanned is None or not scanned[2]:
        return text, []
    start, calls, _ = scanned
    return text[:start].strip() or None, [_openai_call(c, text, new_call_id()) for c in calls]


def parse_cut_tool_calls(text: str, fmt: str) -> tuple[str | None, list[dict], int] | None:
    """A reply cut short inside its calls (finish_reason "length"): (content before the calls, the
    complete calls, how many incomplete ones were dropped); None where it holds no calls, or calls
    that do not scan (then it is all content)."""
    scanned = _scan_reply(text, fmt)
    if scanned is None and text.find(MARKERS[fmt]) < 0:  # cut inside the marker: a call was opening
        held = _marker_start(text, MARKERS[fmt])
        return (text[:len(text) - held].strip() or None, [], 1) if held else None
    if scanned is None or scanned[2]:
        return None
    start, calls, _ = scanned
    done = [c for c in calls if c.end is not None]
    return text[:start].strip() or None, [_openai_call(c, text, new_call_id()) for c in done], _dropped(calls)


def _marker_start(text: str, marker: str, since: int = 0) -> int:
    """Length of the tail of text[since:] that is the start of `marker` (0: none)."""
    return next((k for k in range(min(len(marker) - 1, len(text) - since), 0, -1) if marker.startswith(text[-k:])), 0)


def _dropped(calls: list[_Call]) -> int:
    """Incomplete calls at the end of a cut list (at least the one being opened when the text stopped)."""
    return max(1, sum(c.end is None for c in calls))


class StreamingToolParser:
    """Text pieces in, OpenAI `delta` dicts out: {"content": ...} or {"tool_calls": [...]}."""

    def __init__(self, fmt: str):
        self.fmt, self.marker = fmt, MARKERS[fmt]
        self.text, self.sent = "", 0  # all text so far; content sent up to here
        self.tools_at: int | None = None  # index after the marker, once seen
        self.calls: list[_Call] = []
        self.ids: list[str] = []
        self.args_sent: list[int] = []
        self.failed = False
        self.dropped = 0  # incomplete calls left out of a reply cut at max_tokens

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        deltas: list[dict] = []
        if self.tools_at is None:
            at = self.text.find(self.marker, self.sent)
            if at < 0:  # hold back a tail that may be the start of the marker
                return self._content(len(self.text) - _marker_start(self.text, self.marker, self.sent))
            deltas += self._content(at)
            self.tools_at = at + len(self.marker)
        if not self.failed:
            try:
                _scan_calls(self.fmt, self.text, self.tools_at, self.calls)
            except ValueError:
                self.failed = True
            deltas += self._call_deltas()
        return deltas

    def finish(self, cut: bool = False) -> tuple[list[dict], list[dict]]:
        """The last deltas, and the complete calls as message.tool_calls entries (empty: finish as content).
        `cut`: the reply stopped at max_tokens; an incomplete call at its end is dropped (counted in
        `dropped`), never sent as content."""
        if self.tools_at is None:
            held = _marker_start(self.text, self.marker, self.sent) if cut else 0
            self.dropped = int(held > 0)  # a call was opening when the reply was cut
            return self._content(len(self.text) - held), []
        complete = not self.failed and _scan_calls(self.fmt, self.text, self.tools_at, self.calls)
        if cut and not complete and not self.failed:
            self.dropped = _dropped(self.calls)
        elif not self.ids and not complete:  # nothing announced: the whole reply was content after all
            return self._content(len(self.text), from_marker=True), []
        deltas = self._call_deltas()
        done = [c for c in self.calls if c.end is not None]
        return deltas, [_openai_call(c, self.text, i) for c, i in zip(done, self.ids)]

    def _content(self, upto: int, from_marker: bool = False) -> list[dict]:
        if from_marker:
            upto = len(self.text)
        piece, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return [{"content": piece}] if piece else []

    def _call_deltas(self) -> list[dict]:
        out = []
        for index, call in enumerate(self.calls):
            if call.name is None:
                break
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                out.append({"tool_calls": [{"index": index, "id": self.ids[index], "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            args = call.arguments(self.text)
            if args and len(args) > self.args_sent[index]:
                out.append({"tool_calls": [{"index": index, "function": {"arguments": args[self.args_sent[index]:]}}]})
                self.args_sent[index] = len(args)
        return out
