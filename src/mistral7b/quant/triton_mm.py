"""Weight-only matmuls for few rows (decode) in Triton: int8 per channel, and int4 groups read straight
from tinygemm's tile layout (`kernels.pack_int4` on CUDA), so one packed weight serves both kernels.

Decode is bound by weight bytes. Each program streams a band of weight rows once, widens it in registers
and multiplies all M <= 64 activation rows on the tensor cores, so each weight byte is read once whatever
M is. Tile shapes are autotuned per matrix shape on first use. Measured at the 7B shape on an H200
(benchmarks/gemv_bench.py, 2026-12-04): the int8 kernel reads at 1.8-3.4 TB/s and is the CUDA default
for up to 64 rows (`kernels.pick_rows_kernel`); the int4 one reaches only 0.1-0.8 TB/s (tinygemm 1.3-1.9 at
one row), so int4 stays on tinygemm unless MISTRAL7B_CUDA_ROWS_KERNEL=triton. Tests run both kernels
in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

MAX_ROWS = 64  # activation rows in one tl.dot tile at most; more rows go to torch's kernels


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuned(kernel, shapes: list[tuple[int, int, int, int]], key: list[str], field: str):
    """`kernel` autotuned over (BLOCK_N, <field>, warps, stages) on a GPU; the first shape when
    interpreted (the interpreter would run every one)."""
    import triton

    configs = [triton.Config({"BLOCK_N": bn, field: f}, num_warps=w, num_stages=s) for bn, f, w, s in shapes]
    return triton.autotune(configs[:1] if interpreting() else configs, key=key)(kernel)


@functools.cache
def _int8_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_rows_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, m, n, k, sx_m, sq_n, so_m,
                         ROWS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        band = tl.program_id(0)
        rows = tl.arange(0, ROWS)
        cols = band * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        for start in tl.range(0, k, BLOCK_K):
            kk = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * sx_m + kk[None, :], mask=(rows[:, None] < m) & (kk[None, :] < k),
                        other=0.0)
            w = tl.load(q_ptr + cols[:, None] * sq_n + kk[None, :], mask=(cols[:, None] < n) & (kk[None, :] < k),
                        other=0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        scale = tl.load(scale_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        tl.store(out_ptr + rows[:, None] * so_m + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    shapes = [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 4), (16, 512, 4, 3),
              (32, 512, 8, 3), (64, 128, 4, 3), (64, 256, 8, 3)]
    return tuned(int8_rows_kernel, shapes, ["n", "k", "ROWS"], "BLOCK_K")


def precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def row_tile(m: int) -> int:
    """The dot's row tile: 16 (the smallest) up to 64, a power of two (one compiled variant each)."""
    return max(16, 1 << (m - 1).bit_length())


def check_rows(x: Tensor, name: str) -> None:
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name} takes at most {MAX_ROWS} rows, got {x.shape[0]}")


def launch(tuned_kernel, grid, args, config: dict | None, **constants) -> None:
    """Run the autotuned kernel, or with `config` (tile sizes, warps) one variant of it (tests)."""
    if config is None:
        tuned_kernel[grid](*args, **constants)
    else:
        tuned_kernel.fn[grid](*args, **constants, **config)


