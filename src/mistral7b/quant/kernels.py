"""Device kernels for weight-only quantized matmuls, and the packing they need.

Measured on the project's 2-core CPUs (one with AVX-512; on 2026-12-02 an AVX2-only AMD EPYC) and on
an H200 (benchmarks/quant_bench.py):

- int4 groups: torch's tinygemm ops. CPU `_weight_int4pack_mm_for_cpu`, CUDA `_weight_int4pack_mm`
  (tile-packed). Both want bf16 activations and bf16 scales/zeros, so activations are cast to bf16
  at the call and the result cast back: the residual stream, norms and attention keep the model's dtype.
  On CUDA a large batch of rows (prefill) dequantizes the tiles to bf16 and uses cuBLAS instead.
- int8 per channel: CPU `_weight_int8pack_mm`; CUDA: see `int8_mm_cuda` (a fused reduction in compiled
  decode, cuBLAS on the cast weight otherwise).
- int8 groups (GGUF Q8_0, Q6_K, Q5_K): on CPU split exactly into two int4 planes,
  q = 16 * hi + lo with hi in -8..7 and lo in 0..15, each run by the int4 kernel (one int8 matmul is
  slower than two int4 ones there); elsewhere dequantize and matmul.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batch_invariant import linear as invariant_linear
from ..utils import own_code
from . import gemlite_mm
from .triton_mm import MAX_ROWS, int4_rows_mm, int4_supported, int8_rows_mm

CUDA_DEQUANT_ROWS = 64  # from this many rows on, CUDA dequantizes int4 tiles and uses cuBLAS
# Few-row (decode) CUDA matmuls per format: "torch" (tinygemm for int4, a compiled reduction for int8) or
# "triton" (`triton_mm`, on the same packed weights). "auto" takes what measured faster at the 7B shape on
# an H200 (benchmarks/gemv_bench.py, 2026-12-04; one step's weight matmuls, bf16 cuBLAS 3.82 ms):
# int8: Triton, 2.79 ms at 1 row, 3.00 at 8, 5.30 at 64 (end to end 275.9 tok/s at batch 1 against the
# reduction's 155.6, 2,187 at batch 8 against 75); int4: tinygemm, 2.20 ms at 1 row (5.10 at 8), where
# Triton's took 11.5-13.6 on tinygemm's tiles and, on the halves layout (2026-12-05), 3.11 at 1 row and
# 8.09 at 8 (end to end 112.6 tok/s at batch 1, about the 8-row kernel's time: not yet explained).
# Each quantized module carries its setting (`QuantModule.rows_kernel`, from
# MISTRAL7B_CUDA_ROWS_KERNEL when the load is planned: config.cuda_rows_kernel).
MEASURED_ROWS_KERNEL = {"int8": "triton", "int4": "torch"}
# The setting batch_invariant.apply gives every quantized module (never read from the environment): all M
# through one Triton launch whose sums per row do not depend on M (triton_mm.INVARIANT_CONFIG), or, for a
# layout it cannot read, the weight dequantized (elementwise, exact) into batch_invariant.invariant_mm.
INVARIANT = "invariant"


def pick_rows_kernel(kind: str, setting: str) -> str:
    """The CUDA kernel for few rows of `kind` ("int8" or "int4") weights under `setting` (auto, torch,
    triton, gemlite (int4 only: int8 then takes auto's), or INVARIANT)."""
    if setting == "auto" or (setting == "gemlite" and kind != "int4"):
        return MEASURED_ROWS_KERNEL[kind]
    return setting


KERNEL_GROUP_SIZES = (32, 64, 128, 256)


# ------------------------------------------------------------------------------ int4 packing


def inner_k_tiles(k: int) -> int:
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2


def padded_rows(n: int, device: torch.device) -> int:
    """Rows rounded up to the kernel's block (16 on CPU, 8 on CUDA); the padding rows are zero."""
    block = 8 if device.type == "cuda" else 16
    return -(-n // block) * block


def check_int4_shape(n: int, k: int, group_size: int, device: torch.device) -> None:
    if group_size not in KERNEL_GROUP_SIZES:
        raise ValueError(f"int4 groups of {group_size} are not supported by the kernels "
                         f"(supported: {', '.join(map(str, KERNEL_GROUP_SIZES))})")
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide its input width {k}")
    if device.type == "cuda" and k % 32:
        raise ValueError(f"the CUDA int4 kernel needs an input width that is a multiple of 32, got {k}")


def int4_layout(k: int, group_size: int, device: torch.device, rows_kernel: str = "auto") -> str:
    """How a device holds int4 weights: "cpu" (torch's CPU op), "tiles" (tinygemm on CUDA), "halves"
    (`triton_mm.int4_rows_mm`: byte j of a row holds inputs j and K/2 + j) or "gemlite" (`gemlite_mm`),
    chosen with the few-row kernel."""
    if device.type != "cuda":
        return "cpu"
    kernel = pick_rows_kernel("int4", rows_kernel)
    if kernel == "gemlite":
        gemlite_mm.require()
        if gemlite_mm.supported(k, group_size):
            return "gemlite"
    wants_triton = kernel in ("triton", INVARIANT)
    return "halves" if wants_triton and int4_supported(k, group_size) else "tiles"


def packed_shape(n: int, k: int, device: torch.device, layout: str | None = None) -> tuple[tuple[int, ...], torch.dtype]:
    n = padded_rows(n, device)
    layout = layout or ("tiles" if device.type == "cuda" else "cpu")
    if layout == "gemlite":
        return gemlite_mm.packed_shape(n, k)
    if layout == "tiles":
        ikt = inner_k_tiles(k)
        return (n // 8, k // (ikt * 16), 32, ikt // 2), torch.int32
    return (n, k // 2), torch.uint8


def scales_zeros_shape(n: int, k: int, group_size: int, device: torch.device, layout: str) -> tuple[int, ...]:
    """tinygemm's [G, N_padded, 2] (tiles and halves), or gemlite's [2, G, N_padded]."""
    rows = padded_rows(n, device)
    if layout == "gemlite":
        return gemlite_mm.scales_shape(rows, k, group_size)
    return (k // group_size, rows, 2)


def unpack_scales_zeros(scales_zeros: Tensor, n: int, layout: str = "tiles") -> tuple[Tensor, Tensor]:
    """The inverse of `pack_scales_zeros`: the first n rows' [N, G] float32 scales and zeros, on the CPU."""
    if layout == "gemlite":
        return tuple(t.cpu() for t in gemlite_mm.unpack_scales_zeros(scales_zeros, n))
    sz = scales_zeros[:, :n].float().cpu()
    return sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()


CPU_PACK_ROWS = 1024  # rows packed per call on CPU: a multiple of the op's row blocks (16, 32 or 64)


def pack_int4(q: Tensor, device: torch.device, layout: str | None = None) -> Tensor:
    """uint8 [N, K] in 0..15 -> `layout` (default: the device's first, see int4_layout) on that device."""
    pad = padded_rows(q.shape[0], device) - q.shape[0]
    q = q.to(device)
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
    if layout == "halves":
        half = q.shape[1] // 2
        return (q[:, :half] | q[:, half:] << 4).contiguous()
    if layout == "gemlite":
        return gemlite_mm.pack(q)
    if device.type == "cuda":
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(q.shape[1]))
    # The CPU op packs each block of rows on its own, into consecutive rows of its output, and wants
    # int32 input: packing a few blocks at a time keeps that 4-bytes-per-value copy in cache (a whole
    # 49k-row head at once costs seconds). tests/test_quant.py checks it against one whole call.
    out = torch.empty(q.shape[0], q.shape[1] // 2, dtype=torch.uint8)
    for lo in range(0, q.shape[0], CPU_PACK_ROWS):
        rows = q[lo : lo + CPU_PACK_ROWS].to(torch.int32).contiguous()
        out[lo : lo + rows.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
    return out


def unpack_int4(packed: Tensor, n: int, k: int) -> Tensor:
    """The inverse of `pack_int4`: uint8 [N, K] on the packed tensor's device."""
    rows = padded_rows(n, packed.device)
    if is_halves(packed):
        return torch.cat([packed & 15, packed >> 4], dim=1)[:n]
    if is_gemlite(packed):
        return gemlite_mm.unpack(packed, n)
    if packed.is_cuda:
        return unpack_cuda_tiles(packed, rows, k)[:n]
    source = _cpu_nibble_sources(rows, k)
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
    out = torch.empty(rows * k, dtype=torch.uint8)
    out[source] = nibbles
    return out.view(rows, k)[:n]


def is_halves(packed: Tensor) -> bool:
    """Whether a packed int4 weight is in the "halves" layout (on CUDA bytes; tinygemm's tiles are int32)."""
    return packed.is_cuda and packed.dtype == torch.uint8


def stored_rows(packed: Tensor, scales_zeros: Tensor) -> int:
    """The output rows a CUDA int4 weight stores, padding included."""
    return packed.shape[1] if is_gemlite(packed) else scales_zeros.shape[1]


def is_gemlite(packed: Tensor) -> bool:
    """Whether a packed int4 weight is in gemlite's layout (int32 [K / 8, N]; tinygemm's tiles are 4-D)."""
    return packed.is_cuda and packed.dim() == 2 and packed.dtype == torch.int32


@functools.lru_cache(maxsize=8)
def _cpu_nibble_sources(n: int, k: int) -> Tensor:
    """Which element of [N, K] each nibble of the CPU packed layout holds. The layout depends on the
    CPU build (AVX-512 or not), so it is read off the op itself: pack the element indices 4 bits at
    a time and reassemble them from the packed nibbles."""
    index = torch.arange(n * k, dtype=torch.int64)
    source = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
        digit = ((index >> shift) & 15).to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        source |= torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64) << shift
    return source


def _tile_index_order(n: int, k: int):
    """[N, K] viewed as the tinygemm B-layout's factors (see int4mm.cu, matrix_to_m16n8k16_Bint4_layout):
    n = (nt, r) with r < 8; k = (ko, i2, a, b, c, low) with sizes (., ikt/2, 2, 2, 4, 2). Each int32
    word of the packed tensor [nt, ko, t = 4r + c, i2] holds 8 nibbles ordered (low, a, b)."""
    ikt = inner_k_tiles(k)
    return (n // 8, 8, k // (ikt * 16), ikt // 2, 2, 2, 4, 2)


def unpack_cuda_tiles(packed: Tensor, n: int, k: int) -> Tensor:
    nt, r, ko, i2, a, b, c, low = _tile_index_order(n, k)
    words = packed.view(nt, ko, r, c, i2, 1)
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = ((words >> shifts) & 15).view(nt, ko, r, c, i2, low, a, b)
    # -> [nt, r, ko, i2, a, b, c, low]
    return nibbles.permute(0, 2, 1, 4, 6, 7, 3, 5).reshape(n, k).to(torch.uint8)


def pack_cuda_tiles_reference(q: Tensor) -> Tensor:
    """The tile layout built with tensor ops (the inverse of `unpack_cuda_tiles`): the GPU benchmark
    checks it against torch's `_convert_weight_to_int4pack`, which is what loading uses."""
    n, k = q.shape
    nt, r, ko, i2, a, b, c, low = _tile_index_order(n, k)
    parts = q.to(torch.int64).view(nt, r, ko, i2, a, b, c, low).permute(0, 2, 1, 6, 3, 7, 4, 5)
    parts = parts.reshape(nt, ko, r * c, i2, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (parts << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_scales_zeros(scale: Tensor, zero: Tensor, device: torch.device, layout: str = "tiles") -> Tensor:
    """[N, G] scales and zeros -> `layout`'s form in bf16 (`scales_zeros_shape`), padded rows zero: tinygemm's
    [G, N_padded, 2] (tiles and halves) or gemlite's [2, G, N_padded]."""
    pad = padded_rows(scale.shape[0], device) - scale.shape[0]
    if pad:
        scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
    if layout == "gemlite":
        return gemlite_mm.pack_scales_zeros(scale, zero, device)
    return torch.stack([scale, zero], dim=-1).to(device, torch.bfloat16).transpose(0, 1).contiguous()


# ------------------------------------------------------------------------------ matmuls


def int4_mm(x: Tensor, packed: Tensor, group_size: int, scales_zeros: Tensor, n: int,
            invariant: bool = False) -> Tensor:
    """x [..., K] @ the int4 weight [N, K]^T, in x's dtype; the packed layout picks the few-row kernel.
    `invariant` (CUDA): each row's sums independent of the row count (see INVARIANT)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if invariant and x.is_cuda:
        if is_halves(packed):
            return int4_rows_mm(x2.contiguous(), packed, group_size, scales_zeros, n, True).view(*shape[:-1], n)
        w = dense_int4(packed, scales_zeros, group_size, n, shape[-1])
        return invariant_linear(x2.to(torch.bfloat16), w).to(x.dtype).view(*shape[:-1], n)
    if x.is_cuda and x2.shape[0] >= CUDA_DEQUANT_ROWS:
        w = dense_int4(packed, scales_zeros, group_size, n, shape[-1])
        return F.linear(x2.to(torch.bfloat16), w).to(x.dtype).view(*shape[:-1], n)
    if is_gemlite(packed):
        return gemlite_mm.mm(x2, packed, scales_zeros, group_size, n).view(*shape[:-1], n)
    if is_halves(packed):
        return int4_rows_mm(x2.contiguous(), packed, group_size, scales_zeros, n).view(*shape[:-1], n)
    # Casts only when needed: at batch 1 on a CPU even a no-op cast's dispatch shows (122 matmuls a token).
    xb = x2 if x2.dtype == torch.bfloat16 and x2.is_contiguous() else x2.to(torch.bfloat16).contiguous()
    if x.is_cuda:
        out = torch.ops.aten._weight_int4pack_mm(xb, packed, group_size, scales_zeros)
    elif x.dtype == torch.float32:
        # The kernel takes bf16 activations, and rounding them alone flips the default model's greedy
        # answer to "What is the capital of France?" (AVX2 CPU, 2026-12-02): with fp32 activations the
        # input goes in as bf16 high and low halves (x = hi + lo to ~16 bits), two calls summed in fp32.
        lo = (x2 - xb.float()).to(torch.bfloat16).contiguous()
        out = (torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_zeros).float()
               + torch.ops.aten._weight_int4pack_mm_for_cpu(lo, packed, group_size, scales_zeros).float())
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_zeros)
    if out.shape[-1] != n:
        out = out[:, :n]
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.view(*shape[:-1], n)


def dense_int4(packed: Tensor, scales_zeros: Tensor, group_size: int, n: int, k: int) -> Tensor:
    """The bf16 weight [n, K] of a CUDA-packed int4 weight of n output rows (its padding rows cut)."""
    return dequantize_tiles(packed, scales_zeros, group_size, stored_rows(packed, scales_zeros), k)[:n]


def dequantize_tiles(packed: Tensor, scales_zeros: Tensor, group_size: int, n: int, k: int) -> Tensor:
    """The bf16 weight [N, K] of a CUDA-packed int4 weight, any layout (one fused kernel under torch.compile);
    n: the rows it stores (`stored_rows`)."""
    return _dequantize_tiles(packed, scales_zeros, group_size, n, k)


def _dequantize_tiles_eager(packed, scales_zeros, group_size, n, k):
    if is_gemlite(packed):
        return gemlite_mm.dequantize(packed, scales_zeros, group_size, n)
    q = unpack_int4(packed, n, k) if is_halves(packed) else unpack_cuda_tiles(packed, n, k)
    q = q.view(n, k // group_size, group_size).to(torch.bfloat16)
    scale, zero = scales_zeros[..., 0].t(), scales_zeros[..., 1].t()
    return ((q - 8) * scale[..., None] + zero[..., None]).view(n, k)


def _dequantize_tiles(packed, scales_zeros, group_size, n, k):
    if torch.compiler.is_compiling():
        return _dequantize_tiles_eager(packed, scales_zeros, group_size, n, k)
    with torch.no_grad():  # one graph whatever the caller's grad mode: a weight needs none
        return _compiled_dequantize(n, k, group_size)(packed, scales_zeros, group_size, n, k)


@functools.cache
def _compiled_dequantize(n: int, k: int, group_size: int):
    """The dequantization compiled for one matrix shape, with a code object of its own: one function for
    all of them kept every shape (and grad mode) under dynamo's recompile limit of 8, which a smoke run's
    models passed, after which new shapes ran uncompiled. Static shapes: with constant sizes the
    eight-factor index arithmetic of every element compiles to multiplies and shifts, where symbolic
    sizes make it integer divisions (int4 prefill ran at 0.49x bf16 with dynamic=True)."""
    return torch.compile(own_code(_dequantize_tiles_eager), dynamic=False)


CUDA_INT8_REDUCTION_ROWS = 16  # up to this many rows, compiled CUDA int8 runs as one reduction


def int8_mm(x: Tensor, q: Tensor, scale: Tensor, rows_kernel: str = "auto") -> Tensor:
    """Per-channel int8: q [N, K], scale [N] in bf16 (few CUDA rows: `rows_kernel`, see pick_rows_kernel)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.is_cuda:
        return int8_mm_cuda(x2, q, scale, rows_kernel).view(*shape[:-1], q.shape[0])
    out = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), q, scale)
    return out.to(x.dtype).view(*shape[:-1], q.shape[0])


def int8_mm_cuda(x2: Tensor, q: Tensor, scale: Tensor, rows_kernel: str = "auto") -> Tensor:
    """x2 [M, K] @ (q * scale)^T without `aten._weight_int8pack_mm`, which on CUDA is a one-thread-per-
    output fp32 kernel (15 tok/s at the 7B shape, H200, 2026-12-02). Inductor's weight-only pattern
    rewrites `mm(x, q.to(bf16)) * scale` with bf16 scales into that op (and its lowering fails in torch
    2.11 when x is a fused pointwise result), so the scale is applied in float32, which it does not match.

    Compiled decode (few rows): a multiply-and-sum over K that inductor fuses into one reduction reading
    int8, the form inductor itself gives a matrix-vector product. Otherwise: cast and cuBLAS."""
    if x2.is_cuda and rows_kernel == INVARIANT:
        return int8_rows_mm(x2, q, scale, True)
    if x2.is_cuda and x2.shape[0] <= MAX_ROWS and pick_rows_kernel("int8", rows_kernel) == "triton":
        return int8_rows_mm(x2, q, scale)
    if torch.compiler.is_compiling() and x2.shape[0] <= CUDA_INT8_REDUCTION_ROWS:
        out = (q[:, None, :].float() * x2[None].float()).sum(-1).t()  # [N, M]: a weight row serves all M
    else:
        out = torch.mm(x2, q.t().to(x2.dtype)).float()
    return (out * scale.float()).to(x2.dtype)


def dequant_mm(x: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int,
               invariant: bool = False) -> Tensor:
    """Any int8 groups: dequantize in x's dtype and matmul (fused under torch.compile on CUDA)."""
    n, k = q.shape
    w = q.view(n, k // group_size, group_size).to(x.dtype) * scale.to(x.dtype)[..., None]
    if zero is not None:
        w = w + zero.to(x.dtype)[..., None]
    return (invariant_linear if invariant and x.is_cuda else F.linear)(x, w.view(n, k))



def split_int8_planes(q: Tensor) -> tuple[Tensor, Tensor]:
    """int8 q = 16 * hi + lo exactly: hi in -8..7 (as 0..15 for the int4 kernel), lo in 0..15."""
    # An arithmetic shift is floor division by 16, and the low four bits are what it leaves.
    return ((q >> 4) + 8).to(torch.uint8), (q & 15).to(torch.uint8)


def plane_qparams(scale: Tensor, zero: Tensor | None) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(scale, zero) of the hi and lo planes so that their sum is s * q + z:
    hi: (h + 8 - 8) * 16 s + 0; lo: (l - 8) * s + (8 s + z)."""
    z = torch.zeros_like(scale) if zero is None else zero
    return (16 * scale, torch.zeros_like(scale)), (scale, 8 * scale + z)
