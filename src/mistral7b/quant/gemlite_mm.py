"""int4 groups through gemlite's Triton kernels (GEMV for 1-4 rows, split-K GEMM up to 64): an optional CUDA
extra (`pip install gemlite`), picked with MISTRAL7B_CUDA_ROWS_KERNEL=gemlite (`kernels.pick_rows_kernel`).

Why: tinygemm's few-row kernel reads the int4 weight once per 8 rows at best, and at 8 rows took 5.10 ms a
7B step against 2.21 at one (H200, benchmarks/gemv_bench.py); gemlite's split-K GEMM streams each weight
byte once for all rows.

The "gemlite" layout is gemlite's own, so that its kernels read the module's buffers with no copy:
- `packed` int32 [K / 8, N]: word [c, n] holds inputs 8c..8c+7 of output n, input 8c + i at bit 4i;
- `scales_zeros` bf16 [2, G, N]: the group scales s and offsets z - 8 s, so that gemlite's fused
  multiply-add form q * s + (z - 8 s) is our (q - 8) * s + z.
Unpacking gives the offset back as (z - 8 s) + 8 s in float32: the weight as this layout holds it.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

NIBBLES = 8  # int4 values per int32 word


def available() -> bool:
    return importlib.util.find_spec("gemlite") is not None


def require() -> None:
    """Check that gemlite is installed, and have it add its split-K partial sums in float32. Its default
    on Hopper adds them into the bf16 output (`tl.atomic_add`): K / 16 roundings per output at one row,
    a relative error of 3.4e-2 on an H100 (7B ffn_down, benchmarks/gemv_bench.py), ten times tinygemm's;
    emulated in torch, float32 sums bring it to about 4e-3. The setting is gemlite's, for the process."""
    if not available():
        raise ValueError("MISTRAL7B_CUDA_ROWS_KERNEL=gemlite needs the gemlite package (pip install gemlite)")
    import gemlite

    gemlite.set_native_atomic_bfp16(False)


def supported(k: int, group_size: int) -> bool:
    """gemlite wants the input width a multiple of 32 holding whole groups of at least 16."""
    return k % 32 == 0 and group_size >= 16 and k % group_size == 0


def packed_shape(n: int, k: int) -> tuple[tuple[int, ...], torch.dtype]:
    return (k // NIBBLES, n), torch.int32


def scales_shape(n: int, k: int, group_size: int) -> tuple[int, ...]:
    return (2, k // group_size, n)


def _shifts(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.arange(0, 32, 4, device=device, dtype=dtype)


def pack(q: Tensor) -> Tensor:
    """uint8 [N, K] in 0..15 -> int32 [K / 8, N] (the words built in int64, then wrapped to int32)."""
    n, k = q.shape
    words = (q.view(n, k // NIBBLES, NIBBLES).to(torch.int64) << _shifts(q.device, torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous()


def unpack(packed: Tensor, n: int) -> Tensor:
    """The inverse of `pack`: uint8 [N, K] (the first n outputs)."""
    words = packed[:, :n].t()
    return ((words[..., None] >> _shifts(packed.device, torch.int32)) & 15).reshape(n, -1).to(torch.uint8)


def pack_scales_zeros(scale: Tensor, zero: Tensor, device: torch.device) -> Tensor:
    """[N, G] scales and offsets (float) -> [2, G, N] bf16: s and z - 8 s, with s as stored (in bf16), so
    that q s + (z - 8 s) is (q - 8) s + z up to the offset's rounding."""
    scale = scale.to(device, torch.bfloat16).float()
    return torch.stack([scale.t(), (zero.to(device, torch.float32) - 8 * scale).t()]).to(torch.bfloat16).contiguous()


def unpack_scales_zeros(scales_zeros: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """[N, G] float32 scales and offsets z = (z - 8 s) + 8 s of the first n outputs."""
    s = scales_zeros[0, :, :n].t().float()
    return s.contiguous(), (scales_zeros[1, :, :n].t().float() + 8 * s).contiguous()


def dequantize(packed: Tensor, scales_zeros: Tensor, group_size: int, n: int) -> Tensor:
    """The bf16 weight [N, K]: q * s + (z - 8 s) rounded once, as gemlite's fused multiply-add does."""
    q = unpack(packed, n)
    k = q.shape[1]
    s, off = (t[:, :n].t()[..., None].float() for t in scales_zeros)
    return (q.view(n, k // group_size, group_size).float() * s + off).to(torch.bfloat16).view(n, k)


def meta_args(group_size: int) -> list[int]:
    """gemlite's integer arguments for bf16 x int4 groups with float offsets: what `GemLiteLinear.get_meta_args`
    gives after `pack(..., fma_mode=True)` (benchmarks/gemv_bench.py checks it on a GPU). Built per call from
    constants, so that a compiled step traces them as such. In order: activations unscaled, 4 bits, the
    group, the nibble mask, values per word, input and output dtypes, gemlite's accumulator for bf16, the
    scales' dtype, no channel scales, group mode 4 (q * s + offset), contiguous words."""
    from gemlite import DType
    from gemlite.core import GEMLITE_ACC_DTYPE

    bf16 = DType.BF16.value
    return [0, 4, group_size, 15, NIBBLES, bf16, bf16, GEMLITE_ACC_DTYPE[DType.BF16].value, bf16, 0, 4, 1]


def mm(x2: Tensor, packed: Tensor, scales_zeros: Tensor, group_size: int, n: int) -> Tensor:
    """x2 [M, K] @ the weight^T -> [M, N] in x2's dtype (gemlite picks GEMV or split-K GEMM by M)."""
    xb = x2 if x2.dtype == torch.bfloat16 and x2.is_contiguous() else x2.to(torch.bfloat16).contiguous()
    scales, offsets = scales_zeros[0], scales_zeros[1]
    meta = meta_args(group_size)  # first: its import of gemlite registers the op looked up below
    # The fourth tensor is a meta-scale that gemlite reads only for groups of 16 (NVFP4): never here.
    out = torch.ops.gemlite.forward_functional(xb, None, [packed, scales, offsets, scales], meta, -1)
    out = out if out.shape[-1] == n else out[:, :n]
    return out if out.dtype == x2.dtype else out.to(x2.dtype)
