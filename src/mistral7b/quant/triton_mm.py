"""Weight-only matmuls for few rows (decode) in Triton: int8 per channel, and int4 groups in the "halves"
layout (`kernels.pack_int4(..., "halves")`: byte j of a row holds inputs j and K/2 + j, so each block of
bytes is two runs of inputs that need no shuffle; tinygemm's tile layout cost more to unpack than its
bytes saved: 11.5-13.6 ms a 7B step against tinygemm's 2.20, H200, 2026-12-04). On the halves layout
one row takes 3.11 ms a step and 8 rows 8.09 (tinygemm 2.21 and 5.10, H200, 2026-12-05): still opt-in.

Decode is bound by weight bytes. Each program streams a band of weight rows once and widens it in
registers; one activation row is a multiply-and-sum, more rows (up to 64) one tensor-core dot per block,
so each weight byte is read once whatever M is. Tile shapes are autotuned per matrix shape on first use.
`kernels.MEASURED_ROWS_KERNEL` records which of these beat torch's kernels on an H200
(benchmarks/gemv_bench.py). Tests run both kernels in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

MAX_ROWS = 64  # activation rows in one tl.dot tile at most; more rows go to torch's kernels
# The batch-invariant launch (batch_invariant.apply): every M through the dot variant with this one tile,
# row tiles on the grid's second axis, so a row's sums never depend on M. Tiles from the autotuned lists.
INVARIANT_ROWS = 16
INVARIANT_CONFIG = {"int8": dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
                    "int4": dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuned(kernel, shapes: list[tuple[int, int, int, int]], key: list[str], field: str):
    """`kernel` autotuned over (BLOCK_N, <field>, warps, stages) on a GPU; the first shape when
    interpreted (the interpreter would run every one)."""
    import triton

    configs = [triton.Config({"BLOCK_N": bn, field: f}, num_warps=w, num_stages=s) for bn, f, w, s in shapes]
    return autotuned(kernel, configs, key)


def autotuned(kernel, configs: list, key: list[str]):
    """`kernel` autotuned over `configs` (triton.Config) on a GPU; the first one when interpreted (the
    interpreter would run every one)."""
    import triton

    return triton.autotune(configs[:1] if interpreting() else configs, key=key)(kernel)


@functools.cache
def _int8_kernel(one_row: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def int8_rows_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, m, n, k, sx_m, sq_n, so_m,
                         ROWS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        band = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # axis 1: row tiles (batch-invariant launches)
        cols = band * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        for start in tl.range(0, k, BLOCK_K):
            kk = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * sx_m + kk[None, :], mask=(rows[:, None] < m) & (kk[None, :] < k),
                        other=0.0)
            w = tl.load(q_ptr + cols[:, None] * sq_n + kk[None, :], mask=(cols[:, None] < n) & (kk[None, :] < k),
                        other=0)
            if ROWS == 1:
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        scale = tl.load(scale_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        tl.store(out_ptr + rows[:, None] * so_m + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    if one_row:  # a multiply-and-sum (no 16-row dot tile): any band width
        shapes = [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (4, 1024, 4, 3),
                  (2, 1024, 2, 4), (16, 512, 8, 3), (32, 256, 8, 3)]
    else:
        shapes = [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 4), (16, 512, 4, 3),
                  (32, 512, 8, 3), (64, 128, 4, 3), (64, 256, 8, 3)]
    return tuned(int8_rows_kernel, shapes, ["n", "k", "ROWS"], "BLOCK_K")


def precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def row_tile(m: int) -> int:
    """The dot's row tile: 16 (the smallest) up to 64, a power of two (one compiled variant each)."""
    return max(16, 1 << (m - 1).bit_length())


def check_rows(x: Tensor, name: str, invariant: bool = False) -> None:
    if x.shape[0] > MAX_ROWS and not invariant:
        raise ValueError(f"{name} takes at most {MAX_ROWS} rows, got {x.shape[0]}")


