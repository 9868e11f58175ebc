"""Structured outputs through the engine on the real default model: constrained and free requests in
one batch at temperature 1; outputs checked with jsonschema / re, free rows against a run without
their constrained neighbours."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from mistral7b import LLM, SamplingParams
from mistral7b.structured import StructuredOutputError

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]}}, "required": ["kind"],
                "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 2},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_batch=8)


def _chat(llm, text):
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def test_mixed_batch_constrained_outputs_validate_and_free_rows_are_unchanged(llm):
    rng = random.Random()
    seeds = [rng.randrange(1 << 30) for _ in range(6)]
    free_prompts = [_chat(llm, "Tell me a short story."), _chat(llm, "Name three fruits.")]
    free = [SamplingParams(temperature=1.0, max_tokens=12, seed=s) for s in seeds[:2]]
    constrained_prompts = [_chat(llm, "Describe a person as JSON."), _chat(llm, "Describe a person as JSON."),
                           _chat(llm, "Give a code."), _chat(llm, "Pick a colour.")]
    constrained = [
        SamplingParams(temperature=1.0, max_tokens=120, seed=seeds[2], json_schema=SCHEMA),
        SamplingParams(temperature=1.0, max_tokens=120, seed=seeds[3], json_schema=json.dumps(SCHEMA)),
        SamplingParams(temperature=1.0, max_tokens=20, seed=seeds[4], regex=REGEX),
        SamplingParams(temperature=1.0, max_tokens=20, seed=seeds[5], choice=CHOICES),
    ]
    # Interleave so constrained and free rows sit side by side in the batch.
    prompts = [constrained_prompts[0], free_prompts[0], constrained_prompts[1], constrained_prompts[2],
               free_prompts[1], constrained_prompts[3]]
    params = [constrained[0], free[0], constrained[1], constrained[2], free[1], constrained[3]]
    outs = llm.generate(prompts, params)

    for out in (outs[0], outs[2]):
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert outs[3].finish_reason == "stop" and re.fullmatch(REGEX, outs[3].text), outs[3].text
    assert outs[5].finish_reason == "stop" and outs[5].text in CHOICES, outs[5].text

    alone = llm.generate(free_prompts, free)
    assert [o.token_ids for o in alone] == [outs[1].token_ids, outs[4].token_ids]


def test_max_tokens_cutting_a_value_gives_length(llm):
    out = llm.generate([_chat(llm, "Describe a person as JSON.")],
                       SamplingParams(temperature=1.0, max_tokens=4, json_schema=SCHEMA))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(ValueError):
        json.loads(out.text)
    assert out.text.startswith('{"name": "')


def test_stop_string_inside_an_unfinished_value_does_not_end_it(llm):
    out = llm.generate([_chat(llm, "Pick a colour.")],
                       SamplingParams(temperature=0, max_tokens=10, choice=["green tea", "red wine"], stop=["e"]))[0]
    assert out.finish_reason == "stop" and out.text in ("green tea", "red wine")


def test_invalid_constraints_are_clear_errors(llm):
    with pytest.raises(StructuredOutputError, match="json_schema"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(StructuredOutputError, match="at most one"):
        SamplingParams(regex="a+", choice=["a"])
    assert not llm.engine.has_work()
