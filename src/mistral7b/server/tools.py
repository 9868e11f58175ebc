"""Tool calling on /v1/chat/completions: rendering the prompt, constraining, and parsing the reply.

The chat format decides the call format (tool_calls.py):
* Mistral tokenizer v3: `encode_mistral_v3` (token-exact with mistral-common); calls are
  `[TOOL_CALLS] [...]`, parsed "mistral". The v1 format has no tool tokens: tools are a 400.
* A Jinja template that reads `tools` renders them itself; one that does not (the default model's)
  gets the Hermes rule (`hermes_messages`). Either way the calls are parsed with the Hermes rule
  (`<tool_call>{"name", "arguments"}</tool_call>`), the one templates that take tools use.

tool_choice "required" or a named function constrains the output to valid calls (a grammar through
the structured-output engine); "auto" parses a call if the reply is one, else it is content; "none"
still shows the tools but never parses. A malformed call is plain content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..tokenizer import check_roles, with_safe_prompt
from ..tool_calls import (MISTRAL_MARKER, MistralBackend, decode_with_marker, encode_mistral_v3, hermes_messages,
                          required_call_grammar, template_takes_tools)
from ..tool_parser import StreamingToolParser, parse_cut_tool_calls, parse_tool_calls
from .errors import APIError
from .protocol import ChatCompletionRequest, DeltaToolCall, ResponseToolCall


@dataclass
class ToolPlan:
    """How one chat request is rendered and parsed."""

    fmt: str | None  # "mistral" or "hermes": parse calls in that format; None: no tool calling
    marker_id: int | None = None  # the [TOOL_CALLS] control token (Mistral), written out before parsing
    tools: list[dict] = field(default_factory=list)


def uses_tools(body: ChatCompletionRequest) -> bool:
    """Whether the request needs the tool path: tools, or calls and results in its history."""
    return bool(body.tools) or getattr(body, "tool_choice", None) is not None or any(m.tool_calls or m.role == "tool" for m in body.messages)


def check_tool_format(tok) -> None:
    """A 400 where the model's chat format cannot hold tools (no tokenizer, Mistral tokenizer v1)."""
    if tok is None:
        raise APIError(400, "this checkpoint has no tokenizer, so it has no chat format for tools", param="tools")
    if getattr(tok, "_sp", None) is not None and tok.mistral_version != "v3":
        raise APIError(400, "this model's chat format (Mistral tokenizer v1) has no tool tokens: tools and tool "
                       "messages are not supported", param="tools")


def plan(llm, body: ChatCompletionRequest) -> ToolPlan:
    """The request's tool plan; sets its call grammar for tool_choice "required" or a named function."""
    tok = llm.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice not in ("none", "auto") and not tools:
        raise APIError(400, "tool_choice needs 'tools'", param="tool_choice")
    check_tool_format(tok)
    if getattr(tok, "_sp", None) is not None:
        backend = MistralBackend.from_sentencepiece(tok._sp)
        result = ToolPlan("mistral", backend.controls.get(MISTRAL_MARKER), tools)
    else:
        result = ToolPlan("hermes", None, tools)
    if choice == "none":
        result.fmt = None
    elif choice != "auto":
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "response_format cannot be combined with tool_choice 'required' or a named function",
                           param="response_format")
        name = None if choice == "required" else choice.function.name
        try:
            body._grammar = required_call_grammar(tools, result.fmt or "hermes", name, body.parallel_tool_calls,
                                                  result.marker_id)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
    return result


def prompt_ids(llm, body, tools: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The prompt of a tool request (run off the event loop; ValueError for a conversation that does not fit).
    `body` is a chat completion request or a /tokenize one (which has no safe_prompt)."""
    tok = llm.tokenizer
    messages = [m.to_dict() for m in body.messages]
    check_roles(messages)
    if getattr(body, "safe_prompt", False):
        messages = with_safe_prompt(messages)
    if getattr(tok, "_sp", None) is not None:
        return encode_mistral_v3(MistralBackend.from_sentencepiece(tok._sp), messages, tools)
    if not tok.chat_template:
        raise ValueError(f"this tokenizer has no chat template ({tok.name})")
    if template_takes_tools(tok.chat_template):
        for m in messages:  # templates that take tools read arguments as objects, as HF's do
            for call in m.get("tool_calls") or ():
                call["function"]["arguments"] = _arguments(call["function"]["arguments"])
        return tok.apply_chat_template(messages, add_generation_prompt, tools=tools or None)
    return tok.apply_chat_template(hermes_messages(messages, tools), add_generation_prompt)


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def reply_text(llm, plan_: ToolPlan, token_ids: list[int], text: str) -> str:
    """The reply as the parser reads it: [TOOL_CALLS], which decoding drops, written out."""
    if plan_.fmt == "mistral" and plan_.marker_id is not None and plan_.marker_id in token_ids:
        return decode_with_marker(token_ids, llm.tokenizer.decode, plan_.marker_id)
    return text


def parse(plan_: ToolPlan, text: str) -> tuple[str | None, list[ResponseToolCall] | None]:
    """(content, tool_calls or None) of a finished reply."""
    if plan_.fmt is None:
        return text, None
    content, calls = parse_tool_calls(text, plan_.fmt)
    if not calls:
        return text, None
    return content, [ResponseToolCall.model_validate(c) for c in calls]


def parse_cut(plan_: ToolPlan, text: str) -> tuple[str | None, list[ResponseToolCall] | None, int] | None:
    """A reply cut at max_tokens inside its calls: (content, the complete calls or None, incomplete
    calls dropped); None where it is plain content."""
    cut = parse_cut_tool_calls(text, plan_.fmt) if plan_.fmt is not None else None
    if cut is None:
        return None
    content, calls, dropped = cut
    return content, [ResponseToolCall.model_validate(c) for c in calls] or None, dropped


class ToolStream:
    """One streamed choice's parser: engine text pieces in, OpenAI delta fields out."""

    def __init__(self, plan_: ToolPlan):
        self.plan = plan_
        self.parser = StreamingToolParser(plan_.fmt)
        self.calls: list[dict] = []

    def push(self, text: str, token_ids: list[int]) -> list[dict]:
        if self.plan.marker_id is not None and self.plan.marker_id in token_ids:
            text = MISTRAL_MARKER + text  # the marker opens a Mistral reply; decoding dropped it
        return _delta_fields(self.parser.push(text)) if text else []

    def finish(self, cut: bool = False) -> list[dict]:
        deltas, self.calls = self.parser.finish(cut)
        return _delta_fields(deltas)

    @property
    def dropped(self) -> int:
        return self.parser.dropped


def _delta_fields(deltas: list[dict]) -> list[dict]:
    """StreamingToolParser's deltas as DeltaMessage keyword arguments (tool calls as models, with only
    the fields each chunk carries set, so the stream shows them as OpenAI's do)."""
    out = []
    for d in deltas:
        if "tool_calls" in d:
            out.append({"tool_calls": [DeltaToolCall.model_validate(c) for c in d["tool_calls"]]})
        else:
            out.append({"content": d["content"]})
    return out
