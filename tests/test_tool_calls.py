"""Tool calling against independent references: mistral-common's `encode_chat_completion` for the
v3 format, `json`/`jsonschema` for parsed calls, and the `openai` client's own chunk accumulator
and response models for the OpenAI shapes."""

from __future__ import annotations

import json
import os
import random
import string

import jsonschema
import pytest
import sentencepiece
import torch

import mistral_common
from mistral7b.sampling import SamplingParams
from mistral7b.tokenizer import Tokenizer
from mistral7b.tools import (
    TOOL_CALL_ID,
    MistralBackend,
    decode_with_marker,
    encode_mistral_v3,
    hermes_messages,
    required_call_grammar,
    template_takes_tools,
    tool_parser,
)

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_tool_calls seed: {SEED}")
DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
V1, V3 = os.path.join(DATA, "tokenizer.model.v1"), os.path.join(DATA, "mistral_instruct_tokenizer_240323.model.v3")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}$"},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                   "required": ["city", "days"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {
    "name": "book_table",
    "parameters": {"type": "object", "properties": {
        "party": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 12},
                                                   "names": {"type": "array", "items": {"enum": ["ann", "bob", "cy"]},
                                                             "maxItems": 2}},
                  "required": ["size", "names"], "additionalProperties": False},
        "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
        "required": ["party", "time"], "additionalProperties": False}}}
TOOLS = [WEATHER, BOOK]


def call(name, args, call_id=None):
    return {"id": call_id or new_id(), "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def new_id(rng=random):
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


# ---- Mistral v3 encoding vs mistral-common ----------------------------------------------------


def mistral_common_ids(messages, tools):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    converted = []
    for m in messages:
        if m["role"] == "system":
            converted.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            converted.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            converted.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m.get("name")))
        else:
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in m.get("tool_calls") or []]
            converted.append(AssistantMessage(content=m.get("content"), tool_calls=calls or None))
    tools = [Tool(function=Function.from_openai(t["function"])) for t in tools] if tools else None
    request = ChatCompletionRequest(messages=converted, tools=tools)
    return MistralTokenizer.from_file(V3).encode_chat_completion(request).tokens


def random_args(rng):
    return {"city": rng.choice(["Paris", "Rome", "Zürich", "東京"]), "days": rng.randint(-10**6, 10**6),
            "opts": {"unit": rng.choice(["c", "f"]), "list": [rng.random(), None, True]}}


def random_conversation(rng):
    words = ["hi", "what's the weather?", "  spaced  ", "naïve 😀", "line\nbreak", "{\"json\": 1}", ""]
    msgs = [{"role": "system", "content": rng.choice(words[:-1])}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": rng.choice(words)})
        if rng.random() < 0.7:
            calls = [call(rng.choice(["get_weather", "book_table"]), random_args(rng), new_id(rng))
                     for _ in range(rng.randint(1, 3))]
            msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
            for c in calls:
                result = rng.choice(['{"temp": 21}', "sunny", "42", '["a", "b"]'])
                msgs.append({"role": "tool", "tool_call_id": c["id"], "content": result})
            if rng.random() < 0.5:
                msgs.append({"role": "assistant", "content": rng.choice(words[:-1]) + "  "})
        else:
            msgs.append({"role": "assistant", "content": rng.choice(words[:-1])})
    if msgs[-1]["role"] == "assistant":
        msgs.append({"role": "user", "content": rng.choice(words)})
    return msgs


def test_mistral_v3_matches_mistral_common():
    backend = MistralBackend.from_sentencepiece(sentencepiece.SentencePieceProcessor(model_file=V3))
    fixed = [
        [{"role": "user", "content": "Weather in Paris?"}],
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris", "days": 2}, "abcDEF123")]},
         {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"t": 21}'}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},  # runs of one role merge
         {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Rome", "days": 1}, "A1b2C3d4E")]},
         {"role": "tool", "tool_call_id": "A1b2C3d4E", "content": ""},
         {"role": "assistant", "content": "Done."}, {"role": "user", "content": "thanks"}],
    ]
    rng = random.Random(SEED)
    for messages in fixed + [random_conversation(rng) for _ in range(12)]:
        for tools in (TOOLS, [BOOK], None):
            assert encode_mistral_v3(backend, messages, tools) == mistral_common_ids(messages, tools), (SEED, messages)


def test_mistral_v1_has_no_tools_and_ids_are_checked():
    v1 = MistralBackend.from_sentencepiece(sentencepiece.SentencePieceProcessor(model_file=V1))
    with pytest.raises(ValueError, match="Mistral v1.*no tool tokens"):
        encode_mistral_v3(v1, [{"role": "user", "content": "hi"}], TOOLS)
    v3 = MistralBackend.from_sentencepiece(sentencepiece.SentencePieceProcessor(model_file=V3))
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call("get_weather", {}, "call_12345")]},
           {"role": "tool", "tool_call_id": "call_12345", "content": "x"}]
    with pytest.raises(ValueError, match="exactly 9 letters or digits"):
        encode_mistral_v3(v3, bad, TOOLS)
    with pytest.raises(Exception, match="length of 9"):  # mistral-common refuses it too
        mistral_common_ids(bad, TOOLS)
    with pytest.raises(ValueError, match="tool_call_id"):
        encode_mistral_v3(v3, [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], TOOLS)


