"""The server with its engine in a process of its own (server/engine_client.py, engine_process.py), on a
tiny random Mistral with a trained byte-level tokenizer, CPU.

References come from the same checkpoint run in-process (`LLM.generate`, greedy), in this process; the
server's engine process loads the checkpoint itself. One server serves the module; the failure test
runs `mistral7b serve` as a subprocess and kills its engine process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")

from checkpoints import randomize_  # noqa: E402
from test_tokenizer import train_tokenizer_json  # noqa: E402

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.sampling import SamplingParams  # noqa: E402
from mistral7b.server import EngineDriver, ServerThread, build_app  # noqa: E402
from mistral7b.server.engine_client import EngineProcessClient  # noqa: E402
from mistral7b.server.engine_process import EngineLoad  # noqa: E402

MODEL = "tiny"
MAX_BATCH = 4
PROMPTS = ["the quick brown fox", "hello there, how are you", "a b c d e f", "once upon a time"]
CHAT = [{"role": "user", "content": "tell me about the sea"}]
ENGINE = {"max_batch": MAX_BATCH, "prefix_cache_gib": 0.01, "prefix_block_size": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def tiny_checkpoint(folder, max_positions: int = 256):
    """A random tiny Mistral saved as an HF folder with a trained byte-level tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    vocab = train_tokenizer_json(folder, "bytelevel").get_vocab_size()
    config = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=max_positions,
                           sliding_window=None, attn_implementation="eager")
    seed = int(torch.randint(0, 2**31, ()))
    randomize_(MistralForCausalLM(config).float().eval(), torch.Generator().manual_seed(seed)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), device="cpu", **ENGINE)


def _greedy(llm, prompt_ids, max_tokens, **kw):
    return llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw))[0]


@pytest.fixture(scope="module")
def server(checkpoint):
    remote = EngineProcessClient.launch(EngineLoad(source=str(checkpoint), device="cpu", engine=ENGINE))
    with ServerThread(build_app(remote, MODEL)) as st:
        codes = []
        with httpx.Client(base_url=st.url, timeout=30) as c:
            while not codes or codes[-1] != 200:
                codes.append(c.get("/health").status_code)
                if codes[-1] == 503 and len(codes) == 1:  # still loading: generation is refused, in OpenAI's shape
                    r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
                    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
                time.sleep(0.05)
        st.startup_codes = codes
        st.remote = remote
        yield st
    remote.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _metric(http, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", http.get("/metrics").text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def _events(response) -> tuple[list[dict], bool]:
    events, done = [], False
    # SSE lines end at "\n" only: httpx's iter_lines also splits at U+2028 and friends, which random
    # text from a tiny model can hold inside an event's JSON.
    for line in b"".join(response.iter_bytes()).decode().split("\n"):
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events, done


def test_startup_then_completions_match_in_process(server, http, llm):
    assert server.startup_codes[0] == 503 and server.startup_codes[-1] == 200
    assert server.remote.process.pid != os.getpid()
    for prompt in PROMPTS[:2]:
        ids = llm.encode_prompt(prompt)
        ref = _greedy(llm, ids, 12)
        for p in (prompt, ids):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0})
            body = r.json()
            assert r.status_code == 200, body
            assert body["choices"][0]["text"] == ref.text and body["choices"][0]["finish_reason"] == ref.finish_reason
            assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref.token_ids),
                                     "total_tokens": len(ids) + len(ref.token_ids)}
    ids = llm.chat_prompt(CHAT)
    ref = _greedy(llm, ids, 10)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 10, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == ref.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_streams_and_logprobs_match_in_process(server, llm):
    refs = [_greedy(llm, llm.encode_prompt(p), 16, ignore_eos=True) for p in PROMPTS]

    def one(k):
        body = {"model": MODEL, "prompt": PROMPTS[k], "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            events, done = _events(r)
        assert done
        return "".join(e["choices"][0]["text"] for e in events if e["choices"]), events[-1]["usage"]

    results = [None] * len(PROMPTS)
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, one(k))) for k in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ref, (text, usage) in zip(refs, results):  # concurrent streams, each equal to its in-process run
        assert text == ref.text and usage["completion_tokens"] == 16
    ids = llm.encode_prompt(PROMPTS[0])
    ref = _greedy(llm, ids, 5, logprobs=2)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        lp = c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0,
                                             "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-5)
    for top, e in zip(lp["top_logprobs"], ref.logprobs):  # distinct tokens keep distinct keys, even U+FFFD ones
        assert sorted(top.values()) == pytest.approx(sorted(x for _, x in e.top), abs=1e-5)


