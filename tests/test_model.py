"""Model parity with HF transformers (eager attention) on tiny random models: GQA, sliding window, Llama,
batches, tied embeddings. Weights are copied by hand (tests/checkpoints.ours_from_hf), not by the loaders."""

import pytest
import torch

from checkpoints import hf_logits, hf_model, ours_from_hf, rel_err

TOL = 1e-4


def _tokens(vocab, batch, t):
    return torch.randint(0, vocab, (batch, t))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # GQA group sizes 1, 2, 4
def test_mistral_windowed_gqa_matches_hf(n_kv_heads):
    hf = hf_model("mistral", n_heads=4, n_kv_heads=n_kv_heads, window=8, rope_theta=10000.0)
    ours = ours_from_hf(hf)
    assert ours.config.sliding_window == 8 and ours.config.n_kv_heads == n_kv_heads
    tokens = _tokens(hf.config.vocab_size, 2, 40)  # T = 40 > W = 8: the window cuts
    with torch.no_grad():
        got = ours(tokens)
    want = hf_logits(hf, tokens)
    assert got.dtype == torch.float32 and got.shape == want.shape == (2, 40, hf.config.vocab_size)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_llama_no_window_matches_hf(batch):
    hf = hf_model("llama", n_heads=4, n_kv_heads=2, n_layers=3, rope_theta=float(torch.randint(500, 200000, ()).item()))
    ours = ours_from_hf(hf)
    assert ours.config.sliding_window is None
    tokens = _tokens(hf.config.vocab_size, batch, 33)
    with torch.no_grad():
        got = ours(tokens)
    assert rel_err(got, hf_logits(hf, tokens)) < TOL


def test_batch_rows_are_independent():
    """Each row of a batch gives the logits it gives alone (and HF's for the whole batch)."""
    hf = hf_model("mistral", n_kv_heads=2, window=8)
    ours = ours_from_hf(hf)
    tokens = _tokens(hf.config.vocab_size, 4, 30)
    with torch.no_grad():
        batched = ours(tokens)
        for b in range(4):
            assert rel_err(batched[b], ours(tokens[b:b + 1])[0]) < 1e-5
    assert rel_err(batched, hf_logits(hf, tokens)) < TOL


def test_window_really_matters():
    """Same weights, window 8 vs none on T = 40: identical for the first W positions, different after,
    and HF with the matching window agrees with each."""
    W, T = 8, 40
    hf_win = hf_model("mistral", n_kv_heads=2, window=W)
    hf_full = hf_model("mistral", n_kv_heads=2, window=None)
    hf_full.load_state_dict(hf_win.state_dict())
    ours_win, ours_full = ours_from_hf(hf_win), ours_from_hf(hf_full)
    assert ours_full.config.sliding_window is None
    tokens = _tokens(hf_win.config.vocab_size, 2, T)
    with torch.no_grad():
        a, b = ours_win(tokens), ours_full(tokens)
    ref_win, ref_full = hf_logits(hf_win, tokens), hf_logits(hf_full, tokens)
    assert rel_err(a, ref_win) < TOL
    assert rel_err(b, ref_full) < TOL
    # HF itself really applied the window (else this test would not test anything)
    assert rel_err(ref_win[:, W:], ref_full[:, W:]) > 1e-2
    assert rel_err(a[:, :W], b[:, :W]) < 1e-5  # inside the first window nothing is cut
    assert rel_err(a[:, W:], b[:, W:]) > 1e-2  # every later position lost keys
    # per position: from W on, every position differs
    per_pos = (a - b).abs().amax(dim=(0, 2))
    assert bool((per_pos[W:] > 1e-4).all())


@pytest.mark.parametrize("window", [1, 7, 9])
def test_window_off_by_one(window):
    """The convention i - W < j <= i (W keys incl. itself): windows W-1/W+1 around HF's must not also
    match, and ours with HF's window does."""
    hf = hf_model("mistral", n_kv_heads=2, window=window)
    tokens = _tokens(hf.config.vocab_size, 1, 24)
    ref = hf_logits(hf, tokens)
    with torch.no_grad():
        assert rel_err(ours_from_hf(hf)(tokens), ref) < TOL
        assert rel_err(ours_from_hf(hf, sliding_window=window + 1)(tokens), ref) > 1e-3
        if window > 1:
            assert rel_err(ours_from_hf(hf, sliding_window=window - 1)(tokens), ref) > 1e-3