# ---- parsing ------------------------------------------------------------------------------------


def parse_tool_calls(text, fmt):
    return tool_parser(fmt).parse(text)


def parse_cut_tool_calls(text, fmt):
    return tool_parser(fmt).parse_cut(text)


def render(fmt, calls, content=""):
    body = [{"name": n, "arguments": a} for n, a in calls]
    if fmt == "mistral":
        return content + "[TOOL_CALLS] " + json.dumps(body)
    return content + "\n".join(f"<tool_call>\n{json.dumps(b)}\n</tool_call>" for b in body)


def stream(fmt, text, rng, tiny=False):
    """Feed `text` in random pieces (1 character at a time if `tiny`); return deltas and final calls."""
    parser, deltas, i = tool_parser(fmt), [], 0
    while i < len(text):
        n = 1 if tiny else rng.randint(1, 8)
        deltas += parser.push(text[i:i + n])
        i += n
    last, calls = parser.finish()
    return deltas + last, calls


def accumulate(deltas):
    """The openai client's own accumulator over our chunks: what an application would see."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for n, delta in enumerate(deltas + [None]):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": delta or {}, "finish_reason": None if delta else "tool_calls"}]}
        if n == 0:
            chunk["choices"][0]["delta"] = {"role": "assistant", **chunk["choices"][0]["delta"]}
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion().choices[0].message


@pytest.mark.parametrize("fmt", ["mistral", "hermes"])
def test_parse_and_stream_round_trip(fmt):
    rng = random.Random(SEED)
    for trial in range(25):
        calls = [(rng.choice(["get_weather", "book_table"]), random_args(rng)) for _ in range(rng.randint(1, 3))]
        content = rng.choice(["", "Let me check. "]) if fmt == "hermes" else ""
        text = render(fmt, calls, content)
        got_content, got = parse_tool_calls(text, fmt)
        assert got_content == (content.strip() or None)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
        assert all(TOOL_CALL_ID.match(c["id"]) and c["type"] == "function" for c in got)
        deltas, final = stream(fmt, text, rng, tiny=trial % 3 == 0)
        message = accumulate(deltas)
        streamed = [(c.function.name, c.function.arguments) for c in message.tool_calls]
        assert streamed == [(c["function"]["name"], c["function"]["arguments"]) for c in final]
        assert [(n, json.loads(a)) for n, a in streamed] == calls
        assert (message.content or "") == content
        first = {}
        for d in deltas:  # each call: id, type and name come first, alone with empty arguments
            for tc in d.get("tool_calls", []):
                if tc["index"] not in first:
                    first[tc["index"]] = tc
                    assert TOOL_CALL_ID.match(tc["id"]) and tc["function"]["arguments"] == ""
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
        assert sorted(first) == list(range(len(calls)))


def render_with_ends(fmt, calls, content=""):
    """`render`'s text, and where each call's JSON object ends in it."""
    text, ends = content + ("[TOOL_CALLS] [" if fmt == "mistral" else ""), []
    for k, (n, a) in enumerate(calls):
        text += (", " if k else "") if fmt == "mistral" else ("\n" if k else "") + "<tool_call>\n"
        text += json.dumps({"name": n, "arguments": a})
        ends.append(len(text))
        text += "" if fmt == "mistral" else "\n</tool_call>"
    return text + ("]" if fmt == "mistral" else ""), ends


@pytest.mark.parametrize("fmt", ["mistral", "hermes"])
def test_cut_reply_keeps_complete_calls(fmt):
    """A reply cut at max_tokens: the calls complete before the cut, the rest dropped and counted,
    nothing after the marker as content; the stream gives the same calls."""
    rng = random.Random(SEED)
    for trial in range(25):
        calls = [(rng.choice(["get_weather", "book_table"]), random_args(rng)) for _ in range(rng.randint(1, 3))]
        content = rng.choice(["", "Let me check. "])
        text, ends = render_with_ends(fmt, calls, content)
        assert text == render(fmt, calls, content) if fmt == "hermes" else json.loads(text[len(content) + 13:])
        cut_at = rng.randrange(len(content) + 1, ends[-1])  # inside the marker or the calls
        cut = text[:cut_at]
        kept = [c for c, end in zip(calls, ends) if end <= cut_at]
        whole = parse_tool_calls(cut, fmt)[1]
        if whole:  # Hermes, cut between two blocks: a complete reply
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole] == kept
            assert parse_cut_tool_calls(cut, fmt) is None
            continue
        got_content, got, dropped = parse_cut_tool_calls(cut, fmt)  # (cut inside the marker: no calls either)
        assert got_content == (content.strip() or None), (SEED, cut)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == kept, (SEED, cut)
        assert dropped == 1, (SEED, cut)
        parser, deltas, i = tool_parser(fmt), [], 0
        while i < len(cut):
            deltas += parser.push(cut[i:i + rng.randint(1, 8)])
            i = len(parser.text)
        last, final = parser.finish(cut=True)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in final] == kept, (SEED, cut)
        assert parser.dropped == 1
        assert "".join(d["content"] for d in deltas + last if "content" in d) == content, (SEED, cut)
    malformed = parse_cut_tool_calls(render(fmt, [("f", {})], "x").replace("{", "(", 1), fmt)
    assert malformed is None  # calls that do not scan stay content, cut or not
    assert parse_cut_tool_calls("plain text, cut", fmt) is None


def test_integer_arguments_split_across_pieces():
    # vllm#13622: "12" then "345" must stream as "12" + "345", never a re-serialised "12}" etc.
    pieces = ['[TOOL_CALLS] [{"name": "f", "arguments": {"n": 1', "2", "34", "5", ', "m": -', "7", "}}]"]
    parser, args = tool_parser("mistral"), ""
    for piece in pieces:
        for d in parser.push(piece):
            for tc in d.get("tool_calls", []):
                args += tc["function"]["arguments"]
                assert '{"n": 12345, "m": -7}'.startswith(args)
    last, calls = parser.finish()
    args += "".join(tc["function"]["arguments"] for d in last for tc in d.get("tool_calls", []))
    assert json.loads(args) == {"n": 12345, "m": -7} == json.loads(calls[0]["function"]["arguments"])


@pytest.mark.parametrize("fmt, text, announced", [
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": }}]', True),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}', True),  # cut by max_tokens
    ("mistral", '[TOOL_CALLS] {"name": "f", "arguments": {}}', False),
    ("mistral", '[TOOL_CALLS] [{"arguments": {"a": 1}}]', False),
    ("mistral", '[TOOL_CALLS] [{"name": 5, "arguments": {}}]', False),  # a name is a string, never announced otherwise
    # pydantic_core's partial parse takes a missing ',' for the end of the text (jiter#162): never complete, never a call
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1 "b": 2}}]', True),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', True),
    ("hermes", '<tool_call>\n{"name": "f" "arguments": {}}\n</tool_call>', True),
    ("hermes", "<tool_call>not json</tool_call>", False),
])
def test_malformed_calls_are_plain_content(fmt, text, announced):
    assert parse_tool_calls(text, fmt) == (text, [])
    deltas, calls = stream(fmt, text, random.Random(SEED))
    if announced:
        # Streaming announced "f" before the text went wrong and cannot take it back; only call
        # objects that are complete come out as calls.
        assert [d["tool_calls"][0]["function"].get("name") for d in deltas if "tool_calls" in d][0] == "f"
        assert all(json.loads(c["function"]["arguments"]) == {"a": 1} for c in calls)
        return
    assert calls == []
    assert all("tool_calls" not in d for d in deltas)
    assert "".join(d["content"] for d in deltas) == text


def test_call_keys_in_any_order_keep_the_raw_arguments():
    for body in ('{"arguments": {"a": [1,  2]}, "name": "f"}', '{"name": "f", "id": "abcDEF123", "arguments": {"a": [1,  2]}}'):
        text = "[TOOL_CALLS] [" + body + "]"
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in parse_tool_calls(text, "mistral")[1]] == \
               [("f", '{"a": [1,  2]}')]
        deltas, _ = stream("mistral", text, random.Random(SEED))
        assert [(c.function.name, c.function.arguments) for c in accumulate(deltas).tool_calls] == [("f", '{"a": [1,  2]}')]


def test_partial_json_tells_unfinished_from_wrong():
    """Every proper prefix of a JSON value is unfinished (never wrong), the whole value ends where it
    ends, and text that can never become JSON is wrong."""
    from mistral7b.tools.partial_json import Incomplete, value_at

    value = {"city": "Zürich", "n": -12.5e3, "ok": [True, None, 'a\\"b'], "f": False, "e": 1e-7, "u": "é😀"}
    for ascii_only in (True, False):
        text = json.dumps(value, ensure_ascii=ascii_only) + ', "next"'
        end = text.index(', "next"')
        for cut in range(1, end):
            with pytest.raises(Incomplete):
                value_at(text[:cut], 0)
        assert value_at(text, 0) == (value, end)
    with pytest.raises(Incomplete):
        value_at("12", 0)  # a number at the end may go on
    assert value_at("12 ", 0) == (12, 2)
    for wrong in ('{"a": }', '{"a" 1', '["\\x"]', "[1,,", "{1: 2}", "nulx"):
        with pytest.raises(ValueError):
            value_at(wrong, 0)


def test_text_without_calls_streams_unchanged():
    rng = random.Random(SEED)
    for fmt in ("mistral", "hermes"):
        text = "Plain answer with [brackets] and <tags> and a [TOOL_CALL lookalike <tool_ca"
        deltas, calls = stream(fmt, text, rng)
        assert calls == [] and "".join(d["content"] for d in deltas) == text


def test_openai_models_accept_the_message():
    from openai.types.chat import ChatCompletion

    _, calls = parse_tool_calls(render("mistral", [("get_weather", {"city": "Rome", "days": 3})]), "mistral")
    completion = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": None, "tool_calls": calls}}]})
    assert json.loads(completion.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome", "days": 3}


# ---- prompts for templates without tools --------------------------------------------------------


def test_hermes_rendering_and_template_detection():
    from mistral7b.default_model import default_model_path

    tok = Tokenizer.from_file(default_model_path())
    assert not template_takes_tools(tok.chat_template)
    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0].content }}")
    c = call("get_weather", {"city": "Rome", "days": 2})
    msgs = hermes_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [c]},
                            {"role": "tool", "tool_call_id": c["id"], "content": "sunny"}], TOOLS)
    assert msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"]
    listed = [json.loads(line) for line in msgs[0]["content"].split("<tools>\n")[1].split("\n</tools>")[0].splitlines()]
    assert [t["function"]["name"] for t in listed] == ["get_weather", "book_table"]
    assert parse_tool_calls(msgs[2]["content"], "hermes")[1][0]["function"]["name"] == "get_weather"
    assert msgs[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    text = tok.decode(tok.apply_chat_template(msgs))
    assert "<tool_call>" in text and "get_weather" in text


# ---- forced calls ---------------------------------------------------------------------------------


def validate_call(c, tools=TOOLS):
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[c["function"]["name"]]
    jsonschema.validate(json.loads(c["function"]["arguments"]), params)


@pytest.fixture(scope="module")
def smollm():
    from constrained_sampling import SmolLM
    from mistral7b.default_model import default_model_path

    return SmolLM(default_model_path())


def test_required_call_with_the_default_model(smollm):
    torch.manual_seed(SEED)
    tok = smollm.tokenizer
    prompt = tok.apply_chat_template(hermes_messages([{"role": "user", "content": "Book a table for two at 19:30."}], TOOLS))
    rows = [SamplingParams(grammar=required_call_grammar(TOOLS, "hermes", parallel=False), temperature=1.0, max_tokens=80)
            for _ in range(4)]
    rows += [SamplingParams(grammar=required_call_grammar(TOOLS, "hermes", name="get_weather", parallel=False),
                            temperature=1.0, max_tokens=80) for _ in range(2)]
    for n, out in enumerate(smollm.sample(prompt, rows)):
        assert out.finish_reason == "stop", (SEED, out.text)
        content, calls = parse_tool_calls(out.text, "hermes")
        assert content is None and calls, (SEED, out.text)
        assert len(calls) == 1 and (n < 4 or calls[0]["function"]["name"] == "get_weather")
        for c in calls:
            validate_call(c)
        stream_decoder, parser, deltas = tok.decoder(), tool_parser("hermes"), []
        for token in out.token_ids:  # as the server would stream it, token by token
            deltas += parser.push(stream_decoder.push(token))
        deltas += parser.push(stream_decoder.flush())
        last, final = parser.finish()
        message = accumulate(deltas + last)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
               [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    # The parallel grammar takes two blocks; the single-call one does not.
    two = render("hermes", [("get_weather", {"city": "Rome", "days": 2}), ("get_weather", {"city": "Oslo", "days": 3})])
    for parallel in (True, False):
        from mistral7b.structured import Constraint

        c = Constraint.from_params(SamplingParams(grammar=required_call_grammar(TOOLS, "hermes", parallel=parallel)),
                                   smollm.ll)
        assert (all(c.consume(t) for t in tok.encode(two)) and c.is_accepting()) == parallel


def test_required_call_grammar_mistral_format():
    """Random logits through the v3 vocabulary: the grammar alone yields [TOOL_CALLS] + a valid list."""
    from test_structured import random_logit_samples

    from mistral7b.structured import Constraint, ll_tokenizer

    tok = Tokenizer.from_file(V3)
    marker = tok.token_to_id("[TOOL_CALLS]")
    ll = ll_tokenizer(tok, tok.vocab_size)
    one = SamplingParams(grammar=required_call_grammar([WEATHER], "mistral", parallel=False, marker_id=marker),
                         temperature=1.0)
    for ids in random_logit_samples(tok, ll, one, rows=4, steps=80, decode=False):
        assert ids[0] == marker
        content, calls = parse_tool_calls(decode_with_marker(ids, tok.decode, marker), "mistral")
        assert content is None and len(calls) == 1, (SEED, ids)
        validate_call(calls[0], [WEATHER])
    # Parallel calls: the grammar takes a list of two calls as mistral-common writes it, and the
    # one-call grammar does not.
    two = json.dumps([{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}},
                      {"name": "get_weather", "arguments": {"city": "Oslo", "days": 14}}])
    ids = [marker, *tok.encode(two, bos=False)]  # "▁[" first: the dummy-prefix space is the grammar's " "
    for parallel, accepted in ((True, True), (False, False)):
        grammar = required_call_grammar([WEATHER], "mistral", parallel=parallel, marker_id=marker)
        constraint = Constraint.from_params(SamplingParams(grammar=grammar), ll)
        assert (all(constraint.consume(t) for t in ids) and constraint.is_accepting()) == accepted
    with pytest.raises(ValueError, match="not among the tools"):
        required_call_grammar(TOOLS, "hermes", name="nope")
