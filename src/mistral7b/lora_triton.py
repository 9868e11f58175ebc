"""The batched LoRA delta as two Triton kernels (punica's / vLLM's BGMV): `out + B_s A_s x` for each row,
s that row's slot, for few rows (decode).

Why: in a compiled CUDA-graph decode step the masked delta (lora._masked_delta) costs every linear two
cuBLAS mms over all slots, a mask and an add; here it is a shrink (x A_s^T, fp32) and an expand (adds
xa B_s^T into the base output), each program reading only its own row's slot, with no host sync and no
branch on the slots in the graph. Rows on no adapter (slot 0 or -1) skip the work. The bank's default
delta: on an H100 (7B shape, 4 rank-16 adapters, compiled b8) x1.163-1.166 the base step against the
matmuls' x1.26. A fused linear's parts (q, k, v; gate, up) read only their own ranks of B^T.

`fused=True` does both in one launch (`_fused_kernel`): a decode step's delta is about a fixed cost per
kernel (H100: b1 and b8 both about +0.9-1.0 ms over 129 linears), and this halves the kernels. Not yet
measured on a GPU, so not the default. Tests run every kernel in Triton's interpreter on the CPU, and
compile each config to an sm_90 cubin there.
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
def _blocks() -> None:
    """The shrink's and the expand's work for one program, shared by the two-kernel and the fused forms, as
    module globals `_shrink_block` and `_expand_block`: Triton's interpreter finds a kernel's callees there
    only (not in a closure), and the triton import waits for the first kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_block(x_ptr, a_ptr, xa_ptr, row, band, split, slot, m, k, pr, slots, sx_m, sa_s, sa_r,
                     K_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # xa[split, row, ranks] = x[row, split's K_SPLIT inputs] @ a[slot][ranks, same]^T: one row, so a
        # multiply-and-sum; the expand adds up the splits
        ranks = band * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), tl.float32)
        if (slot > 0) & (slot <= slots):
            for start in tl.range(split * K_SPLIT, split * K_SPLIT + K_SPLIT, BLOCK_K):
                kk = start + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + row * sx_m + kk, mask=kk < k, other=0.0).to(tl.float32)
                w = tl.load(a_ptr + slot * sa_s + ranks[:, None] * sa_r + kk[None, :],
                            mask=(ranks[:, None] < pr) & (kk[None, :] < k), other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
        tl.store(xa_ptr + (split * m + row) * pr + ranks, acc, mask=ranks < pr)

    @triton.jit
    def expand_block(xa_ptr, bt_ptr, out_ptr, y_ptr, sync_ptr, shrinks, row, cols, slot, m, n, pr, rank, end0, end1,
                     splits, slots, sb_s, sb_r, so_m, sy_m, PR_POW2: tl.constexpr, WAIT: tl.constexpr):
        # y[row, cols] = out[row, cols] + xa[row] @ bt[slot][:, cols], summed in fp32. A fused linear's
        # columns of part j (ending at end0, end1, n) read only that part's `rank` rows of bt: the others
        # hold zeros there, and masked rows cost no memory traffic. `WAIT` (fused): out and bt are read
        # while the shrinks run, then xa once sync[1] counts them all
        live_n = cols < n
        acc = tl.load(out_ptr + row * so_m + cols, mask=live_n, other=0.0).to(tl.float32)
        if (slot > 0) & (slot <= slots):
            p = tl.arange(0, PR_POW2)
            part = (cols >= end0).to(tl.int32) + (cols >= end1).to(tl.int32)
            own = (p[:, None] < pr) & (p[:, None] // rank == part[None, :]) & live_n[None, :]
            b = tl.load(bt_ptr + slot * sb_s + p[:, None] * sb_r + cols[None, :], mask=own, other=0.0)
            if WAIT:
                while tl.atomic_add(sync_ptr + 1, 0, sem="acquire") < shrinks:
                    pass
            xa = tl.zeros((PR_POW2,), tl.float32)
            for split in range(splits):  # the shrink's partial sums, in a fixed order
                xa += tl.load(xa_ptr + (split * m + row) * pr + p, mask=p < pr, other=0.0, volatile=WAIT)
            acc += tl.sum(xa[:, None] * b.to(tl.float32), axis=0)
        tl.store(y_ptr + row * sy_m + cols, acc.to(y_ptr.dtype.element_ty), mask=live_n)

    globals().update(_shrink_block=shrink_block, _expand_block=expand_block)


SHRINK_CONFIGS = [(dict(BLOCK_R=r, BLOCK_K=k), w) for r in (8, 4, 16) for k in (256, 512, 1024) for w in (4, 2)]
EXPAND_CONFIGS = [(dict(BLOCK_N=n), w) for n in (64, 128, 256) for w in (4, 2)]


@functools.cache
def _shrink_kernel():
    import triton
    import triton.language as tl

    _blocks()

    @triton.jit
    def lora_shrink_kernel(x_ptr, a_ptr, index_ptr, xa_ptr, m, k, pr, tokens, slots, sx_m, sa_s, sa_r,
                           K_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(index_ptr + row // tokens).to(tl.int64)
        _shrink_block(x_ptr, a_ptr, xa_ptr, row, tl.program_id(1), tl.program_id(2), slot, m, k, pr, slots, sx_m,
                      sa_s, sa_r, K_SPLIT, BLOCK_R, BLOCK_K)

    return _tuned(lora_shrink_kernel, SHRINK_CONFIGS, ["k", "pr"])


@functools.cache
def _expand_kernel():
    import triton
    import triton.language as tl

    _blocks()

    @triton.jit
    def lora_expand_kernel(xa_ptr, bt_ptr, index_ptr, out_ptr, y_ptr, m, n, pr, rank, end0, end1, splits, tokens,
                           slots, sb_s, sb_r, so_m, sy_m, PR_POW2: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = tl.load(index_ptr + row // tokens).to(tl.int64)
        _expand_block(xa_ptr, bt_ptr, out_ptr, y_ptr, index_ptr, 0, row, cols, slot, m, n, pr, rank, end0, end1,
                      splits, slots, sb_s, sb_r, so_m, sy_m, PR_POW2, False)

    return _tuned(lora_expand_kernel, EXPAND_CONFIGS, ["n", "pr"])


@functools.cache
def _fused_kernel():
    """Shrink and expand in one launch (half the kernels a step). Programs take tickets in the order they
    start: the first tickets shrink, the rest expand once every shrink is done. A program that waits
    holds a ticket issued after every shrink ticket, to a program already running, so the wait ends
    whatever order the GPU starts programs in (CUB's decoupled look-back takes tickets for the same
    reason). The last program to finish zeroes the counters for the next launch on the stream."""
    import triton
    import triton.language as tl

    _blocks()

    @triton.jit
    def lora_fused_kernel(x_ptr, a_ptr, bt_ptr, index_ptr, out_ptr, y_ptr, xa_ptr, sync_ptr, m, k, n, pr, rank,
                          end0, end1, splits, tokens, slots, sx_m, sa_s, sa_r, sb_s, sb_r, so_m, sy_m,
                          K_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          PR_POW2: tl.constexpr, BLOCK_N: tl.constexpr):
        bands, col_bands = tl.cdiv(pr, BLOCK_R), tl.cdiv(n, BLOCK_N)
        shrinks = m * bands * splits
        ticket = tl.atomic_add(sync_ptr, 1)  # sync: tickets taken, shrinks done, programs done
        if ticket < shrinks:
            row = ticket // (bands * splits)
            slot = tl.load(index_ptr + row // tokens).to(tl.int64)
            _shrink_block(x_ptr, a_ptr, xa_ptr, row, (ticket // splits) % bands, ticket % splits, slot, m, k, pr,
                          slots, sx_m, sa_s, sa_r, K_SPLIT, BLOCK_R, BLOCK_K)
            tl.debug_barrier()  # every thread's stores before the release
            tl.atomic_add(sync_ptr + 1, 1, sem="release")
        else:
            row = (ticket - shrinks) // col_bands
            cols = ((ticket - shrinks) % col_bands) * BLOCK_N + tl.arange(0, BLOCK_N)
            slot = tl.load(index_ptr + row // tokens).to(tl.int64)
            _expand_block(xa_ptr, bt_ptr, out_ptr, y_ptr, sync_ptr, shrinks, row, cols, slot, m, n, pr, rank, end0,
                          end1, splits, slots, sb_s, sb_r, so_m, sy_m, PR_POW2, True)
        tl.debug_barrier()
        if tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel") == shrinks + m * col_bands - 1:
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)
            tl.atomic_xchg(sync_ptr + 2, 0)

    configs = [(dict(BLOCK_R=r, BLOCK_K=k, BLOCK_N=n), 4) for r in (16, 8) for k in (512, 256) for n in (128, 256)]
    return _tuned(lora_fused_kernel, configs, ["k", "n", "pr"])


_SYNC: dict[torch.device, Tensor] = {}


def _sync(device: torch.device) -> Tensor:
    """The fused kernel's three counters on this device, zero between launches. One per device: launches
    on one stream run in turn (the engine's model runs on one stream)."""
    if device not in _SYNC:
        _SYNC[device] = torch.zeros(3, dtype=torch.int32, device=device)
    return _SYNC[device]


def available(x: Tensor) -> bool:
    """Whether `lora_delta` can take x [B, ..., K]: on CUDA (or Triton's interpreter), at most MAX_ROWS rows."""
    return (x.is_cuda or interpreting()) and _TRITON and x.numel() <= MAX_ROWS * x.shape[-1]


def _check(x: Tensor, a: Tensor, bt: Tensor, index: Tensor, out: Tensor, part_ends: list[int]) -> None:
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS:
        raise ValueError(f"lora_delta takes at most {MAX_ROWS} rows (B * tokens), got {rows}: use another delta")
    if x.dim() < 2 or x.shape[:-1] != out.shape[:-1] or index.shape != x.shape[:1]:
        raise ValueError(f"lora_delta wants x [B, ..., K], out [B, ..., N] and index [B], got x {tuple(x.shape)}, "
                         f"out {tuple(out.shape)}, index {tuple(index.shape)}")
    if a.shape[:2] != bt.shape[:2] or a.shape[2] != x.shape[-1] or bt.shape[2] != out.shape[-1]:
        raise ValueError(f"lora_delta wants a [S, PR, K] and bt [S, PR, N], got a {tuple(a.shape)}, "
                         f"bt {tuple(bt.shape)} for K {x.shape[-1]}, N {out.shape[-1]}")
    ends = [*part_ends, out.shape[-1]]
    if len(ends) > 3 or a.shape[1] % len(ends) or any(lo >= hi for lo, hi in zip([0, *ends], ends)):
        raise ValueError(f"lora_delta wants at most 3 parts, in increasing columns below N {out.shape[-1]}, each "
                         f"of PR / parts ranks; got part_ends {part_ends} for PR {a.shape[1]}")


def _rows(t: Tensor) -> Tensor:
    """t [B, ..., C] as [M, C] with unit column stride (a view where the rows allow one)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mistral7b::lora_delta", mutates_args=())
def lora_delta(x: Tensor, a: Tensor, bt: Tensor, index: Tensor, out: Tensor, part_ends: list[int],
               fused: bool = False) -> Tensor:
    """out [B, ..., N] + each row's x [B, ..., K] @ a[s]^T @ bt[s], s = index[b] of its batch row (0 or -1:
    none, exactly out); a [S + 1, PR, K] and bt [S + 1, PR, N] (a bank's stacked slots), PR = parts x rank,
    part j's columns ending at part_ends[j] (the last part's at N, not listed). At most MAX_ROWS rows.
    `fused`: one launch (`_fused_kernel`) instead of a shrink and an expand."""
    _check(x, a, bt, index, out, part_ends)
    y = torch.empty_like(out, memory_format=torch.contiguous_format)
    m, tokens = math.prod(x.shape[:-1]), math.prod(x.shape[1:-1])
    if m == 0:
        return y
    x2, out2, y2 = _rows(x), _rows(out), y.view(m, -1)
    a, bt, index = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, bt, index))
    slots, pr, k, n = a.shape[0] - 1, a.shape[1], a.shape[2], out.shape[-1]
    rank, (end0, end1) = pr // (len(part_ends) + 1), (*part_ends, n, n)[:2]
    splits, pr_pow2 = -(-k // K_SPLIT), max(1, 1 << (pr - 1).bit_length())
    xa = torch.empty(splits, m, pr, device=x.device, dtype=torch.float32)
    if fused:
        _fused_kernel()[lambda meta: (m * (-(-pr // meta["BLOCK_R"])) * splits + m * (-(-n // meta["BLOCK_N"])),)](
            x2, a, bt, index, out2, y2, xa, _sync(x.device), m, k, n, pr, rank, end0, end1, splits, tokens, slots,
            x2.stride(0), a.stride(0), a.stride(1), bt.stride(0), bt.stride(1), out2.stride(0), y2.stride(0),
            K_SPLIT=K_SPLIT, PR_POW2=pr_pow2)
        return y
    _shrink_kernel()[lambda meta: (m, -(-pr // meta["BLOCK_R"]), splits)](
        x2, a, index, xa, m, k, pr, tokens, slots, x2.stride(0), a.stride(0), a.stride(1), K_SPLIT=K_SPLIT)
    _expand_kernel()[lambda meta: (m, -(-n // meta["BLOCK_N"]))](
        xa, bt, index, out2, y2, m, n, pr, rank, end0, end1, splits, tokens, slots, bt.stride(0), bt.stride(1),
        out2.stride(0), y2.stride(0), PR_POW2=pr_pow2)
    return y


@lora_delta.register_fake
def _(x, a, bt, index, out, part_ends, fused=False):
    _check(x, a, bt, index, out, part_ends)
    return torch.empty_like(out, memory_format=torch.contiguous_format)
