"""Attention masks and kernels against brute-force references (python loops, float64 softmax)."""

import math

import pytest
import torch

from mistral7b.attention import (DECODE_KERNELS, attention, causal_attention, grouped_attention,
                                 reduction_decode_attention, sdpa_attention, visible)


def _visible_bruteforce(q_pos, k_pos, window):
    B, Tq = q_pos.shape
    Tk = k_pos.shape[1]
    out = torch.zeros(B, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for i in range(Tq):
            for j in range(Tk):
                qi, kj = int(q_pos[b, i]), int(k_pos[b, j])
                if kj < 0:  # empty slot
                    continue
                if window is None:
                    out[b, i, j] = kj <= qi
                else:
                    out[b, i, j] = qi - window < kj <= qi
    return out


def _naive_attention(q, k, v, q_pos, k_pos, window):
    """float64 softmax(q k^T / sqrt(d)) v with K/V heads repeated: query head h uses KV head h // group."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = _visible_bruteforce(q_pos, k_pos, window)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_visible_matches_bruteforce(window):
    for _ in range(5):
        B, Tq, Tk = 2, int(torch.randint(1, 12, ())), int(torch.randint(1, 20, ()))
        q_pos = torch.randint(0, 30, (B, Tq))
        k_pos = torch.randint(-1, 30, (B, Tk))
        k_pos[:, 0] = -1  # always at least one empty slot
        got = visible(q_pos, k_pos, window)
        assert got.dtype == torch.bool and got.shape == (B, Tq, Tk)
        assert torch.equal(got, _visible_bruteforce(q_pos, k_pos, window))


def test_visible_window_counts_w_keys_including_self():
    W, T = 5, 20
    pos = torch.arange(T)[None]
    m = visible(pos, pos, W)[0]
    counts = m.sum(-1)
    assert counts.tolist() == [min(i + 1, W) for i in range(T)]
    assert all(bool(m[i, i]) for i in range(T))
    assert not bool(m[10, 10 - W])  # exactly W back is out
    assert bool(m[10, 10 - W + 1])


def _rolling_case(B, H, KV, hd, W, t_q, start):
    """Queries at positions start..start+t_q-1 against a rolling buffer of W slots holding positions
    start-W..start-1 (slot p % W, some of them empty when start < W) plus the queries' own keys."""
    size = W
    buf_pos = torch.full((B, size), -1, dtype=torch.long)
    for p in range(max(0, start - W), start):
        buf_pos[:, p % size] = p
    q_pos = torch.arange(start, start + t_q).expand(B, t_q)
    k_pos = torch.cat([buf_pos, q_pos], dim=1)
    # random slot order on top (order inside the buffer must not matter)
    perm = torch.randperm(k_pos.shape[1])
    k_pos = k_pos[:, perm]
    q = torch.randn(B, H, t_q, hd)
    k = torch.randn(B, KV, k_pos.shape[1], hd)
    v = torch.randn(B, KV, k_pos.shape[1], hd)
    return q, k, v, q_pos, k_pos


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("window", [None, 6])
def test_sdpa_attention_matches_naive(n_kv, window):
    W = 6
    for start, t_q in [(0, 5), (3, 4), (13, 6), (20, 9)]:
        q, k, v, q_pos, k_pos = _rolling_case(2, 4, n_kv, 16, W, t_q, start)
        want = _naive_attention(q, k, v, q_pos, k_pos, window)
        got = sdpa_attention(q, k, v, q_pos, k_pos, window)
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-5
        # the general dispatcher gives the same
        assert _rel(attention(q, k, v, q_pos, k_pos, window), want) < 1e-5


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_decode_attention_matches_naive(n_kv):
    """One query per row, rows at different positions, rolling buffers in slot order p % W."""
    B, H, hd, W = 3, 4, 16, 6
    starts = [2, 11, 30]
    k_pos = torch.full((B, W), -1, dtype=torch.long)
    for b, s in enumerate(starts):
        for p in range(max(0, s - W + 1), s + 1):
            k_pos[b, p % W] = p
    q_pos = torch.tensor(starts)[:, None]
    q = torch.randn(B, H, 1, hd)
    k = torch.randn(B, n_kv, W, hd)
    v = torch.randn(B, n_kv, W, hd)
    want = _naive_attention(q, k, v, q_pos, k_pos, W)
    assert _rel(grouped_attention(q, k, v, q_pos, k_pos, W), want) < 1e-5
    assert _rel(reduction_decode_attention(q, k, v, q_pos, k_pos, W), want) < 1e-5
    assert _rel(attention(q, k, v, q_pos, k_pos, W), want) < 1e-5


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("window", [None, 6])
def test_grouped_attention_of_a_few_tokens_matches_naive(n_kv, window):
    """Several query tokens a row (a GPU verify): each KV group's heads x tokens as one query axis, the
    mask repeated per head, against the naive reference, past the window, rows at different positions."""
    rows = [_rolling_case(1, 4, n_kv, 16, 6, 5, start) for start in (0, 4, int(torch.randint(7, 40, (1,))))]
    q, k, v, q_pos, k_pos = (torch.cat(parts) for parts in zip(*rows))
    want = _naive_attention(q, k, v, q_pos, k_pos, window)
    assert _rel(grouped_attention(q, k, v, q_pos, k_pos, window), want) < 1e-5
    traced = torch.compile(grouped_attention, backend="eager", fullgraph=True)  # as in the compiled verify
    assert _rel(traced(q, k, v, q_pos, k_pos, window), want) < 1e-5


def test_reduction_decode_is_finite_for_idle_rows_and_in_the_query_dtype():
    """An idle row (position -1 sees no key) must not turn into NaN; bf16 in, bf16 out, close to float64."""
    B, H, KV, hd, S = 2, 8, 2, 32, 40
    k_pos = torch.randperm(S).expand(B, S).clone()
    q_pos = torch.tensor([[S - 1], [-1]])
    q, k, v = (torch.randn(B, n, t, hd, dtype=torch.bfloat16) for n, t in ((H, 1), (KV, S), (KV, S)))
    got = reduction_decode_attention(q, k, v, q_pos, k_pos, None)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    want = _naive_attention(q[:1], k[:1], v[:1], q_pos[:1], k_pos[:1], None)
    assert _rel(got[:1], want) < 1e-2


def test_decode_kernel_is_the_models_and_names_the_choices():
    """The kernel is a setting of each model (two models in one process may differ), checked by name."""
    from mistral7b.cli.bench import DECODE_KERNELS as BENCH_CHOICES
    from mistral7b.config import preset
    from mistral7b.model import Transformer

    assert BENCH_CHOICES == DECODE_KERNELS
    config = preset("mistral-7b-v0.1")
    with torch.device("meta"):
        a, b = Transformer(config), Transformer(config)
    a.use_decode_kernel("sdpa")
    assert (a.decode_kernel, b.decode_kernel) == ("sdpa", "flash")
    with pytest.raises(ValueError, match="flash, sdpa, reduction"):
        b.use_decode_kernel("flex")
    assert b.decode_kernel == "flash"


def test_gqa_head_mapping_is_h_div_group():
    """Query head h reads KV head h // group: with KV heads holding distinct constant values and all
    attention mass on one key, the output of head h is the value of head h // group."""
    B, H, KV, T, hd = 1, 8, 2, 4, 8
    q = torch.zeros(B, H, T, hd)
    k = torch.zeros(B, KV, T, hd)
    v = torch.arange(KV, dtype=torch.float32).view(1, KV, 1, 1).expand(B, KV, T, hd).clone()
    pos = torch.arange(T)[None]
    out = sdpa_attention(q, k, v, pos, pos, None)
    for h in range(H):
        assert torch.allclose(out[0, h], torch.full((T, hd), float(h // (H // KV))))


@pytest.mark.parametrize("n_kv", [4, 1])
@pytest.mark.parametrize("window", [None, 1, 5, 17, 64])
def test_self_only_path_equals_masked_path(n_kv, window):
    T = 17
    q = torch.randn(2, 4, T, 16)
    k = torch.randn(2, n_kv, T, 16)
    v = torch.randn(2, n_kv, T, 16)
    pos = torch.arange(T).expand(2, T)
    fast = attention(q, k, v, pos, pos, window, self_only=True)
    masked = sdpa_attention(q, k, v, pos, pos, window)
    want = _naive_attention(q, k, v, pos, pos, window)
    assert _rel(fast, masked) < 1e-5
    assert _rel(fast, want) < 1e-5
    if window is None or window >= T:
        assert _rel(causal_attention(q, k, v), want) < 1e-5


@pytest.mark.parametrize("window", [None, 6])
def test_flex_block_mask_per_row(window):
    """The FlexAttention block mask follows each row's own positions (rows of a batched prefill may sit
    at different offsets, over rolling buffers in any slot order). Eager flex on CPU, vs the naive."""
    from torch.nn.attention.flex_attention import flex_attention

    from mistral7b.attention import _block_mask

    W = 6
    rows = [_rolling_case(1, 4, 2, 16, W, 20, start) for start in (0, 9, 31)]
    q, k, v, q_pos, k_pos = (torch.cat(parts) for parts in zip(*rows))
    got = flex_attention(q, k, v, block_mask=_block_mask(q_pos, k_pos, window), enable_gqa=True)
    assert _rel(got, _naive_attention(q, k, v, q_pos, k_pos, window)) < 1e-5


@pytest.mark.parametrize("spare", [5, 0], ids=["written-first", "old-then-new"])
@pytest.mark.parametrize("kernel", ["c", "sdpa"])
@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_a_few_new_tokens_equal_decode_steps_bit_for_bit(quantize, kernel, spare, monkeypatch):
    """A verify forward of k tokens gives each token's logits exactly as k decode steps do (the quantized
    CPU kernels are row-invariant; attention reads decode's keys in decode's slot order: `attention_cpu`,
    or SDPA token by token where it cannot be built), for two rows of different lengths, one of them past
    the rolling buffer's wrap; its tokens written into the buffer first (a verify with spare slots) or
    after the old slots (a short prefill chunk)."""
    from mistral7b import attention_cpu
    from mistral7b.bench import quantized
    from mistral7b.config import ModelConfig
    from mistral7b.model import Transformer
    from mistral7b.quant import QuantConfig

    config = ModelConfig(dim=256, n_layers=2, head_dim=32, hidden_dim=512, n_heads=8, n_kv_heads=2, vocab_size=97,
                         sliding_window=12, max_seq_len=64)
    if kernel == "sdpa":
        monkeypatch.setattr(attention_cpu, "supports", lambda *tensors: False)
    model = quantized(Transformer(config).eval(), QuantConfig(quantize), torch.device("cpu"))
    dtype, k = model.tok_embeddings.weight.dtype, 5
    lengths = (20, 6)
    tokens = torch.randint(0, 97, (2, max(lengths) + k))

    def prefilled():
        cache = model.new_cache(2, spare_slots=spare, dtype=dtype)
        for row, n in enumerate(lengths):
            model(tokens[row : row + 1, :n], torch.arange(n)[None], cache, rows=slice(row, row + 1), kv_len=n)
        return cache

    with torch.no_grad():
        cache = prefilled()
        steps = []
        for j in range(k):
            positions = torch.tensor([[n + j] for n in lengths])
            fed = torch.stack([tokens[row, n + j] for row, n in enumerate(lengths)])[:, None]
            steps.append(model(fed, positions, cache, kv_len=max(lengths) + j + 1)[:, -1])
        cache = prefilled()
        positions = torch.stack([torch.arange(n, n + k) for n in lengths])
        fed = torch.stack([tokens[row, n : n + k] for row, n in enumerate(lengths)])
        verify = model(fed, positions, cache, kv_len=max(lengths) + k)
    for j in range(k):
        assert torch.equal(verify[:, j], steps[j]), j
