"""KV caches: chunked prefill and decode equal one full forward; rolling buffers stay W slots."""

from pathlib import Path

import pytest
import torch

from mistral7b import KVCache, ModelConfig, Transformer
from checkpoints import hf_logits, hf_model, ours_from_hf, rel_err

W = 8
VOCAB = 97


def _model(window, seed=None):
    """Random tiny model: built through HF so the window convention is HF's too."""
    if isinstance(window, tuple):  # per-layer windows: no HF equivalent, ours with random weights
        cfg = ModelConfig(dim=64, n_layers=len(window), head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                          vocab_size=VOCAB, sliding_window=window, max_seq_len=256)
        model = Transformer(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 else
                        torch.randn_like(p) * (1.0 if "tok_emb" in name else 1.5 / p.shape[1] ** 0.5))
        return model, None
    if window is None:
        hf = hf_model("llama", n_kv_heads=2, n_layers=2, vocab=VOCAB, max_pos=256)
    else:
        hf = hf_model("mistral", n_kv_heads=2, n_layers=2, vocab=VOCAB, window=window, max_pos=256)
    return ours_from_hf(hf), hf


def _prefill(model, cache, tokens, chunk, rows=None, start=0, pass_kv_len=True):
    """Feed tokens [B, T] in chunks of `chunk`, return the logits of every token."""
    B, T = tokens.shape
    rows = rows or slice(0, B)
    out = []
    with torch.no_grad():
        for s in range(0, T, chunk):
            piece = tokens[:, s:s + chunk]
            pos = torch.arange(start + s, start + s + piece.shape[1]).expand(B, -1)
            kv_len = start + s + piece.shape[1] if pass_kv_len else None
            out.append(model(piece, pos, cache, rows=rows, kv_len=kv_len))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("window", [W, None, (W, None, 5)], ids=["rolling", "linear", "mixed"])
@pytest.mark.parametrize("chunk,pass_kv_len", [(1, True), (7, True), (W, True), (50, True), (7, False), (50, False)])
def test_chunked_prefill_equals_full_forward(window, chunk, pass_kv_len):
    T = 4 * W + 3  # >= 4W: the rolling buffer wraps several times
    model, hf = _model(window)
    tokens = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        full = model(tokens)
    if hf is not None:  # the full forward is itself right
        assert rel_err(full, hf_logits(hf, tokens)) < 1e-4
    cache = KVCache(model.config, max_batch=2, dtype=torch.float32, max_seq_len=64)
    if window == W:
        assert all(layer.size == W for layer in cache.layers)
    elif window is None:
        assert all(layer.size == 64 for layer in cache.layers)
    got = _prefill(model, cache, tokens, chunk, pass_kv_len=pass_kv_len)
    assert got.shape == full.shape
    assert rel_err(got, full) < 1e-5


def test_rolling_cache_holds_last_w_positions():
    model, _ = _model(W)
    cache = KVCache(model.config, max_batch=1)
    T = 3 * W + 3
    _prefill(model, cache, torch.randint(0, VOCAB, (1, T)), 7)
    for layer in cache.layers:
        held = sorted(layer.pos[0].tolist())
        assert held == list(range(T - W, T))
        assert all(layer.pos[0, p % W].item() == p for p in held)  # slot p mod W


def test_nbytes_windowed_is_flat():
    cfg = ModelConfig(dim=64, n_layers=3, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                      sliding_window=W, max_seq_len=1024)
    for dtype, nbytes in [(torch.bfloat16, 2), (torch.float32, 4)]:
        for max_batch in (1, 3):
            expected = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * W * nbytes * max_batch
            for max_seq_len in (16, 1024, 100_000):  # independent of the sequence length
                assert KVCache(cfg, max_batch, dtype=dtype, max_seq_len=max_seq_len).nbytes() == expected
    # a linear (no-window) cache grows with max_seq_len
    lin = cfg.with_(sliding_window=None)
    assert KVCache(lin, 2, dtype=torch.bfloat16, max_seq_len=100).nbytes() == 2 * 3 * 2 * 16 * 100 * 2 * 2