@torch.library.custom_op("mistral7b::int8_rows_mm", mutates_args=())
def int8_rows_mm(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [M <= 64, K] @ (q [N, K] int8 * scale [N])^T -> [M, N] in x's dtype."""
    return int8_rows(x, q, scale)


def int8_rows(x: Tensor, q: Tensor, scale: Tensor, config: dict | None = None) -> Tensor:
    check_rows(x, "int8_rows_mm")
    m, k = x.shape
    n = q.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (-(-n // meta["BLOCK_N"]),)  # noqa: E731
    launch(_int8_kernel(), grid, (x, q, scale, out, m, n, k, x.stride(0), q.stride(0), out.stride(0)), config,
           ROWS=row_tile(m), PRECISION=precision(x))
    return out


@int8_rows_mm.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


@functools.cache
def _int4_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int4_tiles_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, m, n, n_pad, k, group_size, sx_m, so_m,
                          ROWS: tl.constexpr, PRECISION: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                          BLOCK_N: tl.constexpr, TILES: tl.constexpr):
        # tinygemm's layout with 8 inner k-tiles (kernels._tile_index_order): weight row n = (nt, r), r < 8;
        # a k-tile of 128 inputs of that row is 16 consecutive int32 words, word j = 4 c + i2 holding at
        # nibble s = 4 low + 2 a + b the input 32 i2 + 16 a + 8 b + 2 c + low. Each nibble position s is
        # one dot over the 16 words, the activations gathered in that order. Where a group spans the tile,
        # q - 8 enters the dot as exact integers and scale and zero apply to the sums: s sum x (q - 8) + z sum x.
        WORDS: tl.constexpr = 16
        TILE: tl.constexpr = 128
        band = tl.program_id(0)
        cols = band * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, ROWS)
        live_n = cols < n_pad
        live_m = rows[:, None] < m
        tiles = k // TILE
        row_base = (cols // 8) * tiles * TILE + (cols % 8) * WORDS
        j = tl.arange(0, WORDS)
        k_word = (j % 4) * 32 + (j // 4) * 2
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        for first in tl.range(0, tiles, TILES):
            for u in tl.static_range(TILES):
                t = first + u
                live = live_n & (cols * 0 + t < tiles)  # a tensor: the interpreter wants tensor masks
                words = tl.load(w_ptr + row_base[:, None] + t * TILE + j[None, :], mask=live[:, None], other=0)
                if SCALE_PER_TILE:
                    off = ((t * TILE) // group_size * n_pad + cols) * 2
                    scale = tl.load(sz_ptr + off, mask=live, other=0.0).to(tl.float32)
                    zero = tl.load(sz_ptr + off + 1, mask=live, other=0.0).to(tl.float32)
                else:  # groups of 32 or 64: a scale per word (the group follows i2)
                    off = (((t * TILE + k_word) // group_size)[None, :] * n_pad + cols[:, None]) * 2
                    scale = tl.load(sz_ptr + off, mask=live[:, None], other=0.0).to(tl.float32)
                    zero = tl.load(sz_ptr + off + 1, mask=live[:, None], other=0.0).to(tl.float32)
                part = tl.zeros((ROWS, BLOCK_N), tl.float32)
                x_sum = tl.zeros((ROWS,), tl.float32)
                for s in tl.static_range(8):
                    kk = t * TILE + k_word + ((s // 2) % 2) * 16 + (s % 2) * 8 + s // 4
                    x = tl.load(x_ptr + rows[:, None] * sx_m + kk[None, :], mask=live_m & (rows[:, None] * 0 + t < tiles),
                                other=0.0)
                    q = ((words >> (4 * s)) & 15).to(tl.float32) - 8.0
                    if SCALE_PER_TILE:
                        part += tl.dot(x, tl.trans(q.to(x.dtype)), input_precision=PRECISION)
                        x_sum += tl.sum(x.to(tl.float32), axis=1)
                    else:
                        part += tl.dot(x, tl.trans((q * scale + zero).to(x.dtype)), input_precision=PRECISION)
                if SCALE_PER_TILE:
                    acc += part * scale[None, :] + x_sum[:, None] * zero[None, :]
                else:
                    acc += part
        tl.store(out_ptr + rows[:, None] * so_m + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    shapes = [(16, 1, 4, 3), (16, 2, 4, 3), (32, 1, 4, 3), (32, 2, 4, 3), (64, 1, 4, 3), (64, 2, 8, 3),
              (32, 4, 4, 2), (128, 1, 8, 3)]
    return tuned(int4_tiles_kernel, shapes, ["n_pad", "k", "group_size", "ROWS"], "TILES")


def int4_supported(packed: Tensor) -> bool:
    """The kernel reads tinygemm's layout with 8 inner k-tiles (input widths that are multiples of 128)."""
    return packed.shape[-1] == 4


@torch.library.custom_op("mistral7b::int4_tiles_mm", mutates_args=())
def int4_tiles_mm(x: Tensor, packed: Tensor, group_size: int, scales_zeros: Tensor, n: int) -> Tensor:
    """x [M <= 64, K] @ the int4 weight [N, K]^T held in tinygemm's CUDA layout: `packed` int32
    [N_pad / 8, K / 128, 32, 4], `scales_zeros` [G, N_pad, 2]; w = (q - 8) * scale + zero."""
    return int4_tiles(x, packed, group_size, scales_zeros, n)


def int4_tiles(x: Tensor, packed: Tensor, group_size: int, scales_zeros: Tensor, n: int,
               config: dict | None = None) -> Tensor:
    check_rows(x, "int4_tiles_mm")
    if not int4_supported(packed):
        raise ValueError("int4_tiles_mm reads tinygemm's layout with 8 inner k-tiles (input widths that are "
                         f"multiples of 128), got {2 * packed.shape[-1]}")
    m, k = x.shape
    n_pad = scales_zeros.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (-(-n_pad // meta["BLOCK_N"]),)  # noqa: E731
    args = (x, packed, scales_zeros, out, m, n, n_pad, k, group_size, x.stride(0), out.stride(0))
    launch(_int4_kernel(), grid, args, config, ROWS=row_tile(m), PRECISION=precision(x),
           SCALE_PER_TILE=group_size % 128 == 0)
    return out


@int4_tiles_mm.register_fake
def _(x, packed, group_size, scales_zeros, n):
    return x.new_empty(x.shape[0], n)
