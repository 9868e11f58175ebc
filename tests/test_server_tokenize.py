"""POST /tokenize and /detokenize: ids equal what /v1/chat/completions runs and what the tokenizer gives."""

from __future__ import annotations

import random
import string

import httpx
import openai
import pytest

from mistral7b import LLM
from mistral7b.server import ServerThread, build_app

MODEL = "smollm2"


@pytest.fixture(scope="module")
def llm():
    return LLM()


@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(build_app(llm, MODEL), log_level="warning") as st:
        yield st


def _words(rng, n=8):
    return " ".join("".join(rng.choices(string.ascii_letters, k=rng.randint(1, 8))) for _ in range(n))


def test_tokenize_messages_equal_chat_prompt_ids(server, llm):
    rng = random.Random()
    messages = [{"role": "system", "content": _words(rng)}, {"role": "user", "content": _words(rng)}]
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == llm.chat_prompt(messages)
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens == body["count"]
    no_gen = httpx.post(server.url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert no_gen["tokens"] == llm.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert no_gen["tokens"] != body["tokens"]


def test_tokenize_prompt_and_detokenize_round_trip(server, llm):
    text = _words(random.Random())
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == llm.encode_prompt(text) and r["count"] == len(r["tokens"])
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]})
    assert d.status_code == 200 and d.json() == {"prompt": llm.tokenizer.decode(r["tokens"])}
    assert d.json()["prompt"].strip() == text


def test_tokenize_errors(server, llm):
    vocab = llm.engine.config.vocab_size
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, vocab + 7]})
    assert bad.status_code == 400 and str(vocab + 7) in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "tokens"
    tools = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}], "tools": []})
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    unknown = httpx.post(server.url + "/tokenize", json={"model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/tokenize" in paths and "/detokenize" in paths