def test_rolling_cache_bytes_after_w_and_10w_tokens():
    model, _ = _model(W)
    cache_a = KVCache(model.config, max_batch=1)
    cache_b = KVCache(model.config, max_batch=1)
    _prefill(model, cache_a, torch.randint(0, VOCAB, (1, W)), W)
    _prefill(model, cache_b, torch.randint(0, VOCAB, (1, 10 * W)), W)
    expected = 2 * 2 * 2 * 16 * W * 4
    assert cache_a.nbytes() == cache_b.nbytes() == expected
    assert [tuple(layer.k.shape) for layer in cache_b.layers] == [(1, 2, W, 16)] * 2


@pytest.mark.parametrize("window", [W, None], ids=["rolling", "linear"])
def test_batched_decode_rows_at_different_positions(window):
    """Rows prefilled to different lengths (separately, via `rows`), then decoded together one token per
    row at different positions, with some steps advancing a single row; each row's logits equal a full
    forward of its own sequence."""
    model, _ = _model(window)
    B = 3
    lengths = [3, 2 * W + 1, 4 * W + 5]
    n_new = W + 5
    seqs = [torch.randint(0, VOCAB, (1, n + 2 * n_new)) for n in lengths]
    cache = KVCache(model.config, max_batch=B, max_seq_len=128)
    logits = [[] for _ in range(B)]
    for b in range(B):
        # prefill in chunks of 5, one row at a time
        logits[b].append(_prefill(model, cache, seqs[b][:, :lengths[b]], 5, rows=slice(b, b + 1))[0])
    cur = list(lengths)
    with torch.no_grad():
        for step in range(n_new):
            # every row steps together
            tok = torch.stack([seqs[b][0, cur[b]] for b in range(B)])[:, None]
            pos = torch.tensor(cur)[:, None]
            out = model(tok, pos, cache, rows=slice(0, B))
            for b in range(B):
                logits[b].append(out[b])
                cur[b] += 1
            if step % 4 == 1:  # row 1 alone takes an extra step
                out = model(seqs[1][:, cur[1]:cur[1] + 1], torch.tensor([[cur[1]]]), cache, rows=slice(1, 2))
                logits[1].append(out[0])
                cur[1] += 1
            if step % 5 == 2:  # rows 0 and 2 step together, row 1 idles (position -1 rides along)
                tok = torch.stack([seqs[0][0, cur[0]], torch.tensor(0), seqs[2][0, cur[2]]])[:, None]
                pos = torch.tensor([cur[0], -1, cur[2]])[:, None]
                out = model(tok, pos, cache, rows=slice(0, B))
                for b in (0, 2):
                    logits[b].append(out[b])
                    cur[b] += 1
        for b in range(B):
            got = torch.cat(logits[b], dim=0)
            full = model(seqs[b][:, :cur[b]])[0]
            assert got.shape == full.shape
            assert rel_err(got, full) < 1e-5


@pytest.mark.parametrize("window", [W, None], ids=["rolling", "linear"])
def test_reset_makes_row_reusable(window):
    model, _ = _model(window)
    cache = KVCache(model.config, max_batch=2, max_seq_len=128)
    first = [torch.randint(0, VOCAB, (1, 3 * W + 2)) for _ in range(2)]
    for b in range(2):
        _prefill(model, cache, first[b], 7, rows=slice(b, b + 1))
    cache.reset(slice(1, 2))
    assert all(bool((layer.pos[1] == -1).all()) and bool((layer.pos[0] >= 0).any()) for layer in cache.layers)
    new = torch.randint(0, VOCAB, (1, W + 5))
    got = _prefill(model, cache, new, 3, rows=slice(1, 2))
    fresh = _prefill(model, KVCache(model.config, max_batch=1, max_seq_len=128), new, 3)
    assert rel_err(got, fresh) < 1e-6
    assert rel_err(got, model(new)) < 1e-5
    # a decode step in the reused row, and the untouched row 0 still continues its own sequence
    nxt = torch.randint(0, VOCAB, (1, 1))
    with torch.no_grad():
        out = model(torch.cat([nxt, nxt]), torch.tensor([[first[0].shape[1]], [new.shape[1]]]), cache)
        assert rel_err(out[1], model(torch.cat([new, nxt], 1))[0, -1:]) < 1e-5
        assert rel_err(out[0], model(torch.cat([first[0], nxt], 1))[0, -1:]) < 1e-5
    cache.reset()
    assert all(bool((layer.pos == -1).all()) for layer in cache.layers)


