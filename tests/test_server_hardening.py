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
