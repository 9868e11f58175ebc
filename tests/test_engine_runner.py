"""The model runner's compiled decode step: many compiled runners in one process."""

from __future__ import annotations

import pytest
import torch

from mistral7b.config import ModelConfig
from mistral7b.engine import Engine, runner
from mistral7b.model import Transformer
from mistral7b.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_runners_do_not_share_a_recompile_budget(monkeypatch):
    """Ten engines over ten models of different structure (as bf16, int8 and int4 modules are), each
    compiled: before each runner compiled a code object of its own, the ninth hit dynamo's recompile
    limit (8) and failed, as issue 21's quant bench did on the GPU. Dynamo with the eager backend
    keeps the test fast and is where the limit lives."""
    compile_ = torch.compile
    monkeypatch.setattr(runner.torch, "compile", lambda fn, mode=None, **kw: compile_(fn, backend="eager", **kw))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompt = torch.randint(0, 97, (5,)).tolist()
    for layers in range(1, 11):
        config = ModelConfig(dim=32, n_layers=layers, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                             vocab_size=97, sliding_window=8, max_seq_len=64)
        model = Transformer(config).eval()
        engine = Engine(model, None, max_batch=2, compile=True)
        compiled = engine.add(prompt, params)
        while not compiled.finished:
            engine.step()
        eager = Engine(model, None, max_batch=2)
        plain = eager.add(prompt, params)
        while not plain.finished:
            eager.step()
        assert compiled.output_ids == plain.output_ids


def test_own_code_is_a_distinct_code_object():
    class Thing:
        def method(self, x):
            return x + 1

    thing = Thing()
    copy = runner.own_code(thing.method)
    assert copy(1) == 2 and copy.__self__ is thing
    assert copy.__func__.__code__ is not Thing.method.__code__
