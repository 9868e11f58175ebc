"""EngineConfig.kv_cache_dtype: a float16 KV cache on the CPU holds each key and value rounded to half, and
nothing else changes: the model then runs exactly as over a float32 cache holding the same rounded values
(widening a half is exact), through chunked prefill, decode past the window, speculative verifies and
the prefix cache."""

from __future__ import annotations

import pytest
import torch

from mistral7b import SamplingParams
from mistral7b.cache import LayerCache
from mistral7b.engine import EngineConfig, SpeculativeConfig
from mistral7b.engine.runner import cache_dtype_of

from test_speculative import generate, random_prompts, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def halves_written(monkeypatch):
    """Every cache write rounds its keys and values to half first: a float32 cache then holds what a float16
    one does."""
    write = LayerCache._write

    def rounded(self, rows, k_new, v_new, q_pos, memo):
        return write(self, rows, k_new.half().float(), v_new.half().float(), q_pos, memo)

    monkeypatch.setattr(LayerCache, "_write", rounded)


@pytest.mark.parametrize("spec", [None, SpeculativeConfig("ngram", 3)], ids=["plain", "ngram"])
def test_a_float16_cache_runs_as_a_float32_cache_of_the_same_halves(halves_written, spec):
    """Prompts cut into chunks of 4 (later chunks read the cache), outputs 3x past the window of 16, three
    rows: token for token and log-probability for log-probability the same as a float32 cache holding the
    rounded values, and the cache really is float16."""
    model = tiny()
    prompts = random_prompts((5, 13, 21), seed=4)
    params = SamplingParams(max_tokens=48, ignore_eos=True, logprobs=2)
    runs = {}
    for kv in ("auto", "float16"):
        out, engine = generate(model, prompts, params, spec, chunk_size=4, kv_cache_dtype=kv)
        assert engine.runner.cache.layers[0].k.dtype == (torch.float16 if kv == "float16" else torch.float32)
        runs[kv] = [(r.output_ids, [(lp.logprob, lp.top) for lp in r.logprobs]) for r in out]
    assert runs["float16"] == runs["auto"]


def test_without_the_rounding_the_float16_cache_changes_the_logits():
    """The premise: the same engine over an unrounded float32 cache gives other log-probabilities."""
    model = tiny()
    prompts = random_prompts((9,), seed=5)
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=1)
    runs = [generate(model, prompts, params, kv_cache_dtype=kv)[0][0] for kv in ("auto", "float16")]
    assert [lp.logprob for lp in runs[0].logprobs] != [lp.logprob for lp in runs[1].logprobs]


def test_the_prefix_cache_keeps_float16_blocks(halves_written):
    """Requests sharing a prompt prefix restore it from float16 blocks (half the bytes a block) and answer
    as without a prefix cache."""
    model = tiny()
    shared = random_prompts((40,), seed=6)[0]
    prompts = [shared + tail for tail in random_prompts((3, 7), seed=7)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    cold, _ = generate(model, prompts[:1] + prompts, params, max_batch=1, kv_cache_dtype="float16")
    warm, engine = generate(model, prompts[:1] + prompts, params, max_batch=1, kv_cache_dtype="float16",
                            prefix_cache_gib=0.01, prefix_block_size=8)
    assert [r.output_ids for r in warm] == [r.output_ids for r in cold]
    assert engine.prefix.block_bytes == 2 * model.config.n_layers * model.config.n_kv_heads * 8 * \
        model.config.head_dim * 2  # K and V, each half: 2 bytes a value
    assert engine.prefix.counters.hits > 0


def test_bad_kv_cache_dtypes_are_refused_naming_the_problem():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float16, got 'bfloat16'"):
        EngineConfig(kv_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="kv_cache_dtype float16 is for a CPU; on cuda"):
        cache_dtype_of("float16", torch.bfloat16, torch.device("cuda"))
    assert cache_dtype_of("auto", torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert cache_dtype_of("float16", torch.float32, torch.device("cpu")) == torch.float16
