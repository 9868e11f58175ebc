"""Speculation with structured outputs, on the real default model in dense float32 (the int4 kernels
round a several-token verify differently from a one-token step, so a near-tie could part).

Constrained rows speculate: their drafts are cut where the grammar forbids, every verified position is
masked by the grammar after the draft tokens before it, and a rejection leaves the matcher exactly where
plain decoding leaves it. Outputs are compared token for token with plain decoding by the same engine."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from mistral7b import LLM, SamplingParams, SpeculativeConfig, structured
from mistral7b.engine.speculative import Proposal, within_grammar

pytestmark = pytest.mark.usefixtures("one_thread")

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}
NAMES = ["Alice", "Bob", "Carla", "Deepak", "Emeka", "Fatima", "Goran", "Hana", "Ines", "Jun"]
CITIES = ["Paris", "Lagos", "Lima", "Osaka", "Oslo", "Quito", "Rome", "Seoul", "Tunis", "Vienna"]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", quantize="none", max_batch=2, speculative=SpeculativeConfig("ngram", 4))


def plain(llm, prompts, params):
    """The same engine without its speculator."""
    speculator, llm.engine.speculator = llm.engine.speculator, None
    try:
        return llm.generate(prompts, params)
    finally:
        llm.engine.speculator = speculator


def record_prompts(llm, n: int) -> list[list[int]]:
    """Fresh prompts that show a record and ask for it as JSON (prompt lookup finds the record's text)."""
    rng = random.Random()
    prompts = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        text = f'Record: {{"name": "{name}", "age": {age}, "city": "{city}"}}. Write the same record as JSON.'
        prompts.append(llm.chat_prompt([{"role": "user", "content": text}]))
    return prompts


def fed(llm, params, tokens, stops=frozenset()) -> structured.Constraint:
    """A fresh matcher for `params` fed `tokens` (stop tokens are never fed, as in plain decoding)."""
    ll = structured.ll_tokenizer(llm.tokenizer, llm.engine.config.vocab_size)
    constraint = structured.Constraint.from_params(params, ll)
    for t in tokens:
        if t not in stops:
            assert constraint.consume(t)
    return constraint


def next_mask(llm, constraint) -> torch.Tensor:
    """The constraint's bitmask for its next token."""
    rows = structured.allocate_bitmask(1, llm.engine.config.vocab_size)
    constraint.fill(rows, 0)
    return rows[0].clone()


def allowed(mask: torch.Tensor, vocab: int) -> list[int]:
    ids = torch.arange(vocab)
    return ids[(mask[ids // 32] >> (ids % 32)) & 1 == 1].tolist()


def test_json_schema_greedy_equals_plain_under_ngram(llm):
    prompts = record_prompts(llm, 3)
    params = SamplingParams(max_tokens=40, json_schema=PERSON)
    before = llm.engine.speculator.stats.draft_tokens, llm.engine.speculator.stats.accepted_tokens
    outputs = llm.generate(prompts, params)
    stats = llm.engine.speculator.stats
    assert stats.draft_tokens > before[0] and stats.accepted_tokens > before[1]  # the constrained rows speculated
    references = plain(llm, prompts, params)
    for out, ref in zip(outputs, references):
        assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), PERSON)


class Misleading:
    """Proposes plain greedy's next two tokens, then one the grammar allows there that plain greedy did not
    pick: every verify that gets that far accepts two and rejects the third, after the matcher consumed
    all three to fill the masks."""

    def __init__(self, llm, params, plain_tokens: dict):
        self.llm, self.params, self.plain_tokens = llm, params, plain_tokens
        self.misled = 0

    def propose(self, requests, caps, sampler):
        drafts = []
        for r, cap in zip(requests, caps):
            ahead = self.plain_tokens[tuple(r.prompt_ids)][len(r.output_ids):]
            draft = ahead[: min(2, cap)]
            if len(draft) < min(cap, len(ahead)):
                constraint = fed(self.llm, self.params, r.output_ids + draft, r._stop_ids)
                others = [t for t in allowed(next_mask(self.llm, constraint), self.llm.engine.config.vocab_size)
                          if t != ahead[len(draft)] and t not in r._stop_ids]
                if others:
                    draft.append(others[0])
                    self.misled += 1
            drafts.append(draft)
        return Proposal(drafts, [None] * len(requests))

    def rollback(self, request, kept):
        pass


def test_rejected_draft_leaves_the_matcher_where_plain_decoding_would(llm):
    """After every step, the request's matcher gives the same next-token bitmask as a fresh matcher fed
    only the tokens emitted so far, though each step fed it a rejected (grammar-valid) draft token."""
    params = SamplingParams(max_tokens=40, json_schema=PERSON)
    prompts = record_prompts(llm, 1)
    reference = plain(llm, prompts, params)[0]
    speculator = llm.engine.speculator
    proposer, speculator.proposer = speculator.proposer, Misleading(llm, params, {tuple(prompts[0]): reference.token_ids})
    try:
        request = llm.engine.add(prompts[0], params)
        while not request.finished:
            llm.engine.step()
            if not request.finished:
                expected = fed(llm, params, request.output_ids, request._stop_ids)
                assert torch.equal(next_mask(llm, request._constraint), next_mask(llm, expected))
        assert speculator.proposer.misled >= 3
    finally:
        speculator.proposer = proposer
    assert request.output_ids == reference.token_ids


def test_verify_bitmasks_mask_each_position_then_roll_back(llm):
    """Position j's mask is the grammar's after the first j draft tokens; past a forbidden token the row is
    all-ones; the matcher ends where it began."""
    params = SamplingParams(max_tokens=40, json_schema=PERSON)
    text = llm.tokenizer.encode('{"name": "Ann", "age": 3', bos=False)
    request = llm.engine.add(record_prompts(llm, 1)[0], params)
    llm.engine.abort(request)
    prefix, draft = text[:2], text[2:6]  # ends after '",': a ']' is forbidden there
    for t in prefix:
        request._constraint.consume(t)
    before = next_mask(llm, request._constraint)
    forbidden = llm.tokenizer.encode("]", bos=False)[0]
    masks = llm.engine.constraints.verify_bitmasks([request], [draft + [forbidden]], len(draft) + 3)
    for j in range(len(draft) + 1):
        assert torch.equal(masks[j, 0], next_mask(llm, fed(llm, params, prefix + draft[:j])))
    assert (masks[len(draft) + 1:] == -1).all()
    assert torch.equal(next_mask(llm, request._constraint), before)


def test_drafts_are_cut_where_the_grammar_forbids(llm):
    """A greedy or n-gram row drops the first forbidden token; a row with a model's q keeps it (rejected
    for sure, and its resampling from max(0, p - q) keeps the output exact)."""
    params = SamplingParams(max_tokens=40, json_schema=PERSON)
    good = llm.tokenizer.encode('{"name": "Ann"', bos=False)
    bad = llm.tokenizer.encode("]", bos=False)
    requests = [llm.engine.add(record_prompts(llm, 1)[0], params) for _ in range(2)]
    free = llm.engine.add(record_prompts(llm, 1)[0], SamplingParams(max_tokens=4))
    for r in (*requests, free):
        llm.engine.abort(r)
    q = torch.rand(len(good) + 2, 8)
    proposal = Proposal([good + bad + good, good + bad + good, bad + good], [None, q, None])
    within_grammar([*requests, free], proposal)
    assert proposal.tokens == [good, good + bad, bad + good]
    assert proposal.q[1].shape[0] == len(good) + 1


def test_constrained_row_beside_a_free_row(llm):
    """A sampled regex row and a free greedy row speculate in one batch: the regex holds, the free row is
    plain greedy's."""
    chat = lambda text: llm.chat_prompt([{"role": "user", "content": text}])  # noqa: E731
    free = [chat("Repeat exactly: one two three four five six seven.")]
    constrained = SamplingParams(regex=r"[0-9]{3}-[a-z]{2,4}", max_tokens=12, temperature=1.0)
    greedy = SamplingParams(max_tokens=16)
    before = llm.engine.speculator.stats.accepted_tokens
    outputs = llm.generate([free[0], chat("Give a code.")], [greedy, constrained])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", outputs[1].text)
    assert llm.engine.speculator.stats.accepted_tokens > before
    assert outputs[0].token_ids == plain(llm, free, greedy)[0].token_ids


def test_model_drafts_for_constrained_rows():
    """self-int4 drafts (a proposer with its own cache, rolled back after cut drafts): greedy JSON equals
    plain decoding; sampled rows (whose q keeps a forbidden token) still give schema-valid JSON."""
    llm = LLM(device="cpu", quantize="none", max_batch=2, speculative=SpeculativeConfig("self-int4", 4))
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    prompts = [llm.chat_prompt([{"role": "user", "content": text}]) for text in ("Invent a person.", "A pirate, as JSON.")]
    greedy = SamplingParams(max_tokens=30, json_schema=person)
    outputs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain(llm, prompts, greedy)]
    assert llm.engine.speculator.stats.accepted_tokens > 0
    for out in llm.generate(prompts, SamplingParams(max_tokens=30, json_schema=person, temperature=1.0)):
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), person)
