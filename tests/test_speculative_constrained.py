"""Speculation with a structured-output row in the batch, on the real default model: the constrained row
is not speculated (its grammar state would need rolling back) and still matches its pattern; the free
greedy row beside it decodes exactly what plain decoding gives."""

from __future__ import annotations

import re

import pytest

from mistral7b import LLM, SamplingParams, SpeculativeConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_constrained_row_beside_speculating_rows():
    # Dense float32: the int4 kernels round a several-token verify differently from a one-token step.
    llm = LLM(device="cpu", quantize="none", max_batch=2, speculative=SpeculativeConfig("ngram", 4))
    chat = lambda text: llm.chat_prompt([{"role": "user", "content": text}])  # noqa: E731
    free = [chat("Repeat exactly: one two three four five six seven.")]
    constrained = SamplingParams(regex=r"[0-9]{3}-[a-z]{2,4}", max_tokens=12, temperature=1.0)
    greedy = SamplingParams(max_tokens=16)
    outputs = llm.generate([free[0], chat("Give a code.")], [greedy, constrained])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", outputs[1].text)
    stats = llm.engine.speculator.stats
    assert stats.accepted_tokens > 0
    llm.engine.speculator = None  # the same engine, plain decoding, for the free rows alone
    plain = llm.generate(free, greedy)
    assert outputs[0].token_ids == plain[0].token_ids