@pytest.mark.parametrize("window", [W, None, (W, None, 5)], ids=["rolling", "linear", "mixed"])
def test_read_span_and_fill_row_reproduce_a_prefill(window):
    """Copying a row's held positions out (read_span) and into another row (fill_row) leaves that row
    exactly as the prefill left the first: same positions in the same slots, same K/V, and the next
    chunk's logits equal."""
    from mistral7b.cache import slot_ranges

    assert slot_ranges(8, 5, 8) == [(5, 8)] and slot_ranges(8, 6, 13) == [(6, 8), (0, 5)]
    with pytest.raises(ValueError, match="do not fit"):
        slot_ranges(8, 0, 9)
    model, _ = _model(window)
    cache = KVCache(model.config, max_batch=2, max_seq_len=64)
    T = 3 * W + 3
    tokens = torch.randint(0, VOCAB, (1, T + 4))
    _prefill(model, cache, tokens[:, :T], 7, rows=slice(0, 1))
    cache.layers[0].pos[1] = 3  # stale contents in the target row
    for layer in cache.layers:
        start = max(0, T - layer.size)
        k, v = layer.read_span(0, start, T)
        assert k.shape == (2, T - start, 16)
        layer.fill_row(1, start, k, v)
        assert torch.equal(layer.pos[1], layer.pos[0])
        held = layer.pos[0] >= 0
        assert torch.equal(layer.k[1][:, held], layer.k[0][:, held]) and torch.equal(layer.v[1][:, held], layer.v[0][:, held])
    nxt = _prefill(model, cache, tokens[:, T:], 4, rows=slice(1, 2), start=T)
    assert rel_err(nxt, model(tokens)[:, T:]) < 1e-5


def _rss_mb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
def test_cpu_cache_costs_only_what_is_written():
    """A CPU cache's K/V are an anonymous mapping without huge pages: hundreds of MiB of capacity add
    (almost) nothing to the resident set until slots are written, and read as zeros."""
    config = ModelConfig(dim=64, n_layers=6, head_dim=64, hidden_dim=128, n_heads=8, n_kv_heads=8,
                         vocab_size=10, max_seq_len=8192)
    before = _rss_mb()
    cache = KVCache(config, max_batch=4, device="cpu", dtype=torch.float32)
    capacity = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers) / 2**20
    grown = _rss_mb() - before
    assert capacity >= 384 and grown < capacity / 10, (capacity, grown)
    layer = cache.layers[0]
    layer.k[0, :, :16] = 1.0  # written slots become resident, the rest stays zero
    assert layer.k[0, :, :16].eq(1).all() and layer.k[1:].abs().max() == 0 and layer.v.abs().max() == 0


