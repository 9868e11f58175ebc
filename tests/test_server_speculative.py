"""`mistral7b serve --speculative`: the config reaches the engine on a thread and in its own process, the
greedy text is plain greedy's, `/metrics` counts drafts; bad flags are one line before the model loads.

The default model, dense float32 (`--quantize none`: the int4 kernels round a several-token verify
differently from a one-token step, so a near-tie could part), on prompts that repeat themselves so
that prompt lookup has something to propose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("fastapi")

from test_server_engine_process import _free_port, _health, _until  # noqa: E402

from mistral7b import LLM, SamplingParams, SpeculativeConfig  # noqa: E402
from mistral7b.engine import EngineConfig  # noqa: E402
from mistral7b.server import EngineDriver, ServerThread, build_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "smol"
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "house"]
MAX_TOKENS = 24


def repeating_prompt(rng: random.Random) -> str:
    phrase = " ".join(rng.sample(WORDS, 3))
    return ", ".join([phrase] * 4) + ","


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random()
    return [repeating_prompt(rng) for _ in range(2)]


@pytest.fixture(scope="module")
def llm():
    # Backoff off: these tests count drafts through the server; whether a row backs off hangs on this box's
    # timings (test_spec_backoff.py tests that policy apart).
    return LLM(device="cpu", quantize="none", max_batch=2, speculative=SpeculativeConfig("ngram", 3, backoff=False))


@pytest.fixture(scope="module")
def plain(llm, prompts):
    """Plain greedy text of each prompt: the same engine with its speculator set aside."""
    speculator, llm.engine.speculator = llm.engine.speculator, None
    try:
        return [llm.generate([llm.encode_prompt(p)], SamplingParams(max_tokens=MAX_TOKENS))[0].text for p in prompts]
    finally:
        llm.engine.speculator = speculator


def spec_counts(metrics_text: str) -> tuple[float, float]:
    """(draft tokens, accepted tokens) from `/metrics`."""
    found = []
    for name in ("mistral7b:spec_decode_num_draft_tokens_total", "mistral7b:spec_decode_num_accepted_tokens_total"):
        match = re.search(rf"^{re.escape(name)} (\S+)$", metrics_text, re.M)
        assert match, f"{name} missing from /metrics"
        found.append(float(match.group(1)))
    return found[0], found[1]


def complete_all(client: httpx.Client, prompts: list[str]) -> list[str]:
    texts = []
    for prompt in prompts:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


def test_engine_on_a_thread_speculates_and_counts(llm, prompts, plain):
    with ServerThread(build_app(EngineDriver(llm), MODEL)) as st, httpx.Client(base_url=st.url, timeout=120) as c:
        assert complete_all(c, prompts) == plain
        drafted, accepted = spec_counts(c.get("/metrics").text)
    assert drafted > 0 and 0 < accepted <= drafted


def test_serve_with_its_engine_process_speculates_and_counts(prompts, plain):
    """`mistral7b serve --speculative ngram --num-speculative-tokens 3 --no-speculative-backoff`, engine in its
    own process: the config crosses the process boundary as JSON, and the counters come back with each step."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "mistral7b.cli", "serve", "--device", "cpu", "--quantize", "none", "--port",
               str(port), "--max-batch", "2", "--model-name", MODEL, "--log-level", "warning", "--speculative", "ngram",
               "--num-speculative-tokens", "3", "--no-speculative-backoff"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            _until(lambda: proc.poll() is not None or _health(c) == 200, timeout=180)
            assert proc.poll() is None, proc.stderr.read()
            metrics = c.get("/metrics").text
            assert spec_counts(metrics) == (0, 0)  # reported as soon as the engine is ready
            assert 'mistral7b:spec_decode_num_accepted_tokens_per_pos_total{position="2"} 0.0' in metrics
            assert complete_all(c, prompts) == plain
            drafted, accepted = spec_counts(c.get("/metrics").text)
        assert drafted > 0 and 0 < accepted <= drafted
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_stop_string_sees_the_grammar_after_each_token_of_a_step(llm):
    """The HTTP side of an engine process, given one speculative step of several tokens of a constrained
    reply: a stop string met where the value was unfinished is ignored, though the step ends complete."""
    from mistral7b.engine.request import Request
    from mistral7b.server.engine_client import EngineProcessClient
    from mistral7b.server.engine_process import EngineLoad

    client = EngineProcessClient(EngineLoad(), llm.tokenizer)
    request = Request([1], SamplingParams(stop=['"'], regex=r'\{"a": "x"\}'), "r")
    client.output.prepare(request)
    tokens = llm.tokenizer.encode('{"a": "x"}', bos=False)
    sub = SimpleNamespace(metrics=SimpleNamespace(record_tokens=lambda *a: None), last_time=None, sent_tokens=0,
                          choice=0)
    accepting = [False] * (len(tokens) - 1) + [True]
    item = client._advance(request, sub, ["r", tokens, None, None, None, accepting], 0.0)
    assert request.output_ids == tokens and item.text == '{"a": "x"}' and item.finish_reason == "stop"


def test_the_engine_config_survives_the_trip_to_the_engine_process():
    config = EngineConfig(max_batch=3, speculative=SpeculativeConfig("draft", 5, draft="/d.gguf"))
    assert EngineConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    ngram = EngineConfig(speculative=SpeculativeConfig("ngram", 3, draft_by_match=(0, 2)))  # a tuple, not JSON's list
    assert EngineConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(ngram)))) == ngram
    assert EngineConfig.from_dict(dataclasses.asdict(EngineConfig())) == EngineConfig()


def test_serve_hands_the_speculative_config_to_either_engine(monkeypatch):
    """Model loading stubbed: what `--speculative` and `--num-speculative-tokens` become."""
    from mistral7b import cli
    from mistral7b.cli import serve as serve_command
    from mistral7b.server import app

    seen = {}
    monkeypatch.setattr(serve_command, "local_client", lambda args, config: seen.update(thread=config.speculative))
    monkeypatch.setattr(serve_command, "remote_client", lambda args, config: seen.update(process=config.speculative))
    monkeypatch.setattr(serve_command, "listen_socket", lambda host, port: "sock")
    monkeypatch.setattr(app, "serve", lambda client, **kwargs: None)
    assert cli.main(["serve", "--speculative", "ngram", "--num-speculative-tokens", "2", "--engine-in-process"]) == 0
    assert cli.main(["serve", "--speculative", "draft:/small.gguf"]) == 0
    assert seen == {"thread": SpeculativeConfig("ngram", 2), "process": SpeculativeConfig("draft", 4, draft="/small.gguf")}
    assert cli.main(["serve"]) == 0
    assert seen["process"] is None


@pytest.mark.parametrize("flags, message", [
    (["--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens must be an integer in [1, 16], got 0"),
    (["--speculative", "ngram", "--num-speculative-tokens", "17"], "--num-speculative-tokens must be an integer in [1, 16], got 17"),
    (["--speculative", "eagle"], "speculative method must be one of ngram, draft, self-int4, got 'eagle'"),
    (["--speculative", "draft"], "--speculative draft needs the draft model's source: draft:SRC"),
])
def test_bad_speculative_flags_are_one_line_before_the_model_loads(flags, message, monkeypatch, capsys):
    from mistral7b import cli
    from mistral7b.cli import serve as serve_command

    for name in ("local_client", "remote_client", "listen_socket"):
        monkeypatch.setattr(serve_command, name, lambda *a, name=name: pytest.fail(f"{name} ran"))
    assert cli.main(["serve", *flags]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines == [f"mistral7b: error: {message}"] and not captured.out
