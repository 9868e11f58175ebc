"""examples/grafana.json names only metrics that a live server's GET /metrics serves (a tiny random
Mistral with the prefix cache on, after one request, so that labelled series exist), and groups only
by labels those metrics carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from test_server_engine_process import ENGINE  # noqa: E402
from test_server_engine_process import checkpoint  # noqa: E402,F401 (a fixture)

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.server import EngineDriver, ServerThread, build_app  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana.json"
METRIC = re.compile(r"\bmistral7b[_:][A-Za-z0-9_:]*")
SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? ")


@pytest.fixture(scope="module")
def exported(checkpoint):  # noqa: F811
    """{metric name: label names} as the server's /metrics serves them."""
    llm = LLM(str(checkpoint), device="cpu", **ENGINE)
    with ServerThread(build_app(EngineDriver(llm), "tiny")) as server:
        done = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3},
                          timeout=60)
        assert done.status_code == 200
        text = httpx.get(server.url + "/metrics").text
    names: dict[str, set] = {}
    for line in text.splitlines():
        if match := SAMPLE.match(line):
            labels = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', match.group(2) or "")
            names.setdefault(match.group(1), set()).update(labels)
    return names


def _queries(dashboard: dict) -> list[str]:
    """Every PromQL query: the panels' targets and the template variables'."""
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_every_query_names_metrics_the_server_exports(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 10
    for query in queries:
        named = METRIC.findall(query)
        assert named, f"a query names no mistral7b metric: {query}"
        missing = [name for name in named if name not in exported]
        assert not missing, f"{missing} not served by /metrics (query: {query})"
        for group in re.findall(r"\bby \(([^)]*)\)", query):
            for label in (g.strip() for g in group.split(",")):
                assert label == "le" or any(label in exported[name] for name in named), (label, query)


def test_dashboard_covers_throughput_latency_queue_and_caches():
    named = {name for query in _queries(json.loads(DASHBOARD.read_text())) for name in METRIC.findall(query)}
    assert {"mistral7b_generation_tokens_total", "mistral7b_time_to_first_token_seconds_bucket",
            "mistral7b_inter_token_latency_seconds_bucket", "mistral7b_num_requests_waiting",
            "mistral7b_num_requests_running", "mistral7b:prefix_cache_usage_bytes",
            "mistral7b:prefix_cache_hits_total"} <= named
