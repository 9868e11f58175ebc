"""Attention masks and kernels.

Visibility is defined by positions alone: query at position i sees key at position j iff
`i - W < j <= i` (W keys, itself included; the convention of HF, vLLM and flash-attn's
`window_size=(W-1, 0)`). The paper's prose says "between i-W and i", one token more; we follow the
implementations the weights were evaluated with. Empty cache slots carry position -1 and are never visible.

Because the mask comes from positions, one kernel interface serves a plain forward, a prefill chunk
against a rolling buffer in any slot order, and a batch of decode steps at different positions.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_cpu

# Below this many query tokens the dense masked SDPA is as fast as building a block mask.
TOKENWISE_MAX_QUERIES = 17  # a verify of up to 16 draft tokens and the row's own: `tokenwise_attention`
FLEX_MIN_TOKENS = 256


def visible(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Bool mask [B, Tq, Tk]: which keys each query may attend to."""
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (k_pos[:, None, :] >= 0) & (distance >= 0)
    if window is not None:
        mask &= distance < window
    return mask


def shared_mask(memo: dict | None, q_pos: Tensor, k_pos: Tensor, window: int | None,
                slots: int | None = None) -> Tensor:
    """`visible(...)[:, None]`, built once per forward pass for all layers with this window: their
    k_pos is one tensor (`KVCache` shares positions between layers of one slot count, `slots`). The
    key names the slot count, not k_pos's length: compiled, that length is a symbolic kv_len, and
    hashing it would guard on its value and compile the step again for every kv_len bucket."""
    if memo is None:
        return visible(q_pos, k_pos, window)[:, None]
    key = ("visible", window, q_pos.shape[1], k_pos.shape[1] if slots is None else ("slots", slots))
    if key not in memo:
        memo[key] = visible(q_pos, k_pos, window)[:, None]
    return memo[key]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                   mask: Tensor | None = None) -> Tensor:
    """Reference kernel for any shape: dense mask, GQA shared inside SDPA (no repeated K/V)."""
    mask = visible(q_pos, k_pos, window)[:, None] if mask is None else mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Keys are exactly the queries' own tokens from position 0 and no window cuts: flash attention."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(q_pos: Tensor, k_pos: Tensor, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        distance = q_pos[b, q_idx] - k_pos[b, kv_idx]
        ok = (k_pos[b, kv_idx] >= 0) & (distance >= 0)
        if window is not None:
            ok = ok & (distance < window)
        return ok

    batch, t_q = q_pos.shape
    return create_block_mask(mask_mod, batch, None, t_q, k_pos.shape[1], device=q_pos.device)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                      mask: Tensor | None = None) -> Tensor:
    """The query heads of each KV group as one query axis [B, KV, group x T, hd], so that a plain MHA
    kernel reads every cached K/V once for the whole group (no repeated K/V). With a mask, SDPA's fused
    kernels take no GQA and its math fallback copies each K/V head group times. Decode (T = 1); on a
    GPU, a forward of a few tokens too (a speculative verify)."""
    batch, n_heads, t, head_dim = q.shape
    group = n_heads // k.shape[1]
    grouped = q.reshape(batch, k.shape[1], group * t, head_dim)
    mask = visible(q_pos, k_pos, window)[:, None] if mask is None else mask  # [B, 1, T, S], for the group
    if t > 1:
        mask = mask.repeat(1, 1, group, 1)  # row g * T + j: head g of the group, query token j
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
    return out.reshape(batch, n_heads, t, head_dim)


def row_key_counts(memo: dict | None, q_pos: Tensor, slots: int) -> list[int]:
    """Keys each decode row reads alone, min(position + 1, slots) (0: idle), read from the device once
    per forward pass and shared by the layers through `memo`."""
    key = ("row_key_counts", slots)
    if memo is not None and key in memo:
        return memo[key]
    counts = [min(p + 1, slots) if p >= 0 else 0 for p in q_pos[:, 0].tolist()]
    if memo is not None:
        memo[key] = counts
    return counts


def rowwise_decode_attention(q: Tensor, k: Tensor, v: Tensor, counts: list[int], mask: Tensor) -> Tensor:
    """CPU decode through SDPA (where `attention_cpu` cannot run: no compiler, bf16), one row at a time
    over the keys it would read alone (`row_key_counts`): SDPA's arithmetic depends on the key length,
    which in a batch is the longest row's, so a greedy answer changed with the batch it ran in (issue 26)."""
    out = torch.zeros_like(q)
    for row, n in enumerate(counts):
        if n == 0:
            continue  # an idle row: nothing reads its output
        one = slice(row, row + 1)
        out[one] = grouped_attention(q[one], k[one, :, :n], v[one, :, :n], None, None, None, mask[one, ..., :n])
    return out


def decode_order(q_pos: list[list[int]], old: int, size: int) -> list[list[list[int]]]:
    """[row][j]: the indices into (old slots, new tokens) of the keys that the decode step at new token j's
    position reads, in its slot order: slot s holds the latest new token i <= j with position % size == s,
    else its old contents; min(position + 1, size) slots ([] for an idle token)."""
    views = []
    for row in q_pos:
        order, row_views = [], []
        for i, p in enumerate(row):
            if p >= 0:
                order.extend(range(len(order), min(p + 1, size)))  # positions grow: slots only get added
                order[p % size] = old + i
            row_views.append(list(order) if p >= 0 else [])
        views.append(row_views)
    return views


