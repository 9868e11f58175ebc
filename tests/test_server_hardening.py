"""Hostile input to the HTTP server: each bad request gets one clear 400 naming the problem (through
FastAPI's TestClient on the default model; no live socket needed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.server import EngineDriver, build_app  # noqa: E402

MODEL = "smollm2-test"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(quantize=False)


@pytest.fixture(scope="module")
def engine_driver(llm):
    """The engine's one EngineDriver: every app of this module is built over it."""
    return EngineDriver(llm)


@pytest.fixture(scope="module")
def tc(engine_driver):
    with TestClient(build_app(engine_driver, MODEL)) as c:
        yield c


def _error(r, status=400, param=None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert "pydantic" not in err["message"] and "Traceback" not in err["message"]
    return err["message"]


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("path", [COMP, CHAT])
def test_numbers_float32_cannot_hold_are_refused(tc, path, name):
    body = {"model": MODEL, "max_tokens": 2, name: 1e-40}
    body.update({"prompt": "a"} if path == COMP else {"messages": MSG})
    message = _error(tc.post(path, json=body), 400, name)
    assert name in message and "float32" in message


def test_aborted_rows_are_free_for_admission_at_once(llm):
    """Clients of every row go away while the engine thread is busy: admission counts their rows as
    free at once (no 429s until the thread catches up), and the next step frees them and admits."""
    import asyncio

    from mistral7b.sampling import SamplingParams
    from mistral7b.server.driver import Subscriber
    from mistral7b.server.metrics import Metrics
    from mistral7b.server.serving import Admission

    engine = llm.engine
    driver = EngineDriver(llm)
    driver._start_thread = lambda: None  # this test plays the engine thread: nothing else steps the engine
    admission = Admission(driver, max_queue=0)
    loop, metrics = asyncio.new_event_loop(), Metrics()
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    try:
        subs = [Subscriber(loop, asyncio.Queue(), i, metrics) for i in range(engine.max_batch)]
        running = [driver.submit([1, 2, 3], params, f"abort-{i}", sub) for i, sub in enumerate(subs)]
        engine.step()
        assert engine.n_running == engine.max_batch and admission.full(1)
        for r in running:
            driver.abort(r)
        assert not admission.full(engine.max_batch)  # the thread has not applied a single abort yet
        assert admission.full(engine.max_batch + 1)
        newcomer = driver.submit([4, 5], SamplingParams(max_tokens=2), "newcomer", subs[0])
        driver._apply_aborts()  # one iteration of the engine thread: aborts, then one step
        engine.step()
        assert newcomer.row is not None and all(r.row is None and r.finish_reason == "abort" for r in running)
        while engine.has_work():
            engine.step()
    finally:
        for r in list(driver.requests.values()):
            engine.abort(r)
        while engine.has_work():
            engine.step()
        loop.close()


# ---- lone surrogates ------------------------------------------------------------------------------


def _raw(tc, path, body):
    """POST `body` as JSON text with \\ud800 escapes, as a client would send it."""
    return tc.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages"),
    (CHAT, {"model": "\ud800", "messages": MSG}, "model"),
    (CHAT, {"model": MODEL, "messages": MSG, "stop": ["x", "\ud800"]}, "stop"),
    (COMP, {"model": MODEL, "prompt": "\ud800"}, "prompt"),
    (COMP, {"model": MODEL, "prompt": ["ok", "\ud800"]}, "prompt"),
    (COMP, {"model": "\ud800x", "prompt": "hi"}, "model"),
    (COMP, {"model": MODEL, "prompt": "hi", "stop": "\ud800"}, "stop"),
    (COMP, {"model": MODEL, "prompt": "hi", "\ud800": 1}, None),
    ("/tokenize", {"model": MODEL, "prompt": "\ud800"}, "prompt"),
])
def test_lone_surrogates_give_a_clean_400(tc, path, body, param):
    message = _error(_raw(tc, path, body), 400, param)
    assert "TypeError" not in message and "codec" not in message
    assert "surrogate" in message or "Unrecognized" in message


