"""Tool calling, two call formats, as vLLM's tool parsers are split: `base` (`ToolParser`: whole and
streamed replies in OpenAI's shapes), `mistral` (Mistral v3's `[TOOL_CALLS] [...]`), `hermes`
(`<tool_call>` blocks), `render` (tools, calls and results into prompts) and `partial_json` (reading
JSON the model is still writing). A malformed call is returned as plain content. `tool_parser(fmt)`
is a fresh parser for one reply; `required_call_grammar` the grammar that forces a call."""

from __future__ import annotations

# The package's API, re-exported
from .base import TOOL_CALL_ID, ToolParser, new_call_id  # noqa: F401
from .hermes import HERMES_CLOSE, HERMES_OPEN, HermesToolParser  # noqa: F401
from .mistral import MISTRAL_MARKER, MistralToolParser, decode_with_marker  # noqa: F401
from .render import (MistralBackend, encode_mistral_v3, function_of, hermes_messages, json_or_text,  # noqa: F401
                     template_takes_tools)

PARSERS: dict[str, type[ToolParser]] = {"mistral": MistralToolParser, "hermes": HermesToolParser}


def tool_parser(fmt: str) -> ToolParser:
    """A new parser for one reply in format `fmt` ("mistral" or "hermes"): `parse`, `parse_cut`, or `push`/`finish`."""
    return PARSERS[fmt]()


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """JSON schema of one call {"name", "arguments"} to any of `tools` (or only the one named)."""
    functions = [function_of(t) for t in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    if not functions:
        raise ValueError("tool_choice 'required' needs at least one tool")
    options = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                 "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return options[0] if len(options) == 1 else {"anyOf": options}


def required_call_grammar(tools: list[dict], fmt: str, name: str | None = None, parallel: bool = True,
                          marker_id: int | None = None) -> str:
    """A Lark grammar (SamplingParams.grammar) whose every sentence is a valid call in format `fmt`;
    `parallel=False` allows exactly one call. "mistral" needs the id of the [TOOL_CALLS] token (`marker_id`)."""
    return PARSERS[fmt].grammar(call_schema(tools, name), parallel, marker_id)
