"""Split-K decode attention (flash-decoding) in Triton: one query token per row against a KV cache.

A fused attention kernel for one query token runs one program per (row, KV head): 8 programs at batch
1 for the 4,096 keys of a full window, which leaves most of an H200 idle (measured: 86 us per layer at
4,096 slots, against 17 us for FlexAttention's split decoding; benchmarks/decode_attention.py). Here
the key axis is split across programs as well, each program handles the whole GQA group of query
heads of its KV head (K/V read once for the group, never repeated), and a second kernel merges the
partial softmaxes. Visibility comes from the positions stored beside each slot, as everywhere else in
`attention`, so slot order (the rolling buffer) never matters. The batch-invariant launch walks
positions instead of slots, so that a key's split and lane, and so every sum, are the same in any
buffer that holds it: a plain cache of W slots and a speculating one of W + k give the same bits.

CUDA only; `triton` is imported when the kernel is first used, never on the CPU path. Registered as a
custom op so that torch.compile and CUDA graphs treat it as one opaque launch.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK_N = 64  # keys per inner step
MIN_GROUP_ROWS = 16  # tl.dot needs at least 16 rows: the group's heads are padded up to this
NO_WINDOW = 2**31 - 1  # farther than any position
MAX_KEYS_PER_SPLIT = 256


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(batch: int, kv_heads: int, slots: int, processors: int) -> tuple[int, int]:
    """(splits, keys per split) of the key axis: programs enough to cover the GPU about twice, each
    split a whole number of blocks and at most MAX_KEYS_PER_SPLIT keys. The cap matters because the
    compiled step runs rows up to a power of two (runner.decode_width) and idle rows cost nothing
    here: sized by the batch alone, one live row among 8 got 5 splits of 832 keys instead of 32 of 128, and decode at 16k context ran
    at 0.885 of 1k in `bench` (width 8) against 0.976 at width 1 (H200, 2026-12-04)."""
    wanted = max(1, min(cdiv(slots, BLOCK_N), cdiv(2 * processors, batch * kv_heads)), cdiv(slots, MAX_KEYS_PER_SPLIT))
    per_split = cdiv(cdiv(slots, wanted), BLOCK_N) * BLOCK_N
    return cdiv(slots, per_split), per_split


def invariant_split_plan(slots: int) -> tuple[int, int]:
    """`split_plan` for batch_invariant.apply: MAX_KEYS_PER_SPLIT positions a split, whatever the batch or
    the buffer, so a key always lands in the same split and lane (the kernel walks positions, not slots:
    split s of a row holds positions from the window's first, rounded down to a split, plus s splits);
    one split more than the slots fill, for that rounding; a longer kv_len (a longer neighbour) only adds
    trailing splits that hold no key of this row, which the ordered merge adds as exact zeros."""
    return cdiv(slots, MAX_KEYS_PER_SPLIT) + 1, MAX_KEYS_PER_SPLIT


@functools.cache
def _partial_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, m_ptr, l_ptr, acc_ptr,
                       sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sqp_b, sqp_t, skp_b, skp_s, tokens,
                       slots, window, scale, keys_per_split, splits,
                       KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                       BY_POSITION: tl.constexpr):
        row_head = tl.program_id(0)
        split = tl.program_id(1)
        j = tl.program_id(2)  # the query token: each one exactly as a launch of its own would compute it
        b = row_head // KV_HEADS
        kvh = row_head % KV_HEADS
        g = tl.arange(0, GROUP_ROWS)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + j * sq_t + d[None, :], mask=g[:, None] < GROUP,
                    other=0.0)
        q_pos = tl.load(qpos_ptr + b * sqp_b + j * sqp_t)
        m_i = tl.full((GROUP_ROWS,), -1.0e30, tl.float32)  # finite: an empty split leaves exp() at 0, not NaN
        l_i = tl.zeros((GROUP_ROWS,), tl.float32)
        acc = tl.zeros((GROUP_ROWS, HEAD_DIM), tl.float32)
        if BY_POSITION:  # n counts positions: the rolling buffer keeps position n in slot n % slots
            start = (tl.maximum(q_pos - window + 1, 0) // keys_per_split + split) * keys_per_split
            end = tl.minimum(start + keys_per_split, q_pos + 1)
        else:  # n counts slots
            start = split * keys_per_split
            end = tl.minimum(start + keys_per_split, slots)
        for offset in tl.range(0, keys_per_split, BLOCK):
            n = start + offset + tl.arange(0, BLOCK)
            inside = n < end
            slot = n % slots if BY_POSITION else n
            k_pos = tl.load(kpos_ptr + b * skp_b + slot * skp_s, mask=inside, other=-1)
            seen = inside & (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < window)
            if BY_POSITION:
                seen = seen & (k_pos == n)  # the slot holds this position, not an older or a newer one
            # Masked lanes issue no reads: empty slots and idle rows (position -1) cost nothing.
            k = tl.load(k_ptr + b * sk_b + kvh * sk_h + slot[:, None] * sk_s + d[None, :], mask=seen[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + b * sv_b + kvh * sv_h + slot[:, None] * sv_s + d[None, :], mask=seen[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = ((b * KV_HEADS * GROUP + heads) * tokens + j) * splits + split  # [B, H, T, SPLITS] partials
        valid = g < GROUP
        tl.store(m_ptr + out, m_i, mask=valid)
        tl.store(l_ptr + out, l_i, mask=valid)
        tl.store(acc_ptr + out[:, None] * HEAD_DIM + d[None, :], acc, mask=valid[:, None])

    return partial_kernel


@functools.cache
def _merge_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr):
        row_head = tl.program_id(0)
        s = tl.arange(0, SPLITS_POW2)
        d = tl.arange(0, HEAD_DIM)
        used = s < splits
        m = tl.load(m_ptr + row_head * splits + s, mask=used, other=-1.0e30)
        l = tl.load(l_ptr + row_head * splits + s, mask=used, other=0.0)
        acc = tl.load(acc_ptr + (row_head * splits + s)[:, None] * HEAD_DIM + d[None, :], mask=used[:, None], other=0.0)
        weight = tl.exp(m - tl.max(m, 0))
        total = tl.sum(l * weight, 0)
        merged = tl.sum(acc * weight[:, None], 0) / tl.maximum(total, 1e-30)  # no visible key: zeros, not NaN
        tl.store(out_ptr + row_head * HEAD_DIM + d, merged.to(out_ptr.dtype.element_ty))

    return merge_kernel


@functools.cache
def _ordered_merge_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ordered_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, HEAD_DIM: tl.constexpr):
        # Split by split, left to right: a tree over a power-of-two padding of `splits` would regroup the
        # sums when the split count changes. A split without a visible key (m = -1e30) scales the running
        # sums by exp(0) = 1 and adds 0 * 0: exactly nothing.
        row_head = tl.program_id(0)
        d = tl.arange(0, HEAD_DIM)
        m = tl.full((1,), -1.0e30, tl.float32)
        l = tl.zeros((1,), tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for s in range(0, splits):
            m_s = tl.load(m_ptr + row_head * splits + s + tl.zeros((1,), tl.int32))
            l_s = tl.load(l_ptr + row_head * splits + s + tl.zeros((1,), tl.int32))
            acc_s = tl.load(acc_ptr + (row_head * splits + s) * HEAD_DIM + d)
            m_new = tl.maximum(m, m_s)
            keep, take = tl.exp(m - m_new), tl.exp(m_s - m_new)
            acc = acc * keep + acc_s * take
            l = l * keep + l_s * take
            m = m_new
        tl.store(out_ptr + row_head * HEAD_DIM + d, (acc / tl.maximum(l, 1e-30)).to(out_ptr.dtype.element_ty))

    return ordered_merge_kernel


def flash_decode(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                 invariant: bool = False) -> Tensor:
    """q [B, H, T, hd]; k, v [B, KV, S, hd] (any strides with a unit last stride); q_pos [B, T];
    k_pos [B, S] (-1: empty slot) -> [B, H, T, hd]. Keys j visible to query i: i - W < j <= i. T is 1
    for decode; a speculative verify's T tokens, written into the cache first, each see what their own
    decode step would. `invariant`: a row's result does not depend on B, S or T (`invariant_split_plan`,
    ordered merge)."""
    return torch.ops.mistral7b.flash_decode(q, k, v, q_pos, k_pos, -1 if window is None else window, invariant)


def plan(batch: int, kv_heads: int, slots: int, device: torch.device, invariant: bool) -> tuple[int, int]:
    if invariant:
        return invariant_split_plan(slots)
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return split_plan(batch, kv_heads, slots, processors)


@torch.library.custom_op("mistral7b::flash_decode", mutates_args=())
def _flash_decode_op(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int,
                     invariant: bool = False) -> Tensor:
    batch, heads, tokens, head_dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = heads // kv_heads
    splits, keys_per_split = plan(batch * tokens, kv_heads, slots, q.device, invariant)
    partial_m = torch.empty(batch, heads, tokens, splits, device=q.device, dtype=torch.float32)
    partial_l = torch.empty_like(partial_m)
    partial_acc = torch.empty(batch, heads, tokens, splits, head_dim, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, heads, tokens, head_dim, device=q.device, dtype=q.dtype)
    partial_kernel = _partial_kernel()
    q = q if q.stride(-1) == 1 else q.contiguous()
    partial_kernel[(batch * kv_heads, splits, tokens)](
        q, k, v, q_pos, k_pos, partial_m, partial_l, partial_acc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), q_pos.stride(0), q_pos.stride(1), k_pos.stride(0), k_pos.stride(1), tokens,
        slots, window if window > 0 else NO_WINDOW, head_dim**-0.5, keys_per_split, splits,
        KV_HEADS=kv_heads, GROUP=group, GROUP_ROWS=max(MIN_GROUP_ROWS, 1 << (group - 1).bit_length()),
        HEAD_DIM=head_dim, BLOCK=BLOCK_N, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BY_POSITION=invariant,
    )
    if invariant:  # one program per (row, head, token): partials and output share that order
        _ordered_merge_kernel()[(batch * heads * tokens,)](partial_m, partial_l, partial_acc, out, splits,
                                                           HEAD_DIM=head_dim)
    else:
        _merge_kernel()[(batch * heads * tokens,)](partial_m, partial_l, partial_acc, out, splits,
                                                   SPLITS_POW2=1 << (splits - 1).bit_length(), HEAD_DIM=head_dim)
    return out


@_flash_decode_op.register_fake
def _(q, k, v, q_pos, k_pos, window, invariant=False):
    return q.new_empty(q.shape)  # contiguous, as the kernel's output (q itself is often a strided view)
