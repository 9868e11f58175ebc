"""Prefix cache: restoring a cached prefix and prefilling the rest equals prefilling from scratch (logits
and greedy tokens), for rolling, linear and mixed layers; LRU eviction under the byte budget; pins;
concurrent hits; counters. The reference is the model's own full forward without any cache."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoints import rel_err
from mistral7b import KVCache, ModelConfig, Transformer
from mistral7b.engine.prefix_cache import PrefixCache, block_keys

pytestmark = pytest.mark.usefixtures("one_thread")

W = 16
B = 4  # block size: W / B = 4 blocks per window, like 4096 / 1024 at scale
VOCAB = 97
MAX_SEQ = 128  # linear layers' buffer
WINDOWS = {"rolling": W, "mixed": (W, None, 8)}


def _model(window) -> Transformer:
    n_layers = len(window) if isinstance(window, tuple) else 2
    cfg = ModelConfig(dim=64, n_layers=n_layers, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                      vocab_size=VOCAB, sliding_window=window, max_seq_len=MAX_SEQ)
    g = torch.Generator().manual_seed(random.randrange(2**31))
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharp attention, so a wrong or missing key shows in the logits
        for name, p in model.named_parameters():
            scale = 1.0 if "tok_emb" in name else 1.5 / p.shape[-1] ** 0.5
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if p.ndim == 1 else torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module", params=list(WINDOWS), ids=list(WINDOWS))
def model(request):
    return _model(WINDOWS[request.param])


def _prompt(n):
    return [random.randrange(VOCAB) for _ in range(n)]


def _branches(shared, *lengths):
    """`shared` + a fresh suffix of each length. The suffixes start with different tokens, so the
    prompts share exactly `shared` (random suffixes could share their first tokens by chance)."""
    firsts = random.sample(range(VOCAB), len(lengths))
    return [shared + ([first] + _prompt(n - 1) if n else []) for first, n in zip(firsts, lengths)]


@torch.no_grad()
def _prefill(model, cache, row, ids, start=0, chunk=5, prefix=None):
    """Feed ids[start:] into `row` in chunks (clamped to what the prefix cache allows), storing after
    each; return the logits [len - start, vocab]."""
    out, s = [], start
    while s < len(ids):
        e = min(s + chunk, len(ids), s + (prefix.max_chunk(s) if prefix else chunk))
        tokens, positions = torch.tensor([ids[s:e]]), torch.arange(s, e)[None]
        out.append(model(tokens, positions, cache, rows=slice(row, row + 1), kv_len=e)[0])
        if prefix is not None:
            prefix.store(row, ids, s, e)
        s = e
    return torch.cat(out)


@torch.no_grad()
def _greedy(model, cache, rows, ids_per_row, last_logits, n):
    """Decode n greedy tokens for several rows at once (one forward per step); tokens and logits per row."""
    nxt = last_logits.argmax(-1)
    lengths = [len(ids) for ids in ids_per_row]
    tokens, logits = [[] for _ in rows], [[] for _ in rows]
    for step in range(n):
        for i, t in enumerate(nxt.tolist()):
            tokens[i].append(t)
        positions = torch.tensor([[length + step] for length in lengths])
        index = torch.tensor(rows)
        out = model(nxt[:, None], positions, cache, rows=index, kv_len=max(lengths) + step + 1)[:, -1]
        for i in range(len(rows)):
            logits[i].append(out[i])
        nxt = out.argmax(-1)
    return tokens, [torch.stack(lg) for lg in logits]


@torch.no_grad()
def _check_exact(model, prefix, cache, row, ids, n_new=6, chunk=5):
    """Restore the longest cached prefix of `ids` into `row`, prefill the rest, decode greedily; compare
    with a full forward (no cache) and a from-scratch prefill + decode in a fresh cache. Returns L."""
    L = prefix.load(row, ids)
    got = _prefill(model, cache, row, ids, start=L, chunk=chunk, prefix=prefix)
    full = model(torch.tensor([ids]))[0]
    assert rel_err(got, full[L:]) < 1e-5
    fresh = KVCache(model.config, 1, max_seq_len=MAX_SEQ)
    ref_last = _prefill(model, fresh, 0, ids, chunk=chunk)[-1:]
    tokens, logits = _greedy(model, cache, [row], [ids], got[-1:], n_new)
    ref_tokens, ref_logits = _greedy(model, fresh, [0], [ids], ref_last, n_new)
    assert tokens == ref_tokens
    assert rel_err(logits[0], ref_logits[0]) < 1e-5
    assert rel_err(model(torch.tensor([ids + tokens[0][:-1]]))[0, len(ids) - 1:], torch.cat([got[-1:], logits[0][:-1]])) < 1e-5
    return L


def _invariants(prefix: PrefixCache):
    """Stored blocks are closed under parents, children counts agree, and bytes never exceed the budget."""
    children = {}
    for block in prefix.blocks.values():
        if block.parent is not None:
            assert prefix.blocks.get(block.parent.key) is block.parent
            children[block.parent.key] = children.get(block.parent.key, 0) + 1
    assert all(b.children == children.get(b.key, 0) for b in prefix.blocks.values())
    assert prefix.used_bytes <= prefix.budget_bytes
    assert len({b.slot for b in prefix.blocks.values()}) == len(prefix.blocks)


# -- exactness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_len,expect", [(10, 8), (25, 24), (3, 0), (2 * W + 7, 2 * W + 4)],
                         ids=["mid-window", "1.5W", "shorter-than-block", "longer-than-2W"])
def test_shared_prefix_is_exact(model, prefix_len, expect):
    shared = _prompt(prefix_len)
    a, b = _branches(shared, 9, 7)
    cache = KVCache(model.config, max_batch=3, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=10**7, block_size=B)
    assert _check_exact(model, prefix, cache, 2, a) == 0  # cold: nothing cached
    cache.reset()
    assert _check_exact(model, prefix, cache, 1, b) == expect  # rows other than the one that stored
    _invariants(prefix)


def test_prompt_equal_to_a_cached_one(model):
    """A repeated prompt restores len - 1 rounded down to a block; at least one token is recomputed."""
    cache = KVCache(model.config, max_batch=2, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=10**7, block_size=B)
    for n in (3 * B, 3 * B + 1, 3 * B + 2):
        ids = _prompt(n)
        _check_exact(model, prefix, cache, 0, ids)
        assert _check_exact(model, prefix, cache, 1, ids) == (n - 1) // B * B


@pytest.mark.parametrize("chunk", [1, 3, 7, W])
def test_chunk_sizes_when_storing_and_after_restore(model, chunk):
    shared = _prompt(3 * W + 2)
    cache = KVCache(model.config, max_batch=2, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=10**7, block_size=B)
    first, second = _branches(shared, 3, 5)
    _check_exact(model, prefix, cache, 0, first, chunk=chunk)
    assert _check_exact(model, prefix, cache, 1, second, chunk=chunk) == 3 * W


def test_concurrent_hits_on_one_prefix(model):
    """Two rows restored from the same blocks, prefilled and decoded side by side, both exact."""
    shared = _prompt(W + W // 2 + 3)
    cache = KVCache(model.config, max_batch=3, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=10**7, block_size=B)
    stored, *prompts = _branches(shared, 2, 4, 4)
    _prefill(model, cache, 0, stored, prefix=prefix)
    hits = [prefix.match(p) for p in prompts]  # both pinned at once
    assert all(b.pins == 2 for b in hits[0].blocks) and hits[0].blocks == hits[1].blocks
    L = [prefix.restore(row, hit) for row, hit in zip((1, 2), hits)]
    assert L == [len(shared) // B * B] * 2 and all(b.pins == 0 for b in hits[0].blocks)
    tail = torch.tensor([p[L[0]:] for p in prompts])
    positions = torch.arange(L[0], len(prompts[0])).expand(2, -1)
    with torch.no_grad():
        got = model(tail, positions, cache, rows=slice(1, 3), kv_len=len(prompts[0]))
    tokens, logits = _greedy(model, cache, [1, 2], prompts, got[:, -1], 5)
    for i, p in enumerate(prompts):
        full = model(torch.tensor([p + tokens[i][:-1]]))[0]
        assert rel_err(got[i], full[L[0]:len(p)]) < 1e-5
        assert rel_err(logits[i][:-1], full[len(p):]) < 1e-5


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_prompt_pairs_against_no_cache(data):
    window = data.draw(st.sampled_from([W, (W, None, 8), (8, 8, W), (10, 6)]))  # 10, 6: blocks straddle the window
    smallest = min(w for w in (window if isinstance(window, tuple) else (window,)) if w is not None)
    block = data.draw(st.sampled_from([b for b in (2, 3, 4, 8) if b <= smallest]))
    model = _MODELS.setdefault(window, _model(window))
    shared = _prompt(data.draw(st.integers(0, 3 * W)))
    a, b = _branches(shared, data.draw(st.integers(1, 10)), data.draw(st.integers(0, 10)))
    b = b or _prompt(1)
    cache = KVCache(model.config, max_batch=2, max_seq_len=MAX_SEQ)
    block_bytes = PrefixCache(cache, 0, block).block_bytes
    prefix = PrefixCache(cache, budget_bytes=data.draw(st.integers(0, 40)) * block_bytes, block_size=block)
    chunk_a, chunk_b = data.draw(st.integers(1, W)), data.draw(st.integers(1, W))
    _check_exact(model, prefix, cache, 0, a, n_new=3, chunk=chunk_a)
    L = _check_exact(model, prefix, cache, 1, b, n_new=3, chunk=chunk_b)
    assert L % block == 0 and L <= max(0, min(len(a), len(b) - 1))
    _invariants(prefix)


_MODELS: dict = {}


# -- eviction, pins, counters -----------------------------------------------------------------------


def test_lru_eviction_under_the_budget():
    model = _model(W)
    cache = KVCache(model.config, max_batch=1, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=0, block_size=B)
    budget = 6 * prefix.block_bytes + prefix.block_bytes // 2  # room for 6 blocks, not 7
    prefix = PrefixCache(cache, budget_bytes=budget, block_size=B)
    assert prefix.capacity == 6
    shared = _prompt(2 * B)
    (x, y), z = _branches(shared, 2 * B + 1, 2 * B + 1), _prompt(2 * B + 1)
    for ids in (x, y):
        cache.reset()
        _prefill(model, cache, 0, ids, prefix=prefix)
        _invariants(prefix)
    assert len(prefix.blocks) == 6 and prefix.counters.evictions == 0  # shared 2 + x's 2 + y's 2
    hit = prefix.match(x)  # x is now more recent than y
    assert hit.n_tokens == 4 * B
    prefix.release(hit)
    cache.reset()
    _prefill(model, cache, 0, z, prefix=prefix)  # 2 new blocks: evicts y's two leaves, never the shared root
    _invariants(prefix)
    assert prefix.counters.evictions == 2
    for ids, expect in ((x, 4 * B), (y, 2 * B), (z, 2 * B)):
        hit = prefix.match(ids)
        assert hit.n_tokens == expect
        prefix.release(hit)
    hit = prefix.match(z)
    prefix.release(hit)
    z_slots = [b.slot for b in hit.blocks]
    assert z_slots[1] != z_slots[0] + 1  # z took y's slots in eviction order: restored by a gather
    cache.reset()
    assert _check_exact(model, prefix, cache, 0, z + _prompt(3)) == 2 * B
    cache.reset()
    assert _check_exact(model, prefix, cache, 0, y) == 2 * B  # y's evicted tail recomputed, exact
    _invariants(prefix)


def test_pinned_blocks_are_not_evicted_and_zero_budget_stores_nothing():
    model = _model(W)
    cache = KVCache(model.config, max_batch=2, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=3 * PrefixCache(cache, 0, B).block_bytes, block_size=B)
    x, y = _prompt(3 * B + 1), _prompt(3 * B + 1)
    _prefill(model, cache, 0, x, prefix=prefix)
    hit = prefix.match(x)  # pins all 3 blocks
    cache.reset()
    _prefill(model, cache, 0, y, prefix=prefix)
    assert prefix.counters.skipped_blocks > 0 and prefix.counters.evictions == 0
    assert prefix.match(y).n_tokens == 0
    assert prefix.restore(1, hit) == 3 * B
    with pytest.raises(ValueError, match="already restored"):
        prefix.restore(1, hit)
    cache.reset()
    _prefill(model, cache, 0, y, prefix=prefix)  # unpinned now: x's blocks give way
    assert prefix.match(y).n_tokens == 3 * B and prefix.counters.evictions == 3
    empty = PrefixCache(cache, budget_bytes=0, block_size=B)
    assert empty.store(0, y, 0, len(y)) == 0 and empty.load(0, y) == 0 and empty.used_bytes == 0


def test_counters_and_metrics():
    model = _model(W)
    cache = KVCache(model.config, max_batch=1, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=10**7, block_size=B)
    x = _prompt(5 * B + 2)
    assert prefix.load(0, x) == 0
    _prefill(model, cache, 0, x, prefix=prefix)
    assert prefix.load(0, x[: 3 * B + 3]) == 3 * B
    m = prefix.metrics()
    assert m["mistral7b:prefix_cache_queries"] == len(x) + 3 * B + 3
    assert m["mistral7b:prefix_cache_hits"] == 3 * B
    assert m["mistral7b:prefix_cache_stored_tokens"] == 5 * B
    assert m["mistral7b:prefix_cache_usage_bytes"] == 5 * prefix.block_bytes
    assert m["mistral7b:prefix_cache_evictions"] == 0
    assert prefix.counters.requests == 2 and prefix.counters.hit_requests == 1
    order = list(prefix.blocks)
    assert prefix.peek(x) == 5 * B and prefix.peek(x[: 2 * B]) == B and prefix.peek(_prompt(3 * B)) == 0
    assert prefix.metrics() == m and list(prefix.blocks) == order  # peek changes nothing
    assert all(b.pins == 0 for b in prefix.blocks.values())
    other = x[: 2 * B] + _prompt(3 * B)  # shares blocks 0 and 1 with x
    assert prefix.waits_for(x, [(other, 0)]) and prefix.waits_for(x, [(other, 2 * B - 1)])
    assert not prefix.waits_for(x, [(other, 2 * B)])  # computing block 2, which x does not share
    assert not prefix.waits_for(x[: 2 * B], [(other, B)])  # restoring 2 blocks would leave x nothing to compute
    assert not prefix.waits_for(x, [])
    assert prefix.peek(x, adapter="a#1") == 0  # an adapter's keys: none of the base model's blocks
    assert prefix.waits_for(x, [(other, 0, "a#1")], adapter="a#1") and not prefix.waits_for(x, [(other, 0, "a#1")])
    # a block is 2 (K, V) x layers x kv heads x B x head_dim x 4 bytes
    assert prefix.block_bytes == 2 * 2 * 2 * B * 16 * 4


def test_keys_chain_the_whole_prefix():
    ids = _prompt(3 * B)
    keys = block_keys(ids, B, 3)
    changed = [ids[0] ^ 1] + ids[1:]
    assert all(a != b for a, b in zip(keys, block_keys(changed, B, 3)))  # a change in block 0 changes every key
    assert block_keys(ids[:B] + changed[B:], B, 3)[0] == keys[0]
    by_adapter = [block_keys(ids, B, 3, adapter) for adapter in ("a#1", "a#2", "b#1")]
    assert len({k for keys_ in by_adapter + [keys] for k in keys_}) == 12  # no key shared across adapters


def test_bad_arguments_are_refused():
    model = _model((W, None, 8))
    cache = KVCache(model.config, max_batch=1, max_seq_len=MAX_SEQ)
    with pytest.raises(ValueError, match="exceeds the smallest cache layer"):
        PrefixCache(cache, 10**6, block_size=16)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="block size"):
            PrefixCache(cache, 10**6, block_size=bad)
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(cache, -5, block_size=B)
    prefix = PrefixCache(cache, 10**6, block_size=B)
    ids = _prompt(3 * W)
    with pytest.raises(ValueError, match="not inside a prompt"):
        prefix.store(0, ids, 5, 3 * W + 1)
    assert prefix.max_chunk(0) == 8 and prefix.max_chunk(6) == 6
    with torch.no_grad():  # a 10-token chunk from 6: block [4, 8) lost its first slots in the 8-slot layer
        model(torch.tensor([ids[:6]]), torch.arange(6)[None], cache, rows=slice(0, 1), kv_len=6)
        prefix.store(0, ids, 0, 6)
        model(torch.tensor([ids[6:16]]), torch.arange(6, 16)[None], cache, rows=slice(0, 1), kv_len=16)
    with pytest.raises(ValueError, match="too long for the prefix cache: at most 6 tokens from position 6"):
        prefix.store(0, ids, 6, 16)


@torch.no_grad()
def _burst(model, cache, prompts, budget, prefix=None):
    """The integration guide's recipe, as a miniature of the engine's prefill loop: every request has a
    row from the start; each step pushes up to `budget` prompt tokens, oldest first, rows at the same
    offset in one forward; a request that has not started is looked up just before each group is
    formed. Returns each prompt's last-token logits and the number of forwards."""
    offset, looked_up, last, forwards = [0] * len(prompts), [False] * len(prompts), {}, 0
    while len(last) < len(prompts):
        left = budget
        pending = [i for i in range(len(prompts)) if offset[i] < len(prompts[i])]
        while pending and left > 0:
            if prefix is not None:
                busy = [(prompts[i], offset[i]) for i in range(len(prompts)) if 0 < offset[i] < len(prompts[i])]
                held = {i for i in pending if not looked_up[i] and prefix.waits_for(prompts[i], busy)}
                pending = [i for i in pending if i not in held]
                for i in pending:
                    if not looked_up[i] and prefix.peek(prompts[i]) > 0:
                        offset[i], looked_up[i] = prefix.load(i, prompts[i]), True
            if not pending:
                break
            start = offset[pending[0]]
            n = min(left, len(prompts[pending[0]]) - start, prefix.max_chunk(start) if prefix else left)
            group = []
            for i in pending:
                if offset[i] != start or len(prompts[i]) - start < n or len(group) == max(1, left // n):
                    continue
                if prefix is not None and not looked_up[i]:  # a miss: not alongside a request sharing its block
                    if prefix.waits_for(prompts[i], [(prompts[j], start) for j in group]):
                        continue
                    assert prefix.load(i, prompts[i]) == 0
                    looked_up[i] = True
                group.append(i)
            tokens = torch.tensor([prompts[i][start:start + n] for i in group])
            logits = model(tokens, torch.arange(start, start + n).expand(len(group), -1), cache,
                           rows=torch.tensor(group), kv_len=start + n, last_only=True)
            forwards += 1
            for j, i in enumerate(group):
                if prefix is not None:
                    prefix.store(i, prompts[i], start, start + n)
                offset[i] += n
                if offset[i] == len(prompts[i]):
                    last[i] = logits[j, -1]
            left -= n * len(group)
            pending = [i for i in pending if i not in group and offset[i] < len(prompts[i])]
    return torch.stack([last[i] for i in range(len(prompts))]), forwards


def test_burst_of_requests_sharing_a_prefix_hits_with_lazy_lookup(model):
    """Six requests admitted at once, sharing 1.5 W of prefix: the first computes it while the others
    wait, the other five then restore all of it, and all six get the same logits and greedy tokens as
    without the cache."""
    shared = _prompt(W + W // 2 + 1)
    prompts = _branches(shared, *[5] * 6)
    budget = 20
    cache = KVCache(model.config, max_batch=6, max_seq_len=MAX_SEQ)
    prefix = PrefixCache(cache, budget_bytes=10**7, block_size=B)
    got, n_cached = _burst(model, cache, prompts, budget, prefix)
    assert prefix.counters.hit_requests == 5 and prefix.counters.hits == 5 * (len(shared) // B * B)
    ref_cache = KVCache(model.config, max_batch=6, max_seq_len=MAX_SEQ)
    ref, n_plain = _burst(model, ref_cache, prompts, budget)
    assert n_cached < n_plain
    assert rel_err(got, ref) < 1e-5
    rows = list(range(6))
    tokens, _ = _greedy(model, cache, rows, prompts, got, 5)
    ref_tokens, _ = _greedy(model, ref_cache, rows, prompts, ref, 5)
    assert tokens == ref_tokens
