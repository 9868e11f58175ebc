"""Hermes-style calls (Hermes, Qwen 2.5, the templates that take tools): each call is
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, and text may come before the first.
The prompt side, for templates without tools, is `render.hermes_messages`."""

from __future__ import annotations

import json

from .base import ScannedCall, ToolParser, scan_call
from .partial_json import Incomplete, expect, skip_ws

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    marker = HERMES_OPEN

    def scan(self, s: str, i: int, calls: list[ScannedCall]) -> bool:
        while True:  # {json}</tool_call>, then maybe more <tool_call> blocks
            calls.append(ScannedCall())
            i = expect(s, skip_ws(s, scan_call(s, skip_ws(s, i), calls[-1])), HERMES_CLOSE, "expected </tool_call>")
            if not s.startswith(HERMES_OPEN, i):
                if i < len(s) and HERMES_OPEN.startswith(s[i:]):
                    raise Incomplete
                return True
            i += len(HERMES_OPEN)

    @classmethod
    def grammar(cls, one_call: dict, parallel: bool, marker_id: int | None = None) -> str:
        from ..structured import JSON_OPTIONS  # compact JSON, as json.dumps writes it

        more = f' ("\\n{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}")*' if parallel else ""
        return (f'start: "{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}"{more}\n'
                f"call: %json {json.dumps({**one_call, 'x-guidance': JSON_OPTIONS})}\n")