def tokenwise_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                        size: int, memo: dict | None, written_first: bool = False) -> Tensor:
    """CPU through SDPA (where `attention_cpu` cannot run), a few new tokens a row (a speculative verify, a
    short prefill chunk): each token exactly as the decode step at its position computes it, over the same
    keys in the same slot order, so a verified draft's logits equal plain decoding's bit for bit (one SDPA
    over the old slots followed by the new tokens summed in another order once the buffer had wrapped: 20
    of 30 greedy answers of the quantized default model parted from plain decoding). k/v are the old slots
    followed by the new tokens, or `written_first` the buffer itself (`LayerCache.writes_first`), whose
    leading min(position + 1, size) slots decode's step reads: slots it would see holding older positions
    hold later new tokens instead, masked out either way, so the sums are the same."""
    old, memo = k.shape[2] - q.shape[2], {} if memo is None else memo
    key = ("decode_order", size, old, window, written_first)
    if key not in memo:
        positions = q_pos.tolist()
        views = [[list(range(min(p + 1, size))) if p >= 0 else [] for p in row] for row in positions] \
            if written_first else decode_order(positions, old, size)
        memo[key] = [[_slots_view(idx, q_pos[b : b + 1, j : j + 1], k_pos[b : b + 1], window) if idx else None
                      for j, idx in enumerate(row)] for b, row in enumerate(views)]
    out = torch.zeros_like(q)
    for b, row in enumerate(memo[key]):
        for j, view in enumerate(row):
            if view is not None:
                idx, mask = view
                out[b : b + 1, :, j : j + 1] = grouped_attention(q[b : b + 1, :, j : j + 1], k[b : b + 1, :, idx],
                                                                v[b : b + 1, :, idx], None, None, None, mask)
    return out


def _slot_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                    size: int, memo: dict | None, written_first: bool) -> Tensor:
    """A decode step or a few new tokens on a CPU through `attention_cpu`: each token over the keys its decode
    step reads, in that step's slot order (the buffer itself when it was written first, else
    `decode_order`'s view of the old slots and the new tokens)."""
    if q.shape[2] == 1 or written_first:
        return attention_cpu.slot_attention(q, k, v, q_pos, k_pos, window)
    memo = {} if memo is None else memo
    key = ("slot_order", size, k.shape[2] - q.shape[2])
    if key not in memo:
        views = decode_order(q_pos.tolist(), k.shape[2] - q.shape[2], size)
        order = torch.full((q.shape[0], q.shape[2], k.shape[2]), -1, dtype=torch.int32)
        for b, row in enumerate(views):
            for j, idx in enumerate(row):
                order[b, j, : len(idx)] = torch.tensor(idx, dtype=torch.int32)
        memo[key] = order
    return attention_cpu.slot_attention(q, k, v, q_pos, k_pos, window, memo[key])


def _slots_view(idx: list[int], q_pos: Tensor, k_pos: Tensor, window: int | None) -> tuple[slice | Tensor, Tensor]:
    """The keys' index (a slice, no copy, until the buffer wraps) and decode's mask over them."""
    index = slice(0, len(idx)) if idx == list(range(len(idx))) else torch.tensor(idx)
    return index, visible(q_pos, k_pos[:, index], window)[:, None]


