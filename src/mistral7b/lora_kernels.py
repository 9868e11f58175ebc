"""The Triton kernels behind `lora_triton.lora_delta`, imported on a kernel's first use (Triton may be
absent on a CPU install): a shrink (x A_s^T into fp32 partial sums), an expand (adds them times B_s^T to the
base output), and the two fused into one launch. The shared per-program work is module-level `@triton.jit`
functions, where both the compiler and the interpreter find a kernel's callees.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quant.triton_mm import autotuned


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
                 splits, slots, sb_s, sb_r, so_m, sy_m, PR_POW2: tl.constexpr, WAIT: tl.constexpr,
                 BACKOFF: tl.constexpr):
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
                if BACKOFF:  # a pause between polls of that one L2 line, as CUB's and CUTLASS's spins do
                    tl.inline_asm_elementwise("nanosleep.u32 64; mov.u32 $0, $1;", "=r,r", [shrinks], dtype=tl.int32,
                                              is_pure=False, pack=1)
        xa = tl.zeros((PR_POW2,), tl.float32)
        for split in range(splits):  # the shrink's partial sums, in a fixed order
            xa += tl.load(xa_ptr + (split * m + row) * pr + p, mask=p < pr, other=0.0, volatile=WAIT)
        acc += tl.sum(xa[:, None] * b.to(tl.float32), axis=0)
    tl.store(y_ptr + row * sy_m + cols, acc.to(y_ptr.dtype.element_ty), mask=live_n)


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, index_ptr, xa_ptr, m, k, pr, tokens, slots, sx_m, sa_s, sa_r,
                       K_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(index_ptr + row // tokens).to(tl.int64)
    shrink_block(x_ptr, a_ptr, xa_ptr, row, tl.program_id(1), tl.program_id(2), slot, m, k, pr, slots, sx_m,
                 sa_s, sa_r, K_SPLIT, BLOCK_R, BLOCK_K)


@triton.jit
def lora_expand_kernel(xa_ptr, bt_ptr, index_ptr, out_ptr, y_ptr, m, n, pr, rank, end0, end1, splits, tokens,
                       slots, sb_s, sb_r, so_m, sy_m, PR_POW2: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(index_ptr + row // tokens).to(tl.int64)
    expand_block(xa_ptr, bt_ptr, out_ptr, y_ptr, index_ptr, 0, row, cols, slot, m, n, pr, rank, end0, end1,
                 splits, slots, sb_s, sb_r, so_m, sy_m, PR_POW2, False, False)


# Shrink and expand in one launch (half the kernels a step). Programs take tickets in the order they
# start: the first tickets shrink, the rest expand once every shrink is done. A program that waits
# holds a ticket issued after every shrink ticket, to a program already running, so the wait ends
# whatever order the GPU starts programs in (CUB's decoupled look-back takes tickets for the same
# reason). The last program to finish zeroes the counters for the next launch on the stream.
@triton.jit
def lora_fused_kernel(x_ptr, a_ptr, bt_ptr, index_ptr, out_ptr, y_ptr, xa_ptr, sync_ptr, m, k, n, pr, rank,
                      end0, end1, splits, tokens, slots, sx_m, sa_s, sa_r, sb_s, sb_r, so_m, sy_m,
                      K_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      PR_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BACKOFF: tl.constexpr):
    bands, col_bands = tl.cdiv(pr, BLOCK_R), tl.cdiv(n, BLOCK_N)
    shrinks = m * bands * splits
    ticket = tl.atomic_add(sync_ptr, 1)  # sync: tickets taken, shrinks done, programs done
    if ticket < shrinks:
        row = ticket // (bands * splits)
        slot = tl.load(index_ptr + row // tokens).to(tl.int64)
        shrink_block(x_ptr, a_ptr, xa_ptr, row, (ticket // splits) % bands, ticket % splits, slot, m, k, pr,
                     slots, sx_m, sa_s, sa_r, K_SPLIT, BLOCK_R, BLOCK_K)
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        row = (ticket - shrinks) // col_bands
        cols = ((ticket - shrinks) % col_bands) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = tl.load(index_ptr + row // tokens).to(tl.int64)
        expand_block(xa_ptr, bt_ptr, out_ptr, y_ptr, sync_ptr, shrinks, row, cols, slot, m, n, pr, rank, end0,
                     end1, splits, slots, sb_s, sb_r, so_m, sy_m, PR_POW2, True, BACKOFF)
    tl.debug_barrier()
    if tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel") == shrinks + m * col_bands - 1:
        tl.atomic_xchg(sync_ptr, 0)
        tl.atomic_xchg(sync_ptr + 1, 0)
        tl.atomic_xchg(sync_ptr + 2, 0)


def _tuned(kernel, configs: list[tuple[dict, int]], key: list[str]):
    return autotuned(kernel, [triton.Config(meta, num_warps=warps) for meta, warps in configs], key)


shrink = _tuned(lora_shrink_kernel, [(dict(BLOCK_R=r, BLOCK_K=k), w) for r in (8, 4, 16) for k in (256, 512, 1024)
                                     for w in (4, 2)], ["k", "pr"])
expand = _tuned(lora_expand_kernel, [(dict(BLOCK_N=n), w) for n in (64, 128, 256) for w in (4, 2)], ["n", "pr"])
fused = _tuned(lora_fused_kernel, [(dict(BLOCK_R=r, BLOCK_K=k, BLOCK_N=n), 4) for r in (16, 8) for k in (512, 256)
                                   for n in (128, 256)], ["k", "n", "pr"])