def test_stop_string_ends_here_and_aborts_in_engine(server, http, llm):
    ids = llm.encode_prompt(PROMPTS[1])
    ref = _greedy(llm, ids, 24, ignore_eos=True)
    stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 2]
    cut = ref.text.index(stop)
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stop": stop}
    before = _metric(http, "mistral7b_sequences_aborted_total")
    r = http.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == ref.text[:cut] and r["choices"][0]["finish_reason"] == "stop"
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events, done = _events(s)
    assert done and "".join(e["choices"][0]["text"] for e in events) == ref.text[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    _until(lambda: _metric(http, "mistral7b_sequences_aborted_total") == before + 2)  # the engine dropped both


def _until(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnect_aborts_in_engine(server, http):
    before = _metric(http, "mistral7b_sequences_aborted_total")
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert http.get("/health").json()["running"] == 1
    _until(lambda: _metric(http, "mistral7b_sequences_aborted_total") == before + 1)
    assert http.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}


def test_metrics_reach_the_http_process(server, http, llm):
    prompt = " ".join(PROMPTS)  # longer than a few prefix-cache blocks
    n_prompt = len(llm.encode_prompt(prompt))
    before = {name: _metric(http, name) for name in ("mistral7b_prompt_tokens_total", "mistral7b_generation_tokens_total",
                                                     "mistral7b_time_to_first_token_seconds_count",
                                                     "mistral7b:prefix_cache_hits_total")}
    for _ in range(2):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200
    assert _metric(http, "mistral7b_prompt_tokens_total") == before["mistral7b_prompt_tokens_total"] + 2 * n_prompt
    assert _metric(http, "mistral7b_generation_tokens_total") == before["mistral7b_generation_tokens_total"] + 6
    assert _metric(http, "mistral7b_time_to_first_token_seconds_count") == before[
        "mistral7b_time_to_first_token_seconds_count"] + 2
    # the second request restored the first one's blocks: the engine process's counters reach /metrics
    assert _metric(http, "mistral7b:prefix_cache_hits_total") >= before["mistral7b:prefix_cache_hits_total"] + n_prompt // 8 * 4
    assert _metric(http, "mistral7b_engine_steps_total") > 0


# ---- the engine process dies ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_pid(parent: int) -> int:
    """The spawned engine process among `parent`'s children (not multiprocessing's resource tracker)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            return int(entry)
    raise AssertionError("no engine process")


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_dead_or_hung_engine_fails_requests_then_server_exits(checkpoint, fault):
    """SIGKILL, or SIGSTOP (a hang: the watchdog kills it after --engine-step-timeout), mid-stream."""
    from mistral7b.server.settings import ENGINE_DIED_EXIT

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "mistral7b.cli", "serve", "--model", str(checkpoint), "--device", "cpu",
               "--port", str(port), "--max-batch", "2", "--log-level", "warning", "--engine-step-timeout", "3"]
    expected = {"killed": "engine process was killed by signal 9",
                "hung": "engine process sent nothing for 3 s with requests open and was killed"}[fault]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            _until(lambda: _health(c) == 200, timeout=120)
            body = {"model": str(checkpoint.name), "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True}
            waiting = {}
            blocked = threading.Thread(target=lambda: waiting.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                                   timeout=60)))
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: {")
                blocked.start()
                _until(lambda: c.get("/health").json()["running"] == 2)
                os.kill(_engine_pid(proc.pid), signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
                rest = [line for line in lines if line]
            errors = [json.loads(line[6:]) for line in rest if line.startswith("data: {\"error\"")]
            assert len(errors) == 1 and expected in errors[0]["error"]["message"]
            assert errors[0]["error"]["type"] == "server_error" and rest[-1] == "data: [DONE]"
            health = c.get("/health")
            assert health.status_code == 503 and "engine process" in health.json()["error"]["message"]
            blocked.join(30)
            assert waiting["r"].status_code == 500 and waiting["r"].json()["error"]["code"] == "engine_error"
        assert proc.wait(timeout=30) == ENGINE_DIED_EXIT
        assert "exiting (status 70)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _health(client) -> int | None:
    try:
        return client.get("/health").status_code
    except httpx.TransportError:
        return None


def test_structured_output_and_its_stop_strings_match_in_process(server, llm):
    """The grammar lives in the engine process; a stop string may end a constrained value only once it is
    complete, which the HTTP side learns from each step (`accepting`). Compared with the thread driver."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a", "b"]}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    with ServerThread(build_app(EngineDriver(llm), MODEL)) as local:
        for extra in ({}, {"stop": ["\"", "}"]}):
            got = [httpx.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=60).json()
                   for url in (server.url, local.url)]
            assert got[0]["choices"] == got[1]["choices"], extra
            assert got[0]["choices"][0]["message"]["content"].startswith("{")


