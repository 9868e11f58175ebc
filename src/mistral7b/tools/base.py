"""`ToolParser`, one subclass per format (`mistral`, `hermes`) as vLLM's tool parsers: tool calls out
of model text, whole or streamed, in OpenAI's shapes. A subclass lays out its calls (`scan`); each
call object is read here as far as the text goes, so a streamed call is announced (index, id, type,
name) once its name is complete, and its arguments follow as the raw text the model wrote: fragments
always concatenate to the final arguments, digits of one integer split across tokens included
(vllm#13622 re-serialised partial JSON instead). Arguments written as a JSON string are sent once
decoded. What does not read as calls is plain content."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from .partial_json import WHITESPACE, Incomplete, expect, skip_ws, value_at

TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # Mistral's (vllm#9019): exactly 9 letters or digits


def new_call_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


@dataclass
class ScannedCall:
    """Where one call object lies in the text read so far."""

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
        return s[self.args_start:self.args_end if self.args_end is not None else len(s)].rstrip(WHITESPACE)

    def openai(self, s: str, call_id: str) -> dict:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments(s)}}


def scan_call(s: str, i: int, call: ScannedCall) -> int:
    """Read one {"name": ..., "arguments": ...} object at s[i:] into `call`; the index after it."""
    i = expect(s, i, "{", "a tool call is a JSON object")
    while not s.startswith("}", i):
        if i >= len(s):
            raise Incomplete
        if s[i] != '"':
            raise ValueError("expected a key")
        key, i = value_at(s, i)
        i = expect(s, skip_ws(s, i), ":", "expected ':'")
        if key == "arguments":
            call.args_start = i
        value, end = value_at(s, i)
        if key == "arguments":
            call.args_end = end
        elif key == "name" and isinstance(value, str):
            call.name = value
        i = skip_ws(s, end)
        if s.startswith(",", i):
            i = skip_ws(s, i + 1)
        elif i < len(s) and s[i] != "}":
            raise ValueError("expected ',' or '}'")
    if not isinstance(call.name, str) or call.args_end is None:
        raise ValueError("a tool call needs a string name and arguments")
    call.end = i + 1
    return i + 1


class ToolParser:
    """One reply's parser: `parse` (a finished reply) and `parse_cut` (one cut at max_tokens) read
    whole texts; `push` and `finish` stream, text pieces in, OpenAI `delta` dicts out:
    {"content": ...} or {"tool_calls": [...]}."""

    marker: str  # the text that opens the calls

    def __init__(self):
        self.text, self.sent = "", 0  # all text so far; content sent up to here
        self.tools_at: int | None = None  # index after the marker, once seen
        self.calls: list[ScannedCall] = []
        self.ids: list[str] = []
        self.args_sent: list[int] = []
        self.failed = False
        self.dropped = 0  # incomplete calls left out of a reply cut at max_tokens

    def scan(self, s: str, i: int, calls: list[ScannedCall]) -> bool:
        """Append the calls in s[i:] (just after the marker) to `calls`; True once the last is complete.
        Incomplete where the text stops first, ValueError where it does not read as this format's calls."""
        raise NotImplementedError

    @classmethod
    def grammar(cls, one_call: dict, parallel: bool, marker_id: int | None) -> str:
        """A Lark grammar whose every sentence is one call following `one_call` (a JSON schema), or several."""
        raise NotImplementedError

    def _scan(self, s: str, i: int, calls: list[ScannedCall]) -> bool:
        calls.clear()
        try:
            return self.scan(s, i, calls)
        except Incomplete:
            return False

    # ---- whole replies

    def _read(self, text: str) -> bool | None:
        """Read a whole reply: whether its calls are complete; None where it has no marker, or calls
        that do not read."""
        self.text, at = text, text.find(self.marker)
        if at < 0:
            return None
        self.tools_at = at + len(self.marker)
        try:
            return self._scan(text, self.tools_at, self.calls)
        except ValueError:
            return None

    def _before_calls(self) -> str | None:
        return self.text[:self.tools_at - len(self.marker)].strip() or None

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a finished reply; a reply whose calls do not read is all content."""
        if not self._read(text):
            return text, []
        return self._before_calls(), [c.openai(text, new_call_id()) for c in self.calls]

    def parse_cut(self, text: str) -> tuple[str | None, list[dict], int] | None:
        """A reply cut short inside its calls (finish_reason "length"): (content before the calls, the
        complete calls, how many incomplete ones were dropped); None where it holds no calls, or calls
        that do not read (then it is all content)."""
        if self.marker not in text:  # cut inside the marker: a call was opening
            held = _marker_start(text, self.marker)
            return (text[:len(text) - held].strip() or None, [], 1) if held else None
        if self._read(text) is not False:
            return None
        done = [c for c in self.calls if c.end is not None]
        return self._before_calls(), [c.openai(text, new_call_id()) for c in done], _dropped(self.calls)

    # ---- streaming

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
                self._scan(self.text, self.tools_at, self.calls)
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
        complete = not self.failed and self._scan(self.text, self.tools_at, self.calls)
        if cut and not complete and not self.failed:
            self.dropped = _dropped(self.calls)
        elif not self.ids and not complete:  # nothing announced: the whole reply was content after all
            return self._content(len(self.text)), []
        deltas = self._call_deltas()
        done = [c for c in self.calls if c.end is not None]
        return deltas, [c.openai(self.text, i) for c, i in zip(done, self.ids)]

    def _content(self, upto: int) -> list[dict]:
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


def _marker_start(text: str, marker: str, since: int = 0) -> int:
    """Length of the tail of text[since:] that is the start of `marker` (0: none)."""
    return next((k for k in range(min(len(marker) - 1, len(text) - since), 0, -1) if marker.startswith(text[-k:])), 0)


def _dropped(calls: list[ScannedCall]) -> int:
    """Incomplete calls at the end of a cut list (at least the one being opened when the text stopped)."""
    return max(1, sum(c.end is None for c in calls))
