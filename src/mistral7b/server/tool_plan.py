"""The tool path of /v1/chat/completions and /tokenize over the `tools` package: a request's call
format (Mistral tokenizer v3's own, v1 a 400; else Hermes, rendered by a template that reads `tools`
or by `hermes_messages`), its prompt, its forced-call grammar (tool_choice "required" or a named
function), and its reply as response models ("auto" parses a call if the reply is one; "none" shows
the tools but never parses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tokenizer import check_roles, with_safe_prompt
from ..tools import (MISTRAL_MARKER, MistralBackend, decode_with_marker, encode_mistral_v3, hermes_messages,
                     json_or_text, required_call_grammar, template_takes_tools, tool_parser)
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


def plan(client, body: ChatCompletionRequest) -> ToolPlan:
    """The request's tool plan; sets its call grammar for tool_choice "required" or a named function."""
    tok = client.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice not in ("none", "auto") and not tools:
        raise APIError(400, "tool_choice needs 'tools'", param="tool_choice")
    check_tool_format(tok)
    if getattr(tok, "_sp", None) is not None:
        result = ToolPlan("mistral", tok.token_to_id(MISTRAL_MARKER), tools)  # v3, checked above: a control token
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


def prompt_ids(client, body, tools: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The prompt of a tool request (run off the event loop; ValueError for a conversation that does not fit).
    `body` is a chat completion request or a /tokenize one (which has no safe_prompt)."""
    tok = client.tokenizer
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
                call["function"]["arguments"] = json_or_text(call["function"]["arguments"])
        return tok.apply_chat_template(messages, add_generation_prompt, tools=tools or None)
    return tok.apply_chat_template(hermes_messages(messages, tools), add_generation_prompt)


def reply_text(client, plan_: ToolPlan, token_ids: list[int], text: str) -> str:
    """The reply as the parser reads it: [TOOL_CALLS], which decoding drops, written out."""
    if plan_.fmt == "mistral" and plan_.marker_id is not None and plan_.marker_id in token_ids:
        return decode_with_marker(token_ids, client.tokenizer.decode, plan_.marker_id)
    return text


def parse(plan_: ToolPlan, text: str) -> tuple[str | None, list[ResponseToolCall] | None]:
    """(content, tool_calls or None) of a finished reply."""
    content, calls = tool_parser(plan_.fmt).parse(text) if plan_.fmt is not None else (text, [])
    return (content, [ResponseToolCall.model_validate(c) for c in calls]) if calls else (text, None)


def parse_cut(plan_: ToolPlan, text: str) -> tuple[str | None, list[ResponseToolCall] | None, int] | None:
    """A reply cut at max_tokens inside its calls: (content, the complete calls or None, incomplete
    calls dropped); None where it is plain content."""
    cut = tool_parser(plan_.fmt).parse_cut(text) if plan_.fmt is not None else None
    return cut and (cut[0], [ResponseToolCall.model_validate(c) for c in cut[1]] or None, cut[2])


class ToolStream:
    """One streamed choice's parser: engine text pieces in, OpenAI delta fields out."""

    def __init__(self, plan_: ToolPlan):
        self.plan = plan_
        self.parser = tool_parser(plan_.fmt)
        self.calls: list[dict] = []
        self.dropped = 0  # incomplete calls left out of a reply cut at max_tokens

    def push(self, text: str, token_ids: list[int]) -> list[dict]:
        if self.plan.marker_id is not None and self.plan.marker_id in token_ids:
            text = MISTRAL_MARKER + text  # the marker opens a Mistral reply; decoding dropped it
        return _delta_fields(self.parser.push(text)) if text else []

    def finish(self, cut: bool = False) -> list[dict]:
        deltas, self.calls = self.parser.finish(cut)
        self.dropped = self.parser.dropped
        return _delta_fields(deltas)


def _delta_fields(deltas: list[dict]) -> list[dict]:
    """The parser's deltas as DeltaMessage keyword arguments (tool calls as models, with only
    the fields each chunk carries set, so the stream shows them as OpenAI's do)."""
    return [{"tool_calls": [DeltaToolCall.model_validate(c) for c in d["tool_calls"]]} if "tool_calls" in d
            else {"content": d["content"]} for d in deltas]
