"""Batch invariance on the CPU (issue 26): a request's tokens and log-probabilities are bit-identical
whatever runs beside it, on the default model's quantized path. Reference: the same request alone on a
fresh engine. Covers prompts shorter and longer than their neighbours, a request joining a running
batch, seeded sampling, and prefix-cache hits."""

from __future__ import annotations

import random

import pytest
import torch

from mistral7b import LLM, SamplingParams
from mistral7b.engine.scheduler import Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("river stone bread window music garden yellow quickly seven mountain letter silver ocean "
         "paper winter candle forest engine little orange").split()


def chat(llm: LLM, rng: random.Random, n_words: int, prefix: str = "") -> list[int]:
    text = prefix + " ".join(rng.choice(WORDS) for _ in range(n_words))
    return llm.chat_prompt([{"role": "user", "content": text}])


def same(a, b) -> bool:
    return a.token_ids == b.token_ids and [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_batch=8)


def test_greedy_and_seeded_rows_match_a_lone_run_in_any_batch(llm):
    rng = random.Random()
    target = chat(llm, rng, rng.randint(6, 14))
    for params in (SamplingParams(max_tokens=24, temperature=0, logprobs=1, ignore_eos=True),
                   SamplingParams(max_tokens=24, temperature=0.9, seed=rng.randrange(2**31), logprobs=1,
                                  ignore_eos=True)):
        alone = llm.generate([target], params)[0]
        for _ in range(3):  # neighbours shorter and longer than the target, the target anywhere
            batch = [chat(llm, rng, rng.randint(1, 30)) for _ in range(rng.randint(1, 5))]
            at = rng.randint(0, len(batch))
            batch.insert(at, target)
            other = SamplingParams(max_tokens=rng.randint(4, 30), temperature=0.7, ignore_eos=True)
            outs = llm.generate(batch, [params if i == at else other for i in range(len(batch))])
            assert same(outs[at], alone), (len(target), [len(p) for p in batch])


def test_a_request_joining_a_running_batch_matches_its_lone_run(llm):
    rng = random.Random()
    target = chat(llm, rng, rng.randint(3, 20))
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=1, ignore_eos=True)
    alone = llm.generate([target], params)[0]
    engine = llm.engine
    running = [engine.add(chat(llm, rng, rng.randint(1, 30)), SamplingParams(max_tokens=40, ignore_eos=True))
               for _ in range(4)]
    for _ in range(rng.randint(1, 6)):
        engine.step()
    joined = engine.add(target, params)
    while not joined.finished or not all(r.finished for r in running):
        engine.step()
    assert joined.output_ids == alone.token_ids
    assert [x.logprob for x in joined.logprobs] == [x.logprob for x in alone.logprobs]


def test_prefix_cache_hits_give_the_cold_answer():
    llm = LLM(max_batch=8, prefix_cache_gib=0.05)
    rng = random.Random()
    document = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) + ". "
    target = chat(llm, rng, rng.randint(2, 8), prefix=document)
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1, ignore_eos=True)
    cold = llm.generate([target], params)[0]
    for _ in range(2):
        batch = [chat(llm, rng, rng.randint(2, 12), prefix=document) for _ in range(3)] + [target, target]
        rng.shuffle(batch)
        outs = llm.generate(batch, params)
        for prompt, out in zip(batch, outs):
            if prompt is target:
                assert same(out, cold)
    assert llm.engine.prefix.counters.hits > 0  # the document's blocks were restored, not recomputed


class _Request:
    def __init__(self, n):
        self.prompt_ids, self.n_prefilled = list(range(n)), 0


def test_invariant_chunks_depend_on_the_request_alone():
    """Each request's chunk boundaries under a shared, small budget equal those it gets alone."""
    rng = random.Random()

    def chunks(requests, budget):
        scheduler, seen = Scheduler(8, 48, budget, batch_invariant=True), {id(r): [] for r in requests}
        while any(r.n_prefilled < len(r.prompt_ids) for r in requests):
            for chunk in scheduler.plan_prefill([r for r in requests if r.n_prefilled < len(r.prompt_ids)]):
                for r in chunk.requests:
                    seen[id(r)].append((chunk.start, chunk.length))
                    r.n_prefilled += chunk.length
        return [seen[id(r)] for r in requests]

    lengths = [rng.randint(1, 150) for _ in range(6)]
    together = chunks([_Request(n) for n in lengths], budget=rng.randint(48, 100))
    assert together == [chunks([_Request(n)], budget=48)[0] for n in lengths]
    assert all(sum(length for _, length in c) == n for c, n in zip(together, lengths))


def test_compiled_steps_keep_a_row_invariant(tmp_path):
    """compile=True on the CPU (Inductor, the C matmuls and attention as opaque ops), on a tiny model
    quantized to int4 as the default model runs (the default model's graphs compile for ~60 s each here):
    a greedy row's tokens and log-probabilities alone (width-1 steps) equal those beside others (widths
    2 and 4), past the sliding window."""
    from checkpoints import hf_model

    from mistral7b.engine import Engine
    from mistral7b.loading import load_model

    hf_model("mistral", seed=int(torch.randint(0, 10_000, ())), window=16).save_pretrained(tmp_path)
    model = load_model(tmp_path, quantize="int4")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 21, 4, 30)]
    params = SamplingParams(max_tokens=30, temperature=0, logprobs=1, ignore_eos=True)

    engine = Engine(model, None, max_batch=4, compile=True)

    def run(rows: list[list[int]]):
        requests = [engine.add(p, params) for p in rows]
        while engine.has_work():
            engine.step()
        return requests

    def record(r):
        return r.output_ids, [x.logprob for x in r.logprobs]

    alone = record(run(prompts[:1])[0])
    assert len(alone[0]) == 30 and all(record(r) == alone for r in run([prompts[0]] * 2))
    assert record(run(prompts)[0]) == alone