def reduction_decode_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                               window: int | None, mask: Tensor | None = None) -> Tensor:
    """Decode attention written as two sums that inductor turns into reductions over the key axis.

    A fused attention kernel for one query token runs one thread block per (row, KV head): 8 blocks at
    batch 1 for all 4,096 keys of a full window, which leaves most of a GPU idle. As reductions, the
    scores parallelise over the keys and `probs @ v` is split along them (flash-decoding's split-K),
    both in float32 like the fused kernels. Meant for compiled CUDA decode: eagerly it materialises
    [B, KV, group, S, hd]."""
    batch, n_heads, _, head_dim = q.shape
    n_kv = k.shape[1]
    grouped = q.reshape(batch, n_kv, n_heads // n_kv, 1, head_dim).float()
    scores = (grouped * k[:, :, None].float()).sum(-1) * head_dim**-0.5  # [B, KV, group, S]
    mask = visible(q_pos, k_pos, window)[:, None] if mask is None else mask  # [B, 1, 1, S]
    # The finite minimum, not -inf: an idle row (position -1, no visible key) gets finite garbage, not NaN.
    probs = scores.masked_fill(~mask, torch.finfo(torch.float32).min).softmax(-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # [B, KV, group, hd]
    return out.to(q.dtype).reshape(batch, n_heads, 1, head_dim)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    window: int | None,
    self_only: bool = False,
    memo: dict | None = None,
    decode_kernel: str = "flash",
    invariant: bool = False,
    cache_slots: int | None = None,
    written_first: bool = False,
) -> Tensor:
    """q [B, H, Tq, hd]; k, v [B, KV, Tk, hd]; q_pos [B, Tq]; k_pos [B, Tk] (-1: empty slot).

    `self_only` says the keys are the queries' own tokens at positions 0..T-1. `memo` is a dict that
    lives for one forward pass, so layers with the same window share one mask or block mask.
    `decode_kernel` picks CUDA decode's kernel (`check_decode_kernel`); `invariant` (CUDA) overrides it
    with `invariant_attention`. `cache_slots`: the cache's size, when k/v come from `LayerCache.update`:
    its old slots followed by the new tokens, or `written_first` its buffer; a few new tokens on a CPU
    then go `tokenwise`.
    """
    if invariant and q.is_cuda:
        return invariant_attention(q, k, v, q_pos, k_pos, window, self_only, memo, cache_slots, written_first)
    t_q, t_k = q.shape[2], k.shape[2]
    causal = self_only and (window is None or window >= t_k)  # the queries' own tokens, no window cut
    if not causal and t_q <= TOKENWISE_MAX_QUERIES and (t_q == 1 or cache_slots is not None) \
            and attention_cpu.supports(q, k, v):
        return _slot_attention(q, k, v, q_pos, k_pos, window, cache_slots, memo, written_first)
    if k.dtype != q.dtype:  # a float16 cache (EngineConfig.kv_cache_dtype) where the CPU kernel does not run
        k, v = k.to(q.dtype), v.to(q.dtype)
    if causal:
        return causal_attention(q, k, v)
    if t_q == 1:
        if q.is_cuda and decode_kernel == "flash":
            from .flash_decode import flash_decode

            return flash_decode(q, k, v, q_pos, k_pos, window)
        mask = shared_mask(memo, q_pos, k_pos, window, cache_slots)
        if decode_kernel == "reduction" and q.is_cuda and torch.compiler.is_compiling():
            return reduction_decode_attention(q, k, v, q_pos, k_pos, window, mask)
        if q.device.type == "cpu" and q.shape[0] > 1 and not torch.compiler.is_compiling():
            return rowwise_decode_attention(q, k, v, row_key_counts(memo, q_pos, k.shape[2]), mask)
        return grouped_attention(q, k, v, q_pos, k_pos, window, mask)
    if cache_slots is not None and q.device.type == "cpu" and t_q <= TOKENWISE_MAX_QUERIES \
            and not torch.compiler.is_compiling():
        return tokenwise_attention(q, k, v, q_pos, k_pos, window, cache_slots, memo, written_first)
    if q.is_cuda and t_q >= FLEX_MIN_TOKENS:
        memo = {} if memo is None else memo
        key = ("block_mask", window, q.shape[0], t_q, t_k)
        if key not in memo:
            memo[key] = _block_mask(q_pos, k_pos, window)
        return _compiled_flex()(q, k, v, block_mask=memo[key], enable_gqa=q.shape[1] != k.shape[1])
    mask = shared_mask(memo, q_pos, k_pos, window, cache_slots)
    if q.is_cuda:
        return grouped_attention(q, k, v, q_pos, k_pos, window, mask)
    return sdpa_attention(q, k, v, q_pos, k_pos, window, mask)


def invariant_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                        self_only: bool, memo: dict | None, cache_slots: int | None = None,
                        written_first: bool = False) -> Tensor:
    """CUDA attention whose result for a row ignores the other rows (batch_invariant.apply): decode through
    `flash_decode`'s fixed split plan and ordered merge; several query tokens one row at a time, because
    nothing verifies that SDPA's flash and memory-efficient kernels or flex attention choose their splits
    and tiles without looking at the batch size, while a row alone launches exactly as in any batch.

    A speculative verify (its tokens `written_first` into the cache's buffer) runs through `flash_decode`,
    each query token as its own decode step would: the same keys in the same splits (the invariant launch
    walks positions, so a speculating cache's k spare slots change nothing), the later draft tokens' keys
    masked as not yet seen, so its logits are a plain decode step's bit for bit."""
    from .flash_decode import flash_decode

    if q.shape[2] == 1 or written_first:
        return flash_decode(q, k, v, q_pos, k_pos, window, invariant=True)
    if q.shape[0] == 1:
        return attention(q, k, v, q_pos, k_pos, window, self_only, memo, cache_slots=cache_slots)
    memo = {} if memo is None else memo  # each row's masks are its own (memo keys name shapes, not rows)
    return torch.cat([attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], q_pos[i : i + 1], k_pos[i : i + 1], window,
                                self_only, memo.setdefault(("row", i), {}), cache_slots=cache_slots)
                      for i in range(q.shape[0])])


DECODE_KERNELS = ("flash", "sdpa", "reduction")


def check_decode_kernel(name: str) -> str:
    """CUDA decode's attention kernel: "flash" (`flash_decode`, split-K in Triton, the default), "sdpa"
    (grouped SDPA) or "reduction" (`reduction_decode_attention`, compiled only). benchmarks/
    decode_attention.py times them, and the default follows its figures."""
    if name not in DECODE_KERNELS:
        raise ValueError(f"unknown decode kernel {name!r}; choose one of {', '.join(DECODE_KERNELS)}")
    return name