# ---- fields: refused, or implemented ---------------------------------------------------------------


@pytest.mark.parametrize("path, extra, param", [
    (COMP, {"suffix": "x"}, "suffix"),
    (COMP, {"best_of": 2}, "best_of"),
    (COMP, {"frobnicate": True}, "frobnicate"),
    (CHAT, {"functions": []}, "functions"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options"),
    (COMP, {"logit_bias": {"49152": 5}}, "logit_bias"),
    (COMP, {"logit_bias": {"ten": 5}}, "logit_bias"),
    (CHAT, {"logit_bias": {"10": 101}}, "logit_bias"),
])
def test_unsupported_fields_are_refused_by_name(tc, path, extra, param):
    body = {"model": MODEL, "max_tokens": 2, **extra}
    body.update({"prompt": "a"} if path == COMP else {"messages": MSG})
    message = _error(tc.post(path, json=body), 400, param)
    assert next(iter(extra)) in message or param in message, message
    assert "Extra inputs" not in message and "Value error" not in message
    if "49152" in json.dumps(extra):
        assert "49152" in message


def test_best_of_one_and_openai_defaults_accepted(tc):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 2, "best_of": 1, "user": "u", "seed": 3, "n": 2,
            "echo": False, "logit_bias": {}, "stream_options": None}
    assert tc.post(COMP, json=body).status_code == 200


def test_logit_bias_forces_and_forbids_tokens(tc, llm):
    forced = llm.tokenizer.encode(" blue", bos=False)[-1]
    for path, extra in ((COMP, {"prompt": "The sky is"}), (CHAT, {"messages": MSG})):
        body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **extra}
        plain = tc.post(path, json=body).json()["choices"][0]
        r = tc.post(path, json={**body, "logit_bias": {str(forced): 100}}).json()["choices"][0]
        text = r["text"] if path == COMP else r["message"]["content"]
        assert text == llm.tokenizer.decode([forced] * 4)
        # the greedy first token, pushed down by 100, is never chosen again
        first = (llm.encode_prompt(plain["text"]) if path == COMP else
                 llm.tokenizer.encode(plain["message"]["content"], bos=False))
        top = first[1] if path == COMP else first[0]
        r = tc.post(path, json={**body, "logit_bias": {str(top): -100}}).json()["choices"][0]
        text = r["text"] if path == COMP else r["message"]["content"]
        assert top not in llm.tokenizer.encode(text, bos=False)