def test_serve_over_two_ranks_matches_in_process(checkpoint, llm):
    """`mistral7b serve --tensor-parallel-size 2`: the engine process starts the second rank itself (a
    daemonic process could not), greedy completions equal one process's, and SIGTERM stops all three
    processes with status 0 and nothing left behind."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "mistral7b.cli", "serve", "--model", str(checkpoint), "--device", "cpu",
               "--port", str(port), "--max-batch", "2", "--log-level", "warning", "--tensor-parallel-size", "2"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            _until(lambda: _health(c) == 200, timeout=120)
            for prompt in PROMPTS[:2]:
                ref = _greedy(llm, llm.encode_prompt(prompt), 8, ignore_eos=True)
                r = c.post("/v1/completions", json={"model": checkpoint.name, "prompt": prompt, "max_tokens": 8,
                                                    "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text, r.text
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(timeout=60) == 0
        # The engine closes its model, so rank 1 is told to stop (rather than finding its peer gone
        # after the HTTP process gave up waiting, 10 s later, and killed the engine).
        assert time.monotonic() - start < 8
        stderr = proc.stderr.read()
        for problem in ("leaked semaphore", "Traceback", "tensor-parallel rank", "killed"):
            assert problem not in stderr, stderr[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("size", ["3", "0"])
def test_serve_tensor_parallel_size_that_cannot_split_is_one_line(checkpoint, size, capsys):
    """Checked against the checkpoint's KV heads (2) before anything loads or binds: one line, no traceback."""
    from mistral7b import cli

    args = ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", str(_free_port()),
            "--tensor-parallel-size", size]
    if size == "0":  # a usage error (exit 2) from argparse
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        assert exit_.value.code == 2
        assert "--tensor-parallel-size" in capsys.readouterr().err.splitlines()[-1]
        return
    assert cli.main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["mistral7b: error: tensor_parallel_size 3 does not divide this model's 2 KV heads; "
                   "choose one of 1, 2"]


class _WarmupFails:
    """A stand-in `LLM` whose engine loads, then fails to compile; `close` leaves a mark to look for."""

    def __init__(self, marker: str):
        self.marker = marker
        self.engine = type("Engine", (), {"compiled": True, "output": type("Output", (), {})()})()
        self.engine.warmup = self._fail

    @staticmethod
    def _fail():
        raise RuntimeError("the decode step did not compile")

    def close(self):
        with open(self.marker, "w") as f:
            f.write("closed")


def warmup_fails(marker: str) -> _WarmupFails:
    """EngineLoad.factory for the test below (the engine process imports this module)."""
    return _WarmupFails(marker)


def test_engine_that_fails_warmup_reports_and_closes_its_model(tmp_path):
    """A load that succeeds and a warm-up that fails: the client hears the error, and the engine process
    closes the model before it exits 1 (a tensor-parallel model's ranks would otherwise hold its exit)."""
    marker = tmp_path / "closed"
    load = EngineLoad(factory="test_server_engine_process:warmup_fails", factory_args={"marker": str(marker)})
    client = EngineProcessClient.launch(load, name="warmup-fails")
    try:
        with pytest.raises(RuntimeError, match="exited with code 1 .*RuntimeError: the decode step did not compile"):
            client.warm_up(timeout=120)
    finally:
        client.close()
    assert marker.read_text() == "closed"
    assert client.process.exitcode == 1
