"""Prefix caching through the engine (`LLM(prefix_cache_gib=...)`) on a tiny random windowed Mistral:
greedy tokens and logprobs with the cache equal those of the same model without it."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from checkpoints import randomize_

from mistral7b import LLM, SamplingParams

W = 16  # sliding window
B = 4  # prefix cache block size
VOCAB = 128

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral-prefix")
    config = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                           sliding_window=W, attn_implementation="eager")
    model = randomize_(MistralForCausalLM(config).float().eval(), torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(path):
    return LLM(str(path), device="cpu", max_batch=4, chunk_size=8)


def _cached(path, gib=0.01, **options):
    return LLM(str(path), device="cpu", max_batch=4, chunk_size=8, prefix_cache_gib=gib, prefix_block_size=B, **options)


def _prompts(prefix_len, suffix_lens):
    prefix = torch.randint(0, VOCAB, (prefix_len,)).tolist()
    return [prefix + torch.randint(0, VOCAB, (n,)).tolist() for n in suffix_lens]


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)


def _assert_same(with_cache, without):
    for a, b in zip(with_cache, without):
        assert a.token_ids == b.token_ids
        got = torch.tensor([t.logprob for t in a.logprobs])
        want = torch.tensor([t.logprob for t in b.logprobs])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix_len", [10, 24, 40], ids=["mid-window", "1.5W", "2.5W"])
def test_shared_prefix_is_exact(path, plain, prefix_len):
    llm = _cached(path)
    prompts = _prompts(prefix_len, [3, 7, 1, 12])
    first = llm.generate(prompts[:1], GREEDY)  # stores the prefix
    stored = llm.engine.prefix.counters.stored_tokens
    assert stored == len(prompts[0]) // B * B  # every complete block of the prompt
    out = first + llm.generate(prompts[1:], GREEDY)
    _assert_same(out, plain.generate(prompts, GREEDY))
    c = llm.engine.prefix.counters
    assert c.hits == sum(min(prefix_len // B * B, (len(p) - 1) // B * B) for p in prompts[1:])
    assert c.queries == sum(len(p) for p in prompts)


def test_concurrent_hits_compute_the_prefix_once(path, plain):
    llm = _cached(path)
    prefix_len = 26
    prompts = _prompts(prefix_len, [5, 9, 2, 6])
    out = llm.generate(prompts, GREEDY)  # one burst: the others wait for the first one's blocks
    _assert_same(out, plain.generate(prompts, GREEDY))
    c = llm.engine.prefix.counters
    shared = prefix_len // B * B
    assert c.hits == 3 * shared
    assert c.hit_requests == 3
    own = sum(len(p) // B * B - shared for p in prompts)  # complete blocks past the shared prefix
    assert c.stored_tokens == shared + own  # the shared blocks were stored once


def test_eviction_under_a_small_budget_stays_exact(path, plain):
    block_bytes = 2 * 2 * 2 * B * 16 * 4  # K and V, 2 layers, 2 kv heads, B positions, head_dim 16, fp32
    budget = 6 * block_bytes
    llm = _cached(path, gib=budget / 2**30)
    prefix = llm.engine.prefix
    assert prefix.block_bytes == block_bytes and prefix.capacity == 6
    groups = [_prompts(20, [3, 5]) for _ in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
    for prompts in groups + groups[:1]:
        for p in prompts:
            llm.engine.add(p, params)
        while llm.engine.has_work():
            llm.engine.step()
            assert prefix.used_bytes <= budget
    assert prefix.counters.evictions > 0
    prompts = [p for g in groups for p in g]
    _assert_same(llm.generate(prompts, params), plain.generate(prompts, params))


def test_off_by_default_and_bad_budget_refused(path):
    from mistral7b.engine import EngineConfig

    assert EngineConfig().prefix_cache_gib == 0
    for bad in (-1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="prefix_cache_gib"):
            EngineConfig(prefix_cache_gib=bad)
    with pytest.raises(ValueError, match="prefix_block_size"):
        EngineConfig(prefix_block_size=0)
