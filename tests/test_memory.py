"""The memory/FLOP calculator against independent computations: real KVCache allocations, attention
pairs counted by brute force over the attention mask, and SPEC.md's table for Mistral 7B v0.1."""

from __future__ import annotations

import pytest
import torch

from mistral7b import KVCache, ModelConfig, preset
from mistral7b import memory
from mistral7b.attention import visible

KiB, MiB, GiB = 2**10, 2**20, 2**30


def small(**changes) -> ModelConfig:
    base = ModelConfig(dim=32, n_layers=3, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=50,
                       sliding_window=5, max_seq_len=64)
    return base.with_(**changes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq_len", [5, 12, 40])  # >= W: shorter caches still allocate W slots
def test_rolling_cache_matches_kvcache(dtype, batch, seq_len):
    config = small()  # every layer windowed: the cache holds W slots however long the sequence
    cache = KVCache(config, max_batch=batch, dtype=dtype, max_seq_len=seq_len)
    element = torch.empty((), dtype=dtype).element_size()
    assert memory.kv_cache_bytes(config, seq_len, batch, element, rolling=True) == cache.nbytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_linear_cache_matches_kvcache(dtype, seq_len):
    config = small(sliding_window=None)
    cache = KVCache(config, max_batch=2, dtype=dtype, max_seq_len=seq_len)
    element = torch.empty((), dtype=dtype).element_size()
    assert memory.kv_cache_bytes(config, seq_len, 2, element) == cache.nbytes()
    assert memory.kv_cache_bytes(config, seq_len, 2, element, rolling=True) == cache.nbytes()  # nothing rolls
    # the linear figure of a windowed config is what a cache without the window allocates
    assert memory.kv_cache_bytes(small(), seq_len, 2, element) == cache.nbytes()


@pytest.mark.parametrize("windows,seq_len", [((5, None, 5), 12), ((16, None, 16), 12), ((3, 9, None), 20)])
def test_per_layer_windows_match_kvcache(windows, seq_len):
    config = small(sliding_window=windows)
    cache = KVCache(config, max_batch=1, dtype=torch.float32, max_seq_len=seq_len)
    assert memory.kv_cache_bytes(config, seq_len, 1, 4, rolling=True) == cache.nbytes()


def test_mha_figure_matches_a_cache_with_all_heads():
    config = small(sliding_window=None)
    mha = KVCache(config.with_(n_kv_heads=config.n_heads), max_batch=1, dtype=torch.bfloat16, max_seq_len=20)
    assert memory.kv_cache_bytes(config, 20, 1, 2, n_kv_heads=config.n_heads) == mha.nbytes()
    per_token = KVCache(config, max_batch=1, dtype=torch.bfloat16, max_seq_len=1).nbytes()
    assert memory.kv_bytes_per_token(config, 2) == per_token == config.kv_bytes_per_token(2)


def brute_pairs(n: int, window: int | None) -> int:
    positions = torch.arange(n)[None]
    return int(visible(positions, positions, window).sum())


@pytest.mark.parametrize("n", [1, 2, 5, 9, 17, 64])
@pytest.mark.parametrize("window", [None, 1, 4, 8, 20, 64, 100])
def test_attended_pairs_brute_force(n, window):
    assert memory.attended_pairs(n, window) == brute_pairs(n, window)


@pytest.mark.parametrize("windows", [5, None, (3, None, 7)])
@pytest.mark.parametrize("n", [4, 13])
def test_attention_flops_brute_force(windows, n):
    config = small(sliding_window=windows)
    per_pair = 2 * config.head_dim * 2 * config.n_heads  # QK^T dot product + PV accumulation, per head
    expected = sum(brute_pairs(n, w) * per_pair for w in config.layer_windows())
    assert memory.attention_flops(config, n, batch=1) == expected
    assert memory.attention_flops(config, n, batch=3) == 3 * expected
    full = sum(brute_pairs(n, None) * per_pair for _ in config.layer_windows())
    assert memory.attention_flops(config, n, windowed=False) == full


@pytest.mark.parametrize("position", [0, 3, 4, 20])
def test_decode_flops_brute_force(position):
    config = small()
    q = torch.tensor([[position]])
    k = torch.arange(position + 1)[None]
    keys = int(visible(q, k, 5).sum())
    assert memory.decode_attention_flops(config, position) == config.n_layers * 4 * config.n_heads * config.head_dim * keys


def test_spec_table_v01():
    """SPEC.md: bf16, batch 1, Mistral 7B v0.1."""
    v01 = preset("mistral-7b-v0.1")
    assert memory.kv_bytes_per_token(v01, 2) == 128 * KiB
    assert memory.kv_bytes_per_token(v01, 2, n_kv_heads=32) == 512 * KiB
    for tokens, gqa, mha in [(4096, 0.5, 2), (8192, 1, 4), (32768, 4, 16), (131072, 16, 64)]:
        assert memory.kv_cache_bytes(v01, tokens) == gqa * GiB
        assert memory.kv_cache_bytes(v01, tokens, n_kv_heads=32) == mha * GiB
        assert memory.kv_cache_bytes(v01, tokens, rolling=True) == 0.5 * GiB
    assert memory.kv_cache_bytes(v01, 32768) // memory.kv_cache_bytes(v01, 32768, rolling=True) == 8  # the paper's 8x
    assert memory.receptive_field(v01) == 32 * 4096
    assert v01.n_params == 7_241_732_096
    assert memory.weight_bytes(v01)["bfloat16"] == 14_483_464_192  # 14.48 GB
    assert round(memory.ffn_params(v01) / 1e9, 1) == 5.6  # the overview's "14B" is wrong
    assert memory.receptive_field(preset("mistral-7b-v0.2")) is None


def test_report_rows_agree_with_the_functions():
    v01 = preset("mistral-7b-v0.1")
    report = memory.report(v01, [4096, 32768], batch=2, dtype_bytes=2)
    row = report["seq_lens"][1]
    assert row["kv_cache_bytes"] == {"mha": 2 * 16 * GiB, "gqa": 2 * 4 * GiB, "gqa_rolling": 2 * 0.5 * GiB}
    assert row["rolling_saving"] == 8
    assert report["receptive_field"] == 131072
    assert report["seq_lens"][0]["attention_flops"]["full"] == report["seq_lens"][0]["attention_flops"]["window"]


def test_format_bytes_binary_units():
    assert memory.format_bytes(128 * KiB) == "128 KiB"
    assert memory.format_bytes(GiB // 2) == "512 MiB"
    assert memory.format_bytes(4 * GiB) == "4 GiB"
    assert memory.format_bytes(1536 * MiB) == "1.5 GiB"
    assert memory.format_bytes(100) == "100 B"
