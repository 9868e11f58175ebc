"""The two EngineClients (server/client.py): the engine on a thread (`EngineDriver`) and in its own process
(`EngineProcessClient`) both satisfy the protocol, report the same `ModelInfo`, and serve one app. The
process client here is never started: it is told the facts its engine process would send when ready."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from mistral7b import LLM  # noqa: E402
from mistral7b.engine import ModelInfo  # noqa: E402
from mistral7b.server import EngineClient, EngineDriver, EngineProcessClient, build_app  # noqa: E402
from mistral7b.server.engine_process import EngineLoad  # noqa: E402

MODEL = "m"


@pytest.fixture(scope="module")
def llm():
    return LLM(max_batch=2, prefix_cache_gib=0.01)


@pytest.fixture(scope="module")
def driver(llm):
    return EngineDriver(llm)


def process_client(llm) -> EngineProcessClient:
    """A process client whose engine process has reported ready with `llm`'s engine's facts."""
    client = EngineProcessClient(EngineLoad(source=str(llm.source)), llm.tokenizer)
    client._ready(json.loads(json.dumps(dataclasses.asdict(ModelInfo.of(llm.engine)))))  # as the wire carries it
    client.warmed.set()
    return client


def protocol_members() -> set[str]:
    return {name for name in vars(EngineClient) if not name.startswith("_")} | set(EngineClient.__annotations__)


@pytest.mark.parametrize("kind", [EngineDriver, EngineProcessClient])
def test_both_clients_implement_every_member_of_the_protocol(kind, llm):
    client = EngineDriver(llm) if kind is EngineDriver else process_client(llm)
    assert isinstance(client, EngineClient)
    methods = {name for name in vars(EngineClient) if callable(vars(EngineClient)[name]) and not name.startswith("_")}
    assert {"submit", "abort", "stats", "validate", "start", "close"} <= methods
    for name in methods:  # the client's own, not the protocol's stubs (which it does not inherit)
        own = getattr(client, name)
        assert callable(own) and getattr(own, "__func__", None) is not getattr(EngineClient, name), name
    assert EngineClient not in kind.__mro__
    for name in protocol_members() - methods:
        assert hasattr(client, name), name


def test_model_info_is_the_models_config_and_the_engines_limits(llm):
    info, config, engine = ModelInfo.of(llm.engine), llm.config, llm.engine
    assert (info.vocab_size, info.max_seq_len, info.max_positions) == (config.vocab_size, config.max_seq_len,
                                                                       engine.cache.max_positions)
    assert info.dtype == str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    assert (info.max_batch, info.compiled, info.prefix_cache, info.speculative_tokens) == (2, False, True, None)
    assert info.max_model_len == (engine.cache.max_positions or config.max_seq_len)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.vocab_size = 1
    assert process_client(llm).model_info == info == EngineDriver(llm).model_info


def test_a_process_client_is_unavailable_until_its_engine_reports(llm):
    client = EngineProcessClient(EngineLoad(source=str(llm.source)), llm.tokenizer)
    assert client.model_info is None and "starting" in client.unavailable()
    assert client.stats().running == 0  # /metrics is scraped while the engine loads
    with TestClient(build_app(client, MODEL)) as c:
        assert c.get("/health").status_code == 503 and c.get("/v1/models").status_code == 503


@pytest.mark.parametrize("kind", [EngineDriver, EngineProcessClient])
def test_the_app_reads_model_facts_from_either_client(kind, llm, driver):
    client = driver if kind is EngineDriver else process_client(llm)
    info = client.model_info
    with TestClient(build_app(client, MODEL)) as c:
        assert c.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] == info.max_positions
        assert c.post("/tokenize", json={"prompt": "hi"}).json()["max_model_len"] == info.max_model_len
        r = c.post("/detokenize", json={"tokens": [info.vocab_size]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "top_k": info.vocab_size + 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
        if kind is EngineProcessClient:  # its counters come with each step's message
            stats = {"steps": 3, "aborted": 1, "prefix": llm.engine.prefix.metrics(), "spec": None}
            client._on_message({"op": "step", "out": [], "stats": stats})
            assert client.stats().steps == 3
        assert "mistral7b:prefix_cache_queries_total" in c.get("/metrics").text  # the prefix cache is on in both
        schema = c.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
        assert schema["top_k"]["anyOf"][0]["maximum"] == info.vocab_size


def test_the_engine_driver_serves_a_completion(llm, driver):
    from mistral7b.sampling import SamplingParams

    want = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4))[0].text
    with TestClient(build_app(driver, MODEL)) as c:
        got = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert got.json()["choices"][0]["text"] == want
