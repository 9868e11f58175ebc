"""The batched LoRA delta as two Triton kernels (punica's / vLLM's BGMV): `out + B_s A_s x` for each row,
s that row's slot, for few rows (decode).

Why: in a compiled CUDA-graph decode step the masked delta (lora._masked_delta) costs every linear two
cuBLAS mms over all slots, a mask and an add; here it is a shrink (x A_s^T, fp32) and an expand (adds
xa B_s^T into the base output), each program reading only its own row's slot, with no host sync and no
branch on the slots in the graph. Rows on no adapter (slot 0 or -1) skip the work. The bank's default
delta: on an H100 (7B shape, 4 rank-16 adapters, compiled b8) x1.163 the base step against the matmuls'
x1.268. Tests run both kernels in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
from torch import Tensor

from .quant.triton_mm import autotuned, interpreting

MAX_ROWS = 64  # a program per row re-reads its slot's A and B^T: past this many rows the mms' reuse wins
# Inputs per shrink program: a row's A is in x (up to 14336) long, too long for one program of a few rows
# to stream; split, it spreads over the GPU's SMs (the expand adds the partial sums, so no atomics)
K_SPLIT = 1024
_TRITON = importlib.util.find_spec("triton") is not None  # not imported until a kernel is built


def _tuned(kernel, configs: list[tuple[dict, int]], key: list[str]):
    import triton

    return autotuned(kernel, [triton.Config(meta, num_warps=warps) for meta, warps in configs], key)


@functools.cache
def _shrink_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lora_shrink_kernel(x_ptr, a_ptr, index_ptr, xa_ptr, m, k, pr, tokens, slots, sx_m, sa_s, sa_r,
                           K_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # xa[split, row, ranks] = x[row, split's K_SPLIT inputs] @ a[slot][ranks, same]^T: one row, so a
        # multiply-and-sum; the expand adds up the splits
        row, split = tl.program_id(0), tl.program_id(2)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        slot = tl.load(index_ptr + row // tokens).to(tl.int64)
        acc = tl.zeros((BLOCK_R,), tl.float32)
        if (slot > 0) & (slot <= slots):
            for start in tl.range(split * K_SPLIT, split * K_SPLIT + K_SPLIT, BLOCK_K):
                kk = start + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + row * sx_m + kk, mask=kk < k, other=0.0).to(tl.float32)
                w = tl.load(a_ptr + slot * sa_s + ranks[:, None] * sa_r + kk[None, :],
                            mask=(ranks[:, None] < pr) & (kk[None, :] < k), other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
        tl.store(xa_ptr + (split * m + row) * pr + ranks, acc, mask=ranks < pr)

    configs = [(dict(BLOCK_R=r, BLOCK_K=k), w) for r in (8, 4, 16) for k in (256, 512, 1024) for w in (4, 2)]
    return _tuned(lora_shrink_kernel, configs, ["k", "pr"])


@functools.cache
def _expand_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lora_expand_kernel(xa_ptr, bt_ptr, index_ptr, out_ptr, y_ptr, m, n, pr, splits, tokens, slots, sb_s, sb_r,
                           so_m, sy_m, PR_POW2: tl.constexpr, BLOCK_N: tl.constexpr):
        # y[row, cols] = out[row, cols] + xa[row] @ bt[slot][:, cols], summed in fp32
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = cols < n
        acc = tl.load(out_ptr + row * so_m + cols, mask=live_n, other=0.0).to(tl.float32)
        slot = tl.load(index_ptr + row // tokens).to(tl.int64)
        if (slot > 0) & (slot <= slots):
            p = tl.arange(0, PR_POW2)
            xa = tl.zeros((PR_POW2,), tl.float32)
            for split in range(splits):  # the shrink's partial sums, in a fixed order
                xa += tl.load(xa_ptr + (split * m + row) * pr + p, mask=p < pr, other=0.0)
            b = tl.load(bt_ptr + slot * sb_s + p[:, None] * sb_r + cols[None, :],
                        mask=(p[:, None] < pr) & live_n[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xa[:, None] * b, axis=0)
        tl.store(y_ptr + row * sy_m + cols, acc.to(y_ptr.dtype.element_ty), mask=live_n)

    configs = [(dict(BLOCK_N=n), w) for n in (64, 128, 256) for w in (4, 2)]
    return _tuned(lora_expand_kernel, configs, ["n", "pr"])


def available(x: Tensor) -> bool:
    """Whether `lora_delta` can take x [B, ..., K]: on CUDA (or Triton's interpreter), at most MAX_ROWS rows."""
    return (x.is_cuda or interpreting()) and _TRITON and x.numel() <= MAX_ROWS * x.shape[-1]


def _check(x: Tensor, a: Tensor, bt: Tensor, index: Tensor, out: Tensor) -> None:
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS:
        raise ValueError(f"lora_delta takes at most {MAX_ROWS} rows (B * tokens), got {rows}: use another delta")
    if x.dim() < 2 or x.shape[:-1] != out.shape[:-1] or index.shape != x.shape[:1]:
        raise ValueError(f"lora_delta wants x [B, ..., K], out [B, ..., N] and index [B], got x {tuple(x.shape)}, "
                         f"out {tuple(out.shape)}, index {tuple(index.shape)}")
    if a.shape[:2] != bt.shape[:2] or a.shape[2] != x.shape[-1] or bt.shape[2] != out.shape[-1]:
        raise ValueError(f"lora_delta wants a [S, PR, K] and bt [S, PR, N], got a {tuple(a.shape)}, "
                         f"bt {tuple(bt.shape)} for K {x.shape[-1]}, N {out.shape[-1]}")


def _rows(t: Tensor) -> Tensor:
    """t [B, ..., C] as [M, C] with unit column stride (a view where the rows allow one)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mistral7b::lora_delta", mutates_args=())
def lora_delta(x: Tensor, a: Tensor, bt: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """out [B, ..., N] + each row's x [B, ..., K] @ a[s]^T @ bt[s], s = index[b] of its batch row (0 or -1:
    none, exactly out); a [S + 1, PR, K] and bt [S + 1, PR, N] (a bank's stacked slots). At most MAX_ROWS rows."""
    _check(x, a, bt, index, out)
    y = torch.empty_like(out, memory_format=torch.contiguous_format)
    m, tokens = math.prod(x.shape[:-1]), math.prod(x.shape[1:-1])
    if m == 0:
        return y
    x2, out2, y2 = _rows(x), _rows(out), y.view(m, -1)
    a, bt, index = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, bt, index))
    slots, pr, k = a.shape[0] - 1, a.shape[1], a.shape[2]
    n = out.shape[-1]
    splits = -(-k // K_SPLIT)
    xa = torch.empty(splits, m, pr, device=x.device, dtype=torch.float32)
    _shrink_kernel()[lambda meta: (m, -(-pr // meta["BLOCK_R"]), splits)](
        x2, a, index, xa, m, k, pr, tokens, slots, x2.stride(0), a.stride(0), a.stride(1), K_SPLIT=K_SPLIT)
    _expand_kernel()[lambda meta: (m, -(-n // meta["BLOCK_N"]))](
        xa, bt, index, out2, y2, m, n, pr, splits, tokens, slots, bt.stride(0), bt.stride(1), out2.stride(0),
        y2.stride(0), PR_POW2=max(1, 1 << (pr - 1).bit_length()))
    return y


@lora_delta.register_fake
def _(x, a, bt, index, out):
    _check(x, a, bt, index, out)
    return torch.empty_like(out, memory_format=torch.contiguous_format)
