"""Tool calling and response_format on a live server (default model, CPU), through the official
`openai` client; arguments and outputs checked with jsonschema; raw bodies also against the
server's response models and the client's types."""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.server import EngineDriver, ServerThread, build_app, protocol  # noqa: E402

MODEL = "smollm2-tools"
BOOK = {"type": "object", "additionalProperties": False, "required": ["people", "time", "guest"], "properties": {
    "people": {"type": "integer", "minimum": 1, "maximum": 12},
    "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
    "guest": {"type": "object", "additionalProperties": False, "required": ["name"],
              "properties": {"name": {"type": "string", "maxLength": 12}}}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"], "properties": {
    "city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "book_table", "description": "Book a restaurant table",
                                           "parameters": BOOK}},
         {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}}]
PARAMETERS = {"book_table": BOOK, "get_weather": WEATHER}
ASK = [{"role": "user", "content": "Book a table for two at 19:30 for Ann."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


@pytest.fixture(scope="module")
def server():
    with ServerThread(build_app(EngineDriver(LLM()), MODEL), log_level="warning") as st:
        yield st


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _seed():
    return random.randrange(1 << 30)


def test_required_tool_call_validates(server, client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, max_tokens=120, seed=_seed())
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    # The raw body against the server's own response model too.
    raw = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 120, "seed": _seed(), "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert raw.status_code == 200, raw.text
    body = protocol.ChatCompletionResponse.model_validate(raw.json())
    (named,) = body.choices[0].message.tool_calls
    assert named.function.name == "get_weather" and body.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(named.function.arguments), WEATHER)


def test_required_tool_call_streams_like_openai(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=1.0, max_tokens=120,
                                            seed=_seed(), stream=True)
    pieces, finish, first = [], None, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                assert tc.index == 0
                if first is None:
                    first = tc
                    assert tc.id and tc.function.name in PARAMETERS and tc.type == "function"
                else:
                    assert tc.id is None and tc.function.name is None
                pieces.append(tc.function.arguments or "")
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and first is not None and len(pieces) > 2
    jsonschema.validate(json.loads("".join(pieces)), PARAMETERS[first.function.name])


def _calls(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def test_calls_cut_by_max_tokens_keep_the_complete_ones(server, client):
    """finish_reason length inside the calls: the complete calls (a prefix of the uncut reply's, same
    seed) in tool_calls, never raw call text as content; the same calls streamed; the tail counted."""
    ask = [{"role": "user", "content": "Weather in Rome, Oslo and Lima for 2 days, please."}]
    seed = _seed()
    kw = dict(model=MODEL, messages=ask, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed)
    full = client.chat.completions.create(max_tokens=90, **kw)
    calls, used = _calls(full.choices[0].message), full.usage.completion_tokens
    assert calls, (seed, full)
    rng = random.Random(seed)
    dropped, before = 0, _dropped_total(server)
    for k in (rng.randrange(3, used),):
        cut = client.chat.completions.create(max_tokens=k, **kw).choices[0]
        if cut.finish_reason != "length":  # the cut fell after the last call, past its closing text
            assert _calls(cut.message) == calls
            continue
        kept = _calls(cut.message)
        assert kept == calls[:len(kept)] and len(kept) < len(calls) + 1, (seed, k, cut)
        assert cut.message.content is None, (seed, k, cut.message.content)
        streamed, content, finish = {}, "", None
        for chunk in client.chat.completions.create(max_tokens=k, stream=True, **kw):
            for c in chunk.choices:
                content += c.delta.content or ""
                for tc in c.delta.tool_calls or ():
                    name, args = streamed.get(tc.index, ("", ""))
                    streamed[tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
                finish = c.finish_reason or finish
        assert finish == "length" and content == "", (seed, k, content)
        assert [(n, json.loads(a)) for n, a in list(streamed.values())[:len(kept)]] == kept
        assert len(streamed) <= len(kept) + 1  # and at most the cut call announced before the cut
        dropped += 2  # at most one per reply, the plain one and the stream
    counted = _dropped_total(server) - before
    # A cut right after a call's closing text leaves no tail to drop, so each reply counts 0 or 1.
    assert 0 <= counted <= dropped, (seed, counted, dropped)


def _dropped_total(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("mistral7b_tool_calls_dropped_total "):
            return float(line.split()[1])
    return 0.0


def test_history_with_calls_and_results_and_auto(client):
    call = {"id": "abcDEF123", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Rome", "days": 2})}}
    messages = [{"role": "user", "content": "Weather in Rome?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "Sunny, 24 C"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40, seed=_seed())
    choice = r.choices[0]  # "auto": a call if the reply is one, else content; never a 500
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    assert choice.message.tool_calls or isinstance(choice.message.content, str)


def test_response_format_json_schema_on_both_endpoints(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}],
                                       response_format=fmt, temperature=1.0, max_tokens=60, seed=_seed())
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    c = client.completions.create(model=MODEL, prompt="A person:", max_tokens=60, temperature=1.0, seed=_seed(),
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)
    o = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please."}],
                                       response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    if o.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(o.choices[0].message.content), dict)


def test_bad_tool_and_format_requests_are_400s(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=bad, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="nope"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice needs"):
        client.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required", max_tokens=5)


# ---- the request path on Mistral's own tokenizers (no model: the prompt and grammar only) ------------


def _request(**fields):
    return protocol.ChatCompletionRequest.model_validate({"model": MODEL, **fields})


def test_mistral_v3_request_renders_token_exact_and_v1_is_refused():
    from types import SimpleNamespace

    from mistral7b.server import tool_plan
    from mistral7b.server.errors import APIError
    from mistral7b.tokenizer import Tokenizer
    from test_tool_calls import V1, V3, mistral_common_ids

    call = {"id": "Zx9Yw8Vu7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Oslo weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "Zx9Yw8Vu7", "content": '{"t": -2}'},
                {"role": "user", "content": "And tomorrow?"}]
    body = _request(messages=messages, tools=TOOLS, tool_choice="required")
    llm = SimpleNamespace(tokenizer=Tokenizer.from_file(V3))
    plan = tool_plan.plan(llm, body)
    assert plan.fmt == "mistral" and plan.marker_id == llm.tokenizer.token_to_id("[TOOL_CALLS]")
    assert body.constraint()["grammar"].startswith(f"start: <[{plan.marker_id}]>")
    assert tool_plan.prompt_ids(llm, body, plan.tools) == mistral_common_ids(messages, TOOLS)
    with pytest.raises(APIError, match="v1"):
        tool_plan.plan(SimpleNamespace(tokenizer=Tokenizer.from_file(V1)), _request(messages=ASK, tools=TOOLS))


def test_tokenize_with_tools_is_mistral_v3_token_exact_and_v1_is_refused():
    """/tokenize with tools renders as chat completions do: v3 token-exact with mistral-common; a 400
    (param tools) on v1, as chat completions give."""
    import asyncio
    from types import SimpleNamespace

    from mistral7b.engine import ModelInfo
    from mistral7b.server.errors import APIError
    from mistral7b.server.serving_tokenization import OpenAIServingTokenization
    from mistral7b.tokenizer import Tokenizer
    from test_tool_calls import V1, V3, mistral_common_ids

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Weather {_seed()}?"}]
    body = protocol.TokenizeChatRequest.model_validate({"messages": messages, "tools": TOOLS})
    info = ModelInfo(32768, 4096, None, "float32", 1, False, False, None)  # an engine client's, in part
    served = OpenAIServingTokenization(SimpleNamespace(tokenizer=Tokenizer.from_file(V3), model_info=info), MODEL)
    assert asyncio.run(served.tokenize(body)).tokens == mistral_common_ids(messages, TOOLS)
    v1 = OpenAIServingTokenization(SimpleNamespace(tokenizer=Tokenizer.from_file(V1), model_info=info), MODEL)
    with pytest.raises(APIError, match="v1") as refused:
        asyncio.run(v1.tokenize(body))
    assert refused.value.param == "tools"