@pytest.mark.parametrize("window", [W, None], ids=["rolling", "linear"])
def test_verify_written_first_attends_as_old_slots_then_new(window, monkeypatch):
    """A verify of k + 1 tokens into a cache with k spare slots may write before it reads (as compiled
    steps do, `LayerCache.writes_first`): the slots it overwrites hold no key any of its queries sees,
    so attention over the buffer equals attention over (old slots, new tokens), past the window too."""
    from mistral7b.attention import sdpa_attention
    from mistral7b.cache import LayerCache

    k_spare, seed, g = 4, int(torch.randint(0, 2**31, (1,))), torch.Generator()
    config = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                         sliding_window=window, max_seq_len=64)
    outputs = {}
    for first in (False, True):
        monkeypatch.setattr(LayerCache, "writes_first", lambda self, q_pos, first=first: first)
        cache = KVCache(config, max_batch=2, spare_slots=k_spare)
        layer = cache.layers[0]
        g.manual_seed(seed)  # the same fresh inputs for both orders
        start = [int(torch.randint(10, 40, (1,), generator=g)) for _ in range(2)]  # past W = 8 for both rows
        for row, p in enumerate(start):  # rows hold positions 0 .. p-1 (the last `size` of them)
            old = torch.arange(p)[None]
            layer.k[row : row + 1], layer.v[row : row + 1] = 0, 0
            layer.update(torch.randn(1, 2, p, 8, generator=g), torch.randn(1, 2, p, 8, generator=g), old,
                         slice(row, row + 1), p)
        q_pos = torch.stack([torch.arange(p, p + k_spare + 1) for p in start])
        q = torch.randn(2, 4, k_spare + 1, 8, generator=g)
        k, v, k_pos = layer.update(torch.randn(2, 2, k_spare + 1, 8, generator=g),
                                   torch.randn(2, 2, k_spare + 1, 8, generator=g), q_pos, slice(0, 2),
                                   max(start) + k_spare + 1)
        kv_len = max(start) + k_spare + 1  # buffer slots in place, or the old ones and the new tokens after them
        assert k.shape[2] == (min(kv_len, layer.size) if first else min(max(start), layer.size) + k_spare + 1)
        outputs[first] = sdpa_attention(q, k, v, q_pos, k_pos, window)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)


def test_compiled_verify_and_decode_copy_no_cache_buffer():
    """Compiled (inductor, here on the CPU), a decode step and a verify of k + 1 tokens update the cache
    in place: no generated loop runs over a whole K/V buffer. Reading the old slots before writing the
    new tokens made one (a 7B verify of 5 tokens cost 4.6 decode steps on the H200)."""
    import re

    from torch._inductor.utils import run_and_get_code

    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                         sliding_window=29, max_seq_len=256)
    model = Transformer(config).eval()
    cache = KVCache(config, max_batch=3, spare_slots=4)
    buffer = cache.layers[0].k.numel()  # 3 x 2 x 33 x 16: a number no other loop bound here has
    start = int(torch.randint(30, 60, (1,)))  # past the window
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, start)), torch.arange(start)[None], cache, rows=slice(0, 1), kv_len=start)
        step = model.compile_decode(cache)
        for t in (1, 5):
            tokens, positions = torch.randint(0, VOCAB, (1, t)), torch.arange(start, start + t)[None]
            _, code = run_and_get_code(step, tokens, positions, start + t)
            assert code and not re.search(rf"\b{buffer}L?\b", "\n".join(code)), t
            start += t


def test_forget_rows_equals_forget_row_by_row():
    """A verify's rejections cleared for every row at once leave the slots `forget` leaves row by row: a
    windowed layer (wrapping slots) beside an unwindowed one, random held positions, empty spans too."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    config = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=50,
                         sliding_window=(8, None), max_seq_len=64)
    caches = [KVCache(config, max_batch=4, spare_slots=4) for _ in range(2)]
    for layer_a, layer_b in zip(caches[0].layers, caches[1].layers):
        held = torch.randint(-1, 40, layer_a.pos.shape, generator=g)
        layer_a.pos.copy_(held)
        layer_b.pos.copy_(held)
    rows, starts = [0, 1, 3, 2], torch.randint(0, 30, (4,), generator=g).tolist()
    ends = [s + n for s, n in zip(starts, (5, 0, 3, 1))]
    expected = [layer.pos.clone() for layer in caches[0].layers]
    for pos in expected:  # by hand: each slot of a forgotten position, emptied if it holds that span's
        for row, start, end in zip(rows, starts, ends):
            for p in range(start, end):
                if pos[row, p % pos.shape[1]] >= start:
                    pos[row, p % pos.shape[1]] = -1
    for row, start, end in zip(rows, starts, ends):
        caches[0].forget(row, start, end)
    caches[1].forget_rows(rows, starts, ends)
    assert sum(int((layer.pos == -1).sum()) for layer in caches[1].layers) > 0
    for layer_a, layer_b, want in zip(caches[0].layers, caches[1].layers, expected):
        assert torch.equal(layer_a.pos, layer_b.pos)
        assert torch.equal(layer_b.pos, want)
