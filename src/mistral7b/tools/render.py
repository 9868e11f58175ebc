"""Tools, calls and results into prompts. `encode_mistral_v3`: Mistral's tokenizer v3, token-exact with
mistral-common's `encode_chat_completion` (tools in `[AVAILABLE_TOOLS]` before the last user turn,
calls after `[TOOL_CALLS]`, results in `[TOOL_RESULTS]`). `hermes_messages`: the Hermes / Qwen 2.5
rule for Jinja templates without tools, the default model's included: the tools' JSON in the system
prompt inside <tools></tools>, calls as <tool_call> blocks, results as user turns in <tool_response>."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..tokenizer import check_roles
from .base import TOOL_CALL_ID
from .hermes import HERMES_CLOSE, HERMES_OPEN
from .mistral import MISTRAL_MARKER


@dataclass
class MistralBackend:
    """What the v3 format needs of a SentencePiece tokenizer: text -> ids (no BOS), and its control ids."""

    encode: object  # callable(str) -> list[int]
    bos_id: int
    eos_id: int
    controls: dict[str, int]

    @classmethod
    def from_sentencepiece(cls, sp) -> "MistralBackend":
        names = ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", MISTRAL_MARKER, "[TOOL_RESULTS]",
                 "[/TOOL_RESULTS]"]
        controls = {n: sp.piece_to_id(n) for n in names if sp.piece_to_id(n) != sp.unk_id()
                    and sp.is_control(sp.piece_to_id(n))}
        return cls(sp.encode, sp.bos_id(), sp.eos_id(), controls)

    def control(self, name: str) -> int:
        if MISTRAL_MARKER not in self.controls:
            raise ValueError("this tokenizer's chat format (Mistral v1) has no tool tokens: tools are not supported; "
                             "use a model with tokenizer v3 (Mistral 7B Instruct v0.3)")
        return self.controls[name]


def mistral_tool_json(tool: dict) -> dict:
    """An OpenAI tool as mistral-common writes it into [AVAILABLE_TOOLS]."""
    function = function_of(tool)
    return {"type": "function", "function": {"name": function["name"], "description": function.get("description") or "",
                                             "parameters": function.get("parameters") or {}}}


def function_of(tool: dict) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}")
    function = tool["function"]
    if not isinstance(function.get("name"), str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", function["name"]):
        raise ValueError(f"tool name must be 1-64 letters, digits, '_' or '-', got {function.get('name')!r}")
    return function


def json_or_text(text):
    """mistral-common's normalisation of arguments and results: JSON text becomes its value."""
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _group(messages: list[dict]) -> tuple[str, list[dict]]:
    """mistral-common's normalizer: system prompts joined, runs of one role merged (tool messages kept apart)."""
    check_roles(messages)
    system = "\n\n".join(text_of(m.get("content")) for m in messages if m.get("role") == "system" and m.get("content"))
    turns: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "system":
            continue
        if role != "tool" and turns and turns[-1]["role"] == role:
            last = turns[-1]
            last["content"] = "\n\n".join(t for t in (last["content"], text_of(m.get("content"))) if t)
            last["tool_calls"] += list(m.get("tool_calls") or [])
            last["prefix"] |= bool(m.get("prefix"))
            continue
        turns.append({**m, "content": text_of(m.get("content")), "tool_calls": list(m.get("tool_calls") or []),
                      "prefix": bool(m.get("prefix"))})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": "", "tool_calls": [], "prefix": False})
    return system, turns


def _call_json(call: dict) -> dict:
    function = call.get("function") or {}
    call_id = call.get("id")
    if call_id is not None and not TOOL_CALL_ID.match(str(call_id)):
        raise ValueError(f"tool call id {call_id!r} must be exactly 9 letters or digits (Mistral's format)")
    out = {"name": function.get("name"), "arguments": json_or_text(function.get("arguments"))}
    if call_id and call_id != "null":
        out["id"] = call_id
    return out


def encode_mistral_v3(backend: MistralBackend, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation with tools in Mistral's v3 format, ready for the reply."""
    system, turns = _group(messages)
    last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
    tools_json = [mistral_tool_json(t) for t in tools or []]
    dumps = lambda value: json.dumps(value, ensure_ascii=False)  # noqa: E731
    ids = [backend.bos_id]
    for i, turn in enumerate(turns):
        role, content = turn["role"], turn["content"]
        if role == "user":
            if i == last_user and tools_json:
                ids += [backend.control("[AVAILABLE_TOOLS]"), *backend.encode(dumps(tools_json)),
                        backend.control("[/AVAILABLE_TOOLS]")]
            if i == last_user and system:
                content = system + "\n\n" + content
            ids += [backend.control("[INST]"), *backend.encode(content), backend.control("[/INST]")]
        elif role == "tool":
            if not turn.get("tool_call_id"):
                raise ValueError("a tool message needs the tool_call_id of the call it answers")
            result = {"content": json_or_text(content), "call_id": turn["tool_call_id"]}
            ids += [backend.control("[TOOL_RESULTS]"), *backend.encode(dumps(result)), backend.control("[/TOOL_RESULTS]")]
        else:
            if turn["tool_calls"] and content:
                raise ValueError("an assistant message carries either content or tool_calls in the Mistral format, not both")
            if turn["tool_calls"]:
                ids += [backend.control(MISTRAL_MARKER), *backend.encode(dumps([_call_json(c) for c in turn["tool_calls"]]))]
            elif content:
                ids += backend.encode(content.rstrip(" "))
            else:
                raise ValueError("an assistant message needs content or tool_calls")
            if not turn["prefix"]:
                ids.append(backend.eos_id)
    return ids


# ---- Hermes-style rendering for templates without tools ----------------------------------------

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


def template_takes_tools(template: str) -> bool:
    """Whether a Jinja chat template reads a `tools` variable (then it renders tools itself)."""
    from jinja2 import Environment, meta

    return "tools" in meta.find_undeclared_variables(Environment().parse(template))


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages with tools, calls and results as plain role/content messages, for a template
    that knows only those: tools into the system prompt, calls as <tool_call> blocks, results as user turns."""
    out = [dict(m) for m in messages]
    if tools:
        listing = "\n".join(json.dumps({"type": "function", "function": function_of(t)}, ensure_ascii=False) for t in tools)
        text = HERMES_SYSTEM.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0] = {"role": "system", "content": text_of(out[0].get("content")) + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    rendered = []
    for m in out:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            blocks = [HERMES_OPEN + "\n" + json.dumps({"name": c["function"]["name"],
                                                       "arguments": json_or_text(c["function"].get("arguments"))},
                                                      ensure_ascii=False) + "\n" + HERMES_CLOSE for c in m["tool_calls"]]
            rendered.append({"role": "assistant", "content": "\n".join(filter(None, [text_of(m.get("content")), *blocks]))})
        elif m.get("role") == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{text_of(m.get('content'))}\n</tool_response>"})
        else:
            rendered.append({"role": m.get("role"), "content": text_of(m.get("content"))})
    return rendered
