"""The prefix cache's counters on /metrics of a live server (default model, CPU) with prefix caching on."""

from __future__ import annotations

import re

import httpx
import pytest

pytest.importorskip("fastapi")

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.server import EngineDriver, ServerThread, build_app  # noqa: E402

SYSTEM = " ".join(f"Rule {i}: answer briefly and politely, in plain English." for i in range(12))


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


@pytest.mark.usefixtures("one_thread")
def test_metrics_show_prefix_cache_hits():
    llm = LLM(max_batch=2, prefix_cache_gib=0.01)
    shared = llm.encode_prompt(SYSTEM)
    block = llm.engine.prefix.block_size
    assert len(shared) > 2 * block
    with ServerThread(build_app(EngineDriver(llm), "m"), log_level="warning") as server, httpx.Client(base_url=server.url, timeout=120) as http:
        before = http.get("/metrics").text
        assert _metric(before, "mistral7b:prefix_cache_hits_total") == 0
        for question in ("What is two plus two?", "Name a colour."):
            r = http.post("/v1/completions", json={"model": "m", "prompt": SYSTEM + " " + question,
                                                   "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
        text = http.get("/metrics").text
    queries = _metric(text, "mistral7b:prefix_cache_queries_total")
    hits = _metric(text, "mistral7b:prefix_cache_hits_total")
    assert queries >= 2 * len(shared)
    assert hits >= (len(shared) // block - 1) * block  # the second request restored the shared blocks
    assert hits % block == 0 and hits < queries
    assert 0 < _metric(text, "mistral7b:prefix_cache_usage_bytes") <= _metric(text, "mistral7b:prefix_cache_capacity_bytes")


def test_serve_prefix_cache_flags():
    import argparse

    from mistral7b.cli import serve

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    serve.add_arguments(p)
    assert serve.prefix_cache_gib(p.parse_args([])) == serve.DEFAULT_PREFIX_GIB["cpu"]
    assert serve.prefix_cache_gib(p.parse_args(["--prefix-cache-gib", "0.5"])) == 0.5
    assert serve.prefix_cache_gib(p.parse_args(["--prefix-cache-gib", "2", "--no-prefix-cache"])) == 0
    for bad in ("-1", "nan", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["--prefix-cache-gib", bad])
