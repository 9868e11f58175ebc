"""Batch-invariant CUDA kernels (issue 26): a row's result does not depend on how many rows share its
launch, where it sits among them, or what they hold.

cuBLAS picks its kernel (and split-K) from M, inductor picks reduction tiles per compiled graph, and a
tile of another shape sums a row's products in another order, so a request's logits changed in the
last bits with its batch. Here every reduction a row goes through has one order, fixed per dtype:

- `invariant_mm`: x @ w.T with one tile (BLOCK_M, BLOCK_N, BLOCK_K) per dtype, the K axis walked in
  order by one program (no split-K, no autotuning); M only changes how many tiles run. A row's output
  element is one dot product, computed by the same instructions whatever the other rows of its tile.
- `invariant_rms_norm`: one program per row over the whole row (a fixed reduction tree).

The idea is "Defeating Nondeterminism in LLM Inference" (Thinking Machines, thinking-machines-lab/
batch_invariant_ops) and vLLM's VLLM_BATCH_INVARIANT; the code is our own. Both are custom ops, so
torch.compile and CUDA graphs treat each as one launch. `apply` switches a model (its linears, norms,
quantized matmuls and attention; see `apply`). Triton is imported on first use, never on the CPU path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .model import RMSNorm

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per dtype. BLOCK_M is tl.dot's smallest row tile, since
# decode (a few rows) is what this mode is measured on; narrow bands give a 4,096-wide matrix 128
# programs, enough to keep an H200's weight reads going. Changing a tile changes every result's bits.
# The 16-bit tile is the fastest of benchmarks/invariant_tiles.py's sweep on an H100 (2026-12-05): 1.01 of
# cuBLAS's speed at 1 and 8 rows, where (16, 32, 128, 4, 4) ran at 0.93. float16 takes it unmeasured.
TILES = {torch.bfloat16: (16, 32, 256, 4, 3), torch.float16: (16, 32, 256, 4, 3), torch.float32: (16, 32, 64, 4, 3)}


@functools.cache
def _mm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def invariant_mm_kernel(x_ptr, w_ptr, out_ptr, m, n, k, sx_m, sw_n, so_m, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Row tiles vary fastest, so the programs sharing a band of weight rows run together and read
        # it from L2 once (prefill); M never reaches the order of the K loop.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(m, BLOCK_M)
        rows = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for start in tl.range(0, k, BLOCK_K):
            kk = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * sx_m + kk[None, :], mask=(rows[:, None] < m) & (kk[None, :] < k),
                        other=0.0)
            w = tl.load(w_ptr + cols[:, None] * sw_n + kk[None, :], mask=(cols[:, None] < n) & (kk[None, :] < k),
                        other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None] * so_m + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    return invariant_mm_kernel


def tile(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    if dtype not in TILES:
        raise ValueError(f"invariant_mm runs bfloat16, float16 or float32, got {dtype}")
    return TILES[dtype]


@torch.library.custom_op("mistral7b::invariant_mm", mutates_args=())
def invariant_mm(x: Tensor, w: Tensor) -> Tensor:
    """x [M, K] @ w [N, K]^T -> [M, N] in x's dtype (float32 accumulation)."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != x.dtype:
        raise ValueError(f"invariant_mm: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype} do not match")
    block_m, block_n, block_k, warps, stages = tile(x.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    grid = (-(-m // block_m) * -(-n // block_n),)
    _mm_kernel()[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                       PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


@invariant_mm.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear through `invariant_mm`: x [..., K]."""
    out = invariant_mm(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


@functools.cache
def _rms_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def invariant_rms_kernel(x_ptr, w_ptr, out_ptr, d, sx, so, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * sx + cols, mask=cols < d, other=0.0).to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, 0) / d + eps)
        w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
        # Rounded to x's dtype before the weight, as model.rms_norm does; the product of two 16-bit
        # values is exact in float32, so one rounding gives torch's result for it.
        out = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(out_ptr + row * so + cols, out.to(out_ptr.dtype.element_ty), mask=cols < d)

    return invariant_rms_kernel


@torch.library.custom_op("mistral7b::invariant_rms_norm", mutates_args=())
def invariant_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.rms_norm over the last axis of x [M, D], one program per row."""
    m, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(m, d, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    if m:
        block = triton_block(d)
        _rms_kernel()[(m,)](x, weight, out, d, x.stride(0), out.stride(0), eps, BLOCK=block,
                            num_warps=8 if block >= 2048 else 4)
    return out


@invariant_rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def triton_block(d: int) -> int:
    return 1 << (d - 1).bit_length()


class InvariantLinear(nn.Linear):
    """nn.Linear through `invariant_mm` (`apply` swaps the class in place: same parameters, same state)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class InvariantRMSNorm(RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        return invariant_rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


SWAPS = {nn.Linear: InvariantLinear, RMSNorm: InvariantRMSNorm}


def apply(model: nn.Module, on: bool) -> int:
    """Make `model` batch-invariant on CUDA (`on`), or undo it; the number of modules switched.

    Dense linears and RMSNorms change class (parameters and state dict unchanged); quantized modules
    run `rows_kernel` "invariant" (one Triton kernel variant and tile for every M, int4 in the "halves"
    layout, else dequantized into `invariant_mm`); `model.batch_invariant` makes attention use a
    split plan fixed by the key count and an ordered merge for decode, and prefill one row at a time.
    Not covered: LoRA deltas (torch matmuls on the adapter rows) and a tensor-parallel model (refused)."""
    from .quant.config import cuda_rows_kernel
    from .quant.kernels import INVARIANT
    from .quant.linear import QuantModule

    if on and getattr(model, "tensor_parallel_size", 1) > 1:
        raise ValueError("batch_invariant on CUDA does not run with tensor parallelism: "
                         "use one GPU, or batch_invariant=False")
    if not on and not getattr(model, "batch_invariant", False):
        return 0  # never switched: nothing to undo
    swaps = SWAPS if on else {new: old for old, new in SWAPS.items()}
    switched = 0
    for module in model.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
            switched += 1
        elif isinstance(module, QuantModule):
            module.set_rows_kernel(INVARIANT if on else cuda_rows_kernel())
            switched += 1
    model.batch_invariant = on
    return switched


def configure(model: nn.Module, device: torch.device, batch_invariant: bool) -> None:
    """What an engine on `device` does with EngineConfig.batch_invariant: on CUDA, `apply` it (on or off);
    elsewhere nothing, the CPU's kernels being invariant already (quant/cpu_kernels_c.py)."""
    if torch.device(device).type == "cuda":
        apply(model, batch_invariant)
