"""Graceful shutdown (server/shutdown.py, GuardedServer.handle_exit) and the model routes' edges, on a
tiny random Mistral (CPU).

In-process servers get the signal as uvicorn would deliver it (`handle_exit`), with the engine slowed
so that requests are surely running when it comes; one test runs `mistral7b serve` and signals its
whole process group, as a terminal's Ctrl-C or systemd does, engine process included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_server_engine_process import _engine_pid, _events, _free_port, _health, _until  # noqa: E402
from test_server_engine_process import checkpoint, tiny_checkpoint  # noqa: E402,F401 (a fixture)

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.server import EngineDriver, ServerThread, build_app  # noqa: E402
from mistral7b.server.shutdown import DRAINING, FLUSH_S, Drain  # noqa: E402

MODEL = "tiny"
STEP_S = 0.03  # the slowed engine's time per step


@pytest.fixture(scope="module")
def llm(checkpoint):  # noqa: F811
    llm = LLM(str(checkpoint), device="cpu", max_batch=4)
    step = llm.engine.step

    def slow_step():
        time.sleep(STEP_S)
        return step()

    llm.engine.step = slow_step
    return llm


@pytest.fixture(scope="module")
def engine_driver(llm):
    """The engine's one EngineDriver: every app of this module is built over it."""
    return EngineDriver(llm)


def _stream(url: str, max_tokens: int, model: str = MODEL) -> tuple[list[dict], bool]:
    body = {"model": model, "prompt": "once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        return _events(r)


def _running(server, count: int) -> None:
    """Until `count` requests run: a stream not yet admitted when the signal comes is refused, rightly."""
    _until(lambda: httpx.get(server.url + "/health").json()["running"] >= count, timeout=30)


def test_drain_clock():
    now = [100.0]
    ended = []
    drain = Drain(ended.append, clock=lambda: now[0])
    assert not drain.active and drain.problem() is None
    drain.begin(5.0)
    assert drain.problem() == DRAINING
    assert not drain.finished(2) and not ended
    now[0] += 5.0  # the timeout: the requests left are ended, then get FLUSH_S to hear it
    assert not drain.finished(2) and len(ended) == 1
    now[0] += FLUSH_S - 0.1
    assert not drain.finished(2)
    now[0] += 0.1
    assert drain.finished(2) and len(ended) == 1
    other = Drain(ended.append, clock=lambda: now[0])
    other.begin(60.0)
    other.expire()  # a second signal
    assert not other.finished(1) and len(ended) == 2
    assert Drain().finished(0)  # nothing open: done at once


def test_running_requests_finish_while_new_ones_and_health_get_503(engine_driver):
    max_tokens = 60
    with ServerThread(build_app(engine_driver, MODEL), shutdown_timeout=30) as server, ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(_stream, server.url, max_tokens) for _ in range(2)]
        _running(server, len(streams))  # both: waiting for one let the other arrive after the signal
        server.server.handle_exit(signal.SIGTERM, None)
        health = httpx.get(server.url + "/health")
        refused = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        for r in (health, refused):
            assert r.status_code == 503 and r.json()["error"] == {"message": DRAINING, "type": "server_error",
                                                                 "param": None, "code": "server_shutting_down"}
        for future in streams:
            events, done = future.result(timeout=60)
            assert done and events[-1]["choices"][0]["finish_reason"] == "length"
            assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 0 and "error" not in events[-1]
        server.thread.join(10)
        assert not server.thread.is_alive() and server.server.drain.ended_at is None


def test_a_second_signal_ends_open_requests_with_an_error_and_done(engine_driver):
    with ServerThread(build_app(engine_driver, MODEL), shutdown_timeout=30) as server, ThreadPoolExecutor(2) as pool:
        stream = pool.submit(_stream, server.url, 200)
        whole = pool.submit(httpx.post, server.url + "/v1/completions", timeout=60,
                            json={"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True})
        _until(lambda: httpx.get(server.url + "/health").json()["running"] == 2, timeout=30)
        started = time.monotonic()
        server.server.handle_exit(signal.SIGTERM, None)
        server.server.handle_exit(signal.SIGTERM, None)  # 200 tokens would take 6 s at STEP_S
        events, done = stream.result(timeout=30)
        assert done and "shutting down" in events[-1]["error"]["message"]
        assert events[-1]["error"]["type"] == "server_error"
        response = whole.result(timeout=30)
        assert response.status_code == 500 and "shutting down" in response.json()["error"]["message"]
        server.thread.join(10)
        assert not server.thread.is_alive() and time.monotonic() - started < 200 * STEP_S / 2


def test_model_routes_retrieve_and_cut_unknown_names(engine_driver):
    with ServerThread(build_app(engine_driver, MODEL)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        listed = client.models.list().data[0]
        assert client.models.retrieve(MODEL) == listed  # OpenAI's Model type, parsed by its client
        missing = httpx.get(server.url + "/v1/models/other%2Fmodel")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert "'other/model'" in missing.json()["error"]["message"]
        huge = "m" * 900_000
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            r = httpx.post(server.url + path, json={"model": huge, **body}, timeout=30)
            error = r.json()["error"]
            assert r.status_code == 404 and error["param"] == "model" and len(r.content) < 1000
            assert f"'{'m' * 100}... (900000 characters)'" in error["message"] and MODEL in error["message"]


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """Room for streams that outlast the signal: on a fast CPU (Zen 5) the tiny model's 200 tokens could end
    before it, so that /health never showed 2 running, or a stream finished where shutdown should cut it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_positions=4096)


@pytest.mark.parametrize("sig, timeout, max_tokens", [(signal.SIGTERM, "30", 2000), (signal.SIGINT, "0", 2000)])
def test_signal_to_the_process_group_drains_and_exits_0(long_checkpoint, sig, timeout, max_tokens):
    """`mistral7b serve` with its engine process: both get the signal. With time to finish, every stream
    ends with its whole answer; with none, with an error event; then [DONE], exit 0, no engine left."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "mistral7b.cli", "serve", "--model", str(long_checkpoint), "--device", "cpu",
               "--port", str(port), "--max-batch", "2", "--log-level", "warning", "--shutdown-timeout", timeout]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            _until(lambda: _health(c) == 200, timeout=120)
            engine = _engine_pid(proc.pid)
            results, model = [], long_checkpoint.name
            streams = [threading.Thread(target=lambda: results.append(_stream(url, max_tokens, model)))
                       for _ in range(2)]
            for t in streams:
                t.start()
            _until(lambda: c.get("/health").json()["running"] == 2)
            os.killpg(proc.pid, sig)
            for t in streams:
                t.join(60)
        assert len(results) == 2 and all(done for _, done in results)
        last = [events[-1] for events, _ in results]
        if timeout == "0":
            assert all("shutting down" in e["error"]["message"] for e in last), last
        else:
            assert all(e["choices"][0]["finish_reason"] == "length" for e in last), last
        assert proc.wait(timeout=30) == 0
        _until(lambda: not os.path.exists(f"/proc/{engine}") or "Z" in open(f"/proc/{engine}/stat").read().split()[2])
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