def test_echo_prepends_the_prompt(tc, llm):
    body = {"model": MODEL, "prompt": ["The capital of France is", "One, two,"], "max_tokens": 4, "temperature": 0}
    plain = tc.post(COMP, json=body).json()["choices"]
    echoed = tc.post(COMP, json={**body, "echo": True}).json()["choices"]
    assert [c["text"] for c in echoed] == [p + c["text"] for p, c in zip(body["prompt"], plain)]
    ids = llm.encode_prompt("Hello world")
    r = tc.post(COMP, json={**body, "prompt": ids, "echo": True}).json()["choices"][0]
    assert r["text"].startswith(llm.tokenizer.decode(ids))
    with tc.stream("POST", COMP, json={**body, "echo": True, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = ["", ""]
    for e in events:
        for c in e["choices"]:
            streamed[c["index"]] += c["text"]
    assert streamed == [c["text"] for c in echoed]


# ---- error messages name the real problem ------------------------------------------------------------


@pytest.mark.parametrize("prompt, words", [
    ([1, 2, -5], ["-5", "index 2"]),
    ([[1, 2], [3, "a"]], ["prompt 1", "'a'", "index 1"]),
    ([[1], []], ["prompt 1", "empty"]),
    ([1, "a"], ["mixes"]),
])
def test_bad_token_id_prompt_says_which(tc, prompt, words):
    message = _error(tc.post(COMP, json={"model": MODEL, "prompt": prompt}), 400, "prompt")
    assert "prompt.str" not in message and "Input should be a valid string" not in message
    for w in words:
        assert w in message, message


def test_too_many_prompts_blame_the_prompt_list(llm, engine_driver):
    with TestClient(build_app(engine_driver, MODEL, max_queue=0)) as c:
        many = {"model": MODEL, "prompt": ["hi"] * (llm.engine.max_batch + 1), "max_tokens": 1}
        message = _error(c.post(COMP, json=many), 400, "prompt")
        assert f"{llm.engine.max_batch + 1} prompts" in message
        _error(c.post(COMP, json={"model": MODEL, "prompt": "hi", "n": llm.engine.max_batch + 1}), 400, "n")


def test_empty_body_says_so(tc):
    for path in (COMP, CHAT):
        message = _error(tc.post(path, content=b"", headers={"content-type": "application/json"}), 400)
        assert "empty" in message, message


def _reference_prompt_logprobs(llm, ids):
    """log P(ids[i+1] | ids[:i+1]) from one cache-free forward of the whole prompt."""
    import torch

    with torch.no_grad():
        logp = llm.engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_prompt_logprobs_across_prefill_chunks(llm):
    """The engine's prompt logprobs, prefilled in chunks of 4 next to another request, equal a cache-free
    forward; the prefix cache is not used for them (every position's logits are needed)."""
    from mistral7b.engine import Engine
    from mistral7b.sampling import SamplingParams

    engine = Engine(llm.engine.model, llm.tokenizer, chunk_size=4, max_batch=2, prefix_cache_gib=0.01,
                    prefix_block_size=4)
    ids = llm.encode_prompt("The quick brown fox jumps over the lazy dog, and then it")
    for _ in range(2):  # the second time the prefix is cached
        r = engine.add(ids, SamplingParams(max_tokens=1, prompt_logprobs=3))
        other = engine.add(ids[:7], SamplingParams(max_tokens=2))
        while engine.has_work():
            engine.step()
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(ids)
        got = [e.logprob for e in r.prompt_logprobs[1:]]
        assert got == pytest.approx(_reference_prompt_logprobs(llm, ids), abs=1e-4)
        assert all(len(e.top) == 3 and e.top[0][1] >= e.logprob - 1e-6 for e in r.prompt_logprobs[1:])
        assert other.prompt_logprobs is None and other.finish_reason == "length"


def _token_bytes(text: str) -> bytes:
    """The bytes of a logprobs token, "bytes:\\xNN..." (part of a character) or plain text."""
    return bytes.fromhex(text[6:].replace("\\x", "")) if text.startswith("bytes:") else text.encode()


def test_logprob_tokens_split_characters_as_bytes(tc):
    prompt = "Smile 😀, party 🎉 and 中文 now"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 3}
    choice = tc.post(COMP, json=body).json()["choices"][0]
    tokens, offsets, text = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"], choice["text"]
    assert any(t.startswith("bytes:") for t in tokens)  # the emoji take several tokens each
    assert b"".join(map(_token_bytes, tokens)).decode("utf-8", "replace") == text  # it may stop mid-character
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    for t, at in zip(tokens, offsets):
        assert t.startswith("bytes:") or text[at : at + len(t)] == t
    assert all(len(top) == 3 for top in choice["logprobs"]["top_logprobs"][1:])
    messages = [{"role": "user", "content": "Write three emoji and nothing else."}]
    r = tc.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0,
                            "logprobs": True, "top_logprobs": 2}).json()["choices"][0]
    entries = r["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace") == r["message"]["content"]
    assert all(bytes(e["bytes"]) == _token_bytes(e["token"]) for e in entries)


def test_echo_with_logprobs_gives_prompt_logprobs(tc, llm):
    prompt = "The capital of France is"
    ids = llm.encode_prompt(prompt)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}
    choice = tc.post(COMP, json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(_reference_prompt_logprobs(llm, ids), abs=1e-3)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert choice["text"].startswith(prompt)
    with tc.stream("POST", COMP, json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [x for e in events for c in e["choices"] for x in c["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
    assert "".join(c["text"] for e in events for c in e["choices"]) == choice["text"]