def launch(kernel_of, kind: str, m: int, n: int, args, config: dict | None, invariant: bool, **constants) -> None:
    """Run the autotuned variant for `m` rows, or with `config` (tile sizes, warps) one variant of it
    (tests), or the batch-invariant launch (`INVARIANT_CONFIG`)."""
    if invariant:
        config = INVARIANT_CONFIG[kind] if config is None else config
        grid = (-(-n // config["BLOCK_N"]), -(-m // INVARIANT_ROWS))
        kernel_of(False).fn[grid](*args, **constants, ROWS=INVARIANT_ROWS, **config)
        return
    tuned_kernel = kernel_of(m == 1)
    grid = lambda meta: (-(-n // meta["BLOCK_N"]),)  # noqa: E731
    rows = 1 if m == 1 else row_tile(m)
    if config is None:
        tuned_kernel[grid](*args, **constants, ROWS=rows)
    else:
        tuned_kernel.fn[grid](*args, **constants, ROWS=rows, **config)


@torch.library.custom_op("mistral7b::int8_rows_mm", mutates_args=())
def int8_rows_mm(x: Tensor, q: Tensor, scale: Tensor, invariant: bool = False) -> Tensor:
    """x [M <= 64, K] @ (q [N, K] int8 * scale [N])^T -> [M, N] in x's dtype; `invariant`: any M, each
    row's sums independent of M (`INVARIANT_CONFIG`)."""
    return int8_rows(x, q, scale, invariant=invariant)


def int8_rows(x: Tensor, q: Tensor, scale: Tensor, config: dict | None = None, invariant: bool = False) -> Tensor:
    check_rows(x, "int8_rows_mm", invariant)
    m, k = x.shape
    n = q.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m:
        launch(_int8_kernel, "int8", m, n, (x, q, scale, out, m, n, k, x.stride(0), q.stride(0), out.stride(0)),
               config, invariant, PRECISION=precision(x))
    return out


@int8_rows_mm.register_fake
def _(x, q, scale, invariant=False):
    return x.new_empty(x.shape[0], q.shape[0])


INT4_PAIR_BLOCK = 256  # packed bytes per row step at most: the int4 layout wants K / 2 a multiple of it


@functools.cache
def _int4_kernel(one_row: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def int4_rows_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, m, n, n_pad, half, sx_m, so_m,
                         ROWS: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # `kernels.pack_int4_rows`: byte j of a row holds input j (low nibble) and input half + j (high), so a
        # block of bytes is two runs of inputs, each one dot (a multiply-and-sum for one row) with no shuffle.
        # Where a group holds the block, (q - 8) s + z = q s + (z - 8 s) applies to the sums.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = cols < n
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, BLOCK_K)
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        for start in tl.range(0, half, BLOCK_K):
            b = tl.load(w_ptr + cols[:, None] * half + start + j[None, :], mask=live_n[:, None], other=0)
            for h in tl.static_range(2):
                q = (b >> (4 * h)) & 15
                kk = h * half + start + j
                x = tl.load(x_ptr + rows[:, None] * sx_m + kk[None, :], mask=rows[:, None] < m, other=0.0)
                if GROUP % BLOCK_K == 0:
                    off = (((h * half + start) // GROUP) * n_pad + cols) * 2
                    s = tl.load(sz_ptr + off, mask=live_n, other=0.0).to(tl.float32)
                    z = tl.load(sz_ptr + off + 1, mask=live_n, other=0.0).to(tl.float32)
                    w = q
                else:  # groups smaller than the block: dequantize each weight
                    off = ((kk // GROUP)[None, :] * n_pad + cols[:, None]) * 2
                    s = tl.load(sz_ptr + off, mask=live_n[:, None], other=0.0).to(tl.float32)
                    z = tl.load(sz_ptr + off + 1, mask=live_n[:, None], other=0.0).to(tl.float32)
                    w = (q.to(tl.float32) - 8.0) * s + z
                if ROWS == 1:
                    part = tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
                else:
                    part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
                if GROUP % BLOCK_K == 0:
                    x_sum = tl.sum(x.to(tl.float32), axis=1)
                    acc += part * s[None, :] + x_sum[:, None] * (z - 8.0 * s)[None, :]
                else:
                    acc += part
        tl.store(out_ptr + rows[:, None] * so_m + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & live_n[None, :])

    if one_row:  # a multiply-and-sum: any band width; 16-byte loads per thread want BLOCK_N * BLOCK_K >= 2 KB
        shapes = [(8, 256, 4, 3), (4, 256, 2, 4), (16, 128, 4, 3), (8, 128, 2, 4), (16, 256, 4, 3),
                  (32, 128, 4, 3), (4, 128, 1, 4), (32, 256, 8, 3)]
    else:  # tl.dot wants 16 columns at least
        shapes = [(16, 128, 4, 3), (32, 128, 4, 3), (16, 256, 4, 3), (32, 64, 4, 4), (64, 128, 8, 3),
                  (16, 64, 4, 4), (64, 64, 4, 3), (32, 256, 8, 3)]
    return tuned(int4_rows_kernel, shapes, ["n_pad", "half", "ROWS", "GROUP"], "BLOCK_K")


@functools.cache
def _int4_row_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int4_row_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, m, n, n_pad, half, sx_m, so_m,
                        ROWS: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        # One activation row, blocks of GROUPS whole groups. Products pile up elementwise in a
        # [BLOCK_N, GROUPS, GROUP] accumulator summed once at the end: a sum across threads per group
        # and block (the dot kernel's one-row form) cost more than the 64 bytes of weight it covered.
        # The dot kernel's arguments, so that `launch` runs either; m, the strides, ROWS and PRECISION
        # say nothing new for one row.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = cols < n
        g = tl.arange(0, GROUPS)
        within = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        acc = tl.zeros((BLOCK_N, GROUPS, GROUP), tl.float32)
        for start in tl.range(0, half, GROUPS * GROUP):
            live_g = start + g * GROUP < half  # half holds whole groups, maybe not whole blocks
            b = tl.load(w_ptr + cols[:, None, None] * half + start + within[None, :, :],
                        mask=live_n[:, None, None] & live_g[None, :, None], other=0)
            for h in tl.static_range(2):
                q = ((b >> (4 * h)) & 15).to(tl.float32)
                x = tl.load(x_ptr + h * half + start + within, mask=live_g[:, None], other=0.0).to(tl.float32)
                off = ((((h * half + start) // GROUP) + g)[None, :] * n_pad + cols[:, None]) * 2
                live = live_n[:, None] & live_g[None, :]
                s = tl.load(sz_ptr + off, mask=live, other=0.0).to(tl.float32)
                z = tl.load(sz_ptr + off + 1, mask=live, other=0.0).to(tl.float32)
                acc += (q * s[:, :, None] + (z - 8.0 * s)[:, :, None]) * x[None, :, :]
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=live_n)

    # (BLOCK_N, GROUPS, warps, stages): 1-8 KB of weight a step at group 128, 0.5-2 KB at group 32
    shapes = [(4, 4, 4, 3), (2, 8, 4, 3), (8, 2, 4, 3), (8, 4, 4, 3), (4, 8, 8, 3), (16, 1, 4, 4),
              (2, 4, 2, 4), (16, 2, 8, 3), (4, 16, 4, 3), (2, 16, 4, 3)]
    return tuned(int4_row_kernel, shapes, ["n_pad", "half", "GROUP"], "GROUPS")


def int4_supported(k: int, group_size: int) -> bool:
    """The layout splits each row into halves: whole groups in each, and whole blocks of bytes."""
    return k % (2 * INT4_PAIR_BLOCK) == 0 and (k // 2) % group_size == 0


@torch.library.custom_op("mistral7b::int4_rows_mm", mutates_args=())
def int4_rows_mm(x: Tensor, packed: Tensor, group_size: int, scales_zeros: Tensor, n: int,
                 invariant: bool = False) -> Tensor:
    """x [M <= 64, K] @ the int4 weight [N, K]^T held as `packed` uint8 [N_pad, K / 2] (`kernels.pack_int4_rows`)
    and `scales_zeros` [G, N_pad, 2] (tinygemm's); w = (q - 8) * scale + zero. `invariant`: as int8_rows_mm's."""
    return int4_rows(x, packed, group_size, scales_zeros, n, invariant=invariant)


def int4_rows(x: Tensor, packed: Tensor, group_size: int, scales_zeros: Tensor, n: int,
              config: dict | None = None, invariant: bool = False) -> Tensor:
    check_rows(x, "int4_rows_mm", invariant)
    m, k = x.shape
    if not int4_supported(k, group_size) or packed.shape[-1] * 2 != k:
        raise ValueError(f"int4_rows_mm wants K a multiple of {2 * INT4_PAIR_BLOCK} holding whole groups in each half "
                         f"and packed [N, K / 2], got K {k}, group {group_size}, packed {tuple(packed.shape)}")
    n_pad = scales_zeros.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m:
        pow2 = group_size & (group_size - 1) == 0  # the one-row kernel's tl.arange over a group wants it
        args = (x, packed, scales_zeros, out, m, n, n_pad, k // 2, x.stride(0), out.stride(0))
        launch(lambda one_row: _int4_row_kernel() if one_row and pow2 else _int4_kernel(one_row), "int4", m, n,
               args, config, invariant, GROUP=group_size, PRECISION=precision(x))
    return out


@int4_rows_mm.register_fake
def _(x, packed, group_size, scales_zeros, n, invariant=False):
    return x.new_empty(x.shape[0], n)
