"""Hostile input to the HTTP server: each bad request gets one clear 400 naming the problem (through
FastAPI's TestClient on the default model; no live socket needed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.server import build_app  # noqa: E402

MODEL = "smollm2-test"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(quantize=False)


@pytest.fixture(scope="module")
def tc(llm):
    with TestClient(build_app(llm, MODEL)) as c:
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
    from mistral7b.server.driver import EngineDriver, _Subscriber
    from mistral7b.server.metrics import Metrics
    from mistral7b.server.serving import Admission

    engine = llm.engine
    driver = EngineDriver(engine)
    driver.start = lambda: None  # this test plays the engine thread: nothing else steps the engine
    admission = Admission(engine, max_queue=0, driver=driver)
    loop, metrics = asyncio.new_event_loop(), Metrics()
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    try:
        subs = [_Subscriber(loop, asyncio.Queue(), i, metrics) for i in range(engine.max_batch)]
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