@pytest.mark.parametrize("kind", ["mistral", "llama"])
def test_tied_embeddings(kind):
    hf = hf_model(kind, n_kv_heads=1, tie=True, **({"window": 8} if kind == "mistral" else {}))
    ours = ours_from_hf(hf)
    assert ours.config.tie_embeddings
    assert ours.output.weight.data_ptr() == ours.tok_embeddings.weight.data_ptr()
    # n_params counts the shared matrix once, like the module itself
    assert ours.config.n_params == sum(p.numel() for p in ours.parameters())
    tokens = _tokens(hf.config.vocab_size, 2, 20)
    with torch.no_grad():
        assert rel_err(ours(tokens), hf_logits(hf, tokens)) < TOL


def test_untied_param_count_matches_module():
    hf = hf_model("mistral", n_kv_heads=2)
    ours = ours_from_hf(hf)
    n = sum(p.numel() for p in ours.parameters())
    assert ours.config.n_params == n == sum(p.numel() for p in hf.parameters())


def test_last_only_and_bf16():
    hf = hf_model("mistral", n_kv_heads=2, window=8)
    ours = ours_from_hf(hf)
    tokens = _tokens(hf.config.vocab_size, 2, 20)
    with torch.no_grad():
        full = ours(tokens)
        last = ours(tokens, last_only=True)
        assert last.shape == (2, 1, hf.config.vocab_size)
        assert rel_err(last[:, 0], full[:, -1]) < 1e-6
        low = ours.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.float32  # logits come back in fp32 whatever the weights
    assert rel_err(low, full) < 0.2  # bf16 is close but not exact


def ragged_verify(model, prompts, fed, adapters=None):
    """Each row's prompt prefilled into a cache with spare slots, then one forward of the rows' `fed`
    tokens (1 to t each) packed as a speculative verify packs them: the logits [B, t, vocab]."""
    t = max(map(len, fed))
    cache = model.new_cache(len(prompts), spare_slots=t - 1)
    for i, prompt in enumerate(prompts):
        slots = None if adapters is None else adapters[i : i + 1]
        model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, rows=slice(i, i + 1),
              kv_len=len(prompt), adapters=slots)
    tokens = torch.zeros(len(prompts), t, dtype=torch.long)
    positions = torch.stack([torch.arange(len(prompt), len(prompt) + t) for prompt in prompts])
    for i, f in enumerate(fed):
        tokens[i, : len(f)] = torch.tensor(f)
    packed = torch.cat([i * t + torch.arange(len(f)) for i, f in enumerate(fed)])
    kv_len = max(map(len, prompts)) + t
    return model(tokens, positions, cache, rows=slice(0, len(prompts)), kv_len=kv_len, adapters=adapters,
                 packed=packed)


def test_packed_ragged_batch_equals_hf_on_each_row():
    """A ragged batch packed (`packed`: rows of 5, 1 and 3 tokens after prompts past the window) gives
    each kept token HF's logits for its row's whole sequence; padding's logits are zeros."""
    hf = hf_model("mistral", n_kv_heads=2, window=8)
    ours = ours_from_hf(hf)
    vocab = hf.config.vocab_size
    prompts = [_tokens(vocab, 1, n)[0].tolist() for n in (12, 20, 9)]
    fed = [_tokens(vocab, 1, n)[0].tolist() for n in (5, 1, 3)]
    with torch.no_grad():
        got = ragged_verify(ours, prompts, fed)
    assert got.shape == (3, 5, vocab)
    for i, (prompt, f) in enumerate(zip(prompts, fed)):
        want = hf_logits(hf, torch.tensor([prompt + f]))[0, -len(f):]
        assert rel_err(got[i, : len(f)], want) < TOL
        assert not got[i, len(f):].any()


def test_packed_batch_needs_a_cache_and_every_logit():
    ours = ours_from_hf(hf_model("mistral", n_kv_heads=2, window=8))
    packed = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="a packed .ragged. batch needs a cache and all its logits"):
        ours(torch.zeros(2, 2, dtype=torch.long), packed=packed)
