"""Configs: presets against SPEC's table, and parameter and cache arithmetic (the readers: test_loading_configs.py)."""


import pytest
import torch

from mistral7b import PRESETS, KVCache, ModelConfig, Transformer, preset

KiB, GiB = 1024, 1024 ** 3

# SPEC.md "Model configurations"
SPEC_TABLE = {
    "mistral-7b-v0.1": dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                            sliding_window=4096, rope_theta=10000.0, vocab_size=32000, norm_eps=1e-5,
                            tie_embeddings=False),
    "mistral-7b-v0.2": dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                            sliding_window=None, rope_theta=1e6, vocab_size=32000, norm_eps=1e-5,
                            tie_embeddings=False, max_seq_len=32768),
    "mistral-7b-v0.3": dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                            sliding_window=None, rope_theta=1e6, vocab_size=32768, norm_eps=1e-5,
                            tie_embeddings=False, max_seq_len=32768),
}


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_presets_match_spec(name):
    cfg = preset(name)
    assert cfg is PRESETS[name]
    for field, value in SPEC_TABLE[name].items():
        assert getattr(cfg, field) == value, field


def test_unknown_preset():
    with pytest.raises(ValueError, match="mistral-7b-v0.1"):
        preset("mistral-7b-v9")


def test_v01_param_count():
    cfg = preset("mistral-7b-v0.1")
    assert cfg.n_params == 7_241_732_096
    assert cfg.n_params * 2 / 1e9 == pytest.approx(14.48, abs=0.005)  # bf16 GB
    # and the formula counts what the module really holds (built on the meta device: no memory)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params
    # SPEC: the feed-forward layers hold 5.6B in all
    ffn = sum(p.numel() for n, p in model.named_parameters() if "feed_forward" in n)
    assert ffn == 3 * 4096 * 14336 * 32 and round(ffn / 1e9, 1) == 5.6


def test_kv_bytes_per_token():
    cfg = preset("mistral-7b-v0.1")
    assert cfg.kv_bytes_per_token(2) == 128 * KiB
    assert cfg.kv_bytes_per_token(2, n_kv_heads=32) == 512 * KiB
    assert cfg.with_(n_kv_heads=32).kv_bytes_per_token(2) == 512 * KiB
    assert cfg.kv_bytes_per_token(4) == 256 * KiB


@pytest.mark.parametrize("tokens,gqa_gib,mha_gib", [(4096, 0.5, 2), (8192, 1, 4), (32768, 4, 16), (131072, 16, 64)])
def test_memory_table(tokens, gqa_gib, mha_gib):
    """SPEC's memory table, from real (meta-device) caches: linear caches grow, the rolling buffer stays 0.5 GiB."""
    full = preset("mistral-7b-v0.2")
    assert KVCache(full, 1, device="meta", dtype=torch.bfloat16, max_seq_len=tokens).nbytes() == gqa_gib * GiB
    mha = full.with_(n_kv_heads=32)
    assert KVCache(mha, 1, device="meta", dtype=torch.bfloat16, max_seq_len=tokens).nbytes() == mha_gib * GiB
    rolling = preset("mistral-7b-v0.1")
    assert KVCache(rolling, 1, device="meta", dtype=torch.bfloat16, max_seq_len=tokens).nbytes() == GiB // 2


def test_invalid_config_values():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(n_heads=32, n_kv_heads=5)
    with pytest.raises(ValueError):
        ModelConfig(dim=0)
    with pytest.raises(ValueError):
        ModelConfig(sliding_window=0)
    with pytest.raises(ValueError):
        ModelConfig(n_layers=2, sliding_window=(4, None, 4))
    cfg = ModelConfig(n_layers=3, sliding_window=[4, None, 4])
    assert cfg.layer_windows() == [4, None, 4] and not cfg.has_window
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_engine_cache_sized_to_a_request_never_exceeds_the_model():
    from mistral7b.cli.common import positions_for
    from mistral7b.engine import EngineConfig

    need = positions_for("What is the capital of France?", 128)
    assert need % 256 == 0 and need >= len("What is the capital of France?") + 128
    model = ModelConfig(max_seq_len=4096)
    assert EngineConfig(max_seq_len=need).within(model).max_seq_len == need
    assert EngineConfig(max_seq_len=10_000).within(model).max_seq_len is None  # the model's own limit
