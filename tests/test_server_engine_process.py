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
from mistral7b.server import ServerThread, build_app  # noqa: E402
from mistral7b.server.engine_client import RemoteLLM  # noqa: E402
from mistral7b.server.engine_process import EngineLoad  # noqa: E402

MODEL = "tiny"
MAX_BATCH = 4
PROMPTS = ["the quick brown fox", "hello there, how are you", "a b c d e f", "once upon a time"]
CHAT = [{"role": "user", "content": "tell me about the sea"}]
ENGINE = {"max_batch": MAX_BATCH, "prefix_cache_gib": 0.01, "prefix_block_size": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    vocab = train_tokenizer_json(folder, "bytelevel").get_vocab_size()
    config = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=256,
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
    remote = RemoteLLM(EngineLoad(source=str(checkpoint), device="cpu", engine=ENGINE))
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
    for line in response.iter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events, done


def test_startup_then_completions_match_in_process(server, http, llm):
    assert server.startup_codes[0] == 503 and server.startup_codes[-1] == 200
    assert server.remote.client.process.pid != os.getpid()
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
