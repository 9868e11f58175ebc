"""Mistral's tokenizer v3 calls: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"}. The marker
is a control token that decoding drops, so the parser reads text with it written out (`decode_with_marker`).
The prompt side is `render.encode_mistral_v3`."""

from __future__ import annotations

import json

from .base import ScannedCall, ToolParser, scan_call
from .partial_json import expect, skip_ws

MISTRAL_MARKER = "[TOOL_CALLS]"


class MistralToolParser(ToolParser):
    marker = MISTRAL_MARKER

    def scan(self, s: str, i: int, calls: list[ScannedCall]) -> bool:
        i = expect(s, skip_ws(s, i), "[", "[TOOL_CALLS] is followed by a JSON list")
        while True:
            calls.append(ScannedCall())
            i = skip_ws(s, scan_call(s, i, calls[-1]))
            if s.startswith("]", i):
                return True
            i = expect(s, i, ",", "expected ',' or ']'")

    @classmethod
    def grammar(cls, one_call: dict, parallel: bool, marker_id: int | None) -> str:
        """The calls follow the [TOOL_CALLS] token (`marker_id`) as mistral-common writes them: " [" then the list."""
        from ..structured import JSON_OPTIONS  # compact JSON, as json.dumps writes it

        if marker_id is None:
            raise ValueError("the Mistral format's call grammar needs the [TOOL_CALLS] token id")
        array = {"type": "array", "items": one_call, "minItems": 1, **({} if parallel else {"maxItems": 1}),
                 "x-guidance": JSON_OPTIONS}
        return f"start: <[{int(marker_id)}]> \" \" calls\ncalls: %json {json.dumps(array)}\n"


def decode_with_marker(token_ids: list[int], decode, marker_id: int | None, marker: str = MISTRAL_MARKER) -> str:
    """Decoded text with the `marker_id` control token written out as `marker` (decoding drops it)."""
    if marker_id is None or marker_id not in token_ids:
        return decode(token_ids)
    cut = token_ids.index(marker_id)
    return decode(token_ids[:cut]) + marker + decode_with_marker(token_ids[cut + 1:], decode, marker_id, marker)
