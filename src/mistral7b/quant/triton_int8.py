"""int8 weight-only matmul for few rows (decode) in Triton: x [M, K] bf16 @ (q [N, K] int8 * scale [N])^T.

Decode is bound by weight bytes, so int8 should run at about twice bf16's speed. The compiled reduction
in `kernels.int8_mm_cuda` does at batch 1 (159.5 tok/s at the 7B shape, bf16 205.9) but not at 8 rows
(75.3 tok/s, slower than batch 1; H200, 2026-12-04). Here each program streams a band of weight rows
once, widens them to bf16 in registers and multiplies all M <= 16 activation rows on the tensor cores,
so every weight byte is read once whatever M is.

Not yet measured on a GPU: `kernels.int8_mm_cuda` uses it only when `CUDA_INT8_KERNEL` is "triton"
(benchmarks/gpu_smoke.py and quant_bench.py compare). Tests run it in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

MAX_ROWS = 16  # one tl.dot tile of activation rows; more rows go to cuBLAS
BLOCK_K = 128


def block_n(n: int) -> int:
    """Weight rows per program: narrow bands for narrow matrices, so that even wo (4,096 rows) gives 256
    programs to spread over 132 multiprocessors."""
    return 16 if n <= 8192 else 32


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_rows_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, m, n, k, sx_m, sq_n, so_m,
                         ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        band = tl.program_id(0)
        rows = tl.arange(0, ROWS)
        cols = band * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        for start in tl.range(0, k, BLOCK):
            kk = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + rows[:, None] * sx_m + kk[None, :], mask=(rows[:, None] < m) & (kk[None, :] < k),
                        other=0.0)
            w = tl.load(q_ptr + cols[:, None] * sq_n + kk[None, :], mask=(cols[:, None] < n) & (kk[None, :] < k),
                        other=0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        scale = tl.load(scale_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        tl.store(out_ptr + rows[:, None] * so_m + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    return int8_rows_kernel


@torch.library.custom_op("mistral7b::int8_rows_mm", mutates_args=())
def int8_rows_mm(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [M <= 16, K] @ (q [N, K] int8 * scale [N])^T -> [M, N] in x's dtype."""
    m, k = x.shape
    n = q.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"int8_rows_mm takes at most {MAX_ROWS} rows, got {m}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    width = block_n(n)
    _kernel()[(-(-n // width),)](x, q, scale, out, m, n, k, x.stride(0), q.stride(0), out.stride(0),
                                 ROWS=MAX_ROWS, BLOCK_N=width, BLOCK=BLOCK_K,
                                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return out


@int8_rows_mm.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])
