"""Integer kernels for quantized linears on the CPU: weights in blocks of 32 (4-bit nibbles or int8)
times activations quantized to int8 per block of 32, llama.cpp's q4_1 x q8_0 dot (cpu_kernels_c.py).

The C source is compiled once at first use into the cache folder (about a second; plain C, no torch
headers) for the CPU's best instruction set (AVX-512 VNNI, AVX2 or portable C) and called through
ctypes. On by default where a compiler is found; MISTRAL7B_INT8_ACTIVATIONS=0 (see `enabled`), or no
compiler, keeps torch's kernels (fp32/bf16 activations); `available()` says which.

The result of one output depends only on its input row and weight row, never on the batch around it,
the thread count or how outputs are split over threads (batch invariance, issue 26).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from .. import cpu_pool, native
from ..native import build, load_or_none
from .cpu_kernels_c import SOURCE

BLOCK = 32
ENV_SWITCH = "MISTRAL7B_INT8_ACTIVATIONS"
def enabled() -> bool:
    """On unless MISTRAL7B_INT8_ACTIVATIONS=0. On the default model they cost +0.37% perplexity against
    the fp32 dequantized weights (16.7258 vs 16.6646, 27k tokens of tests/data/licenses.txt, context
    1024; llama.cpp's q8 activations cost 0.24-0.36%) and run about 1.5x faster at batch 1. Read when a
    model is built."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


@functools.cache
def library():
    """The loaded kernel library for this CPU, or None (with a one-line notice) when it cannot be built."""
    return load_or_none(open_variant, "integer CPU kernels", "using torch's kernels")


def open_variant(variant: str):
    """Build (once) and load one variant; the tests run every variant the CPU can."""
    lib = cpu_pool.attach(ctypes.CDLL(str(build(variant, SOURCE, "m7b_cpu"))))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.m7b_linear.restype = ctypes.c_int
    lib.m7b_linear.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr, i64, ptr, ctypes.c_int, ctypes.c_int]
    return lib


def available() -> bool:
    return enabled() and library() is not None


def supports(in_features: int, group_size: int) -> bool:
    """Whether a matrix of this width and group size can run here (groups are split into blocks of 32)."""
    return in_features % BLOCK == 0 and group_size % BLOCK == 0 and available()


# ------------------------------------------------------------------------------ packing


NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of a 64-bit word


def _words(t: Tensor) -> Tensor | None:
    """A contiguous byte tensor seen as 64-bit words (last dim / 8), or None where it cannot be: the
    nibble ops below then take 8 bytes an element, 4-8x faster than byte by byte."""
    if not t.is_contiguous() or t.shape[-1] % 8 or t.data_ptr() % 8:
        return None
    return t.view(torch.int64)


def pack_nibbles(q: Tensor, out: Tensor | None = None) -> Tensor:
    """uint8 [N, K] in 0..15 -> [N, K / 2], each block of 32 as 16 bytes: byte j holds element j in its
    low nibble and element j + 16 in its high one (GGUF's Q4_0/Q4_1 layout). `out`: a contiguous uint8
    [N, K / 2] to write into (a module's rows) instead of a new tensor."""
    n, k = q.shape
    if out is None:
        out = torch.empty(n, k // 2, dtype=torch.uint8, device=q.device)
    blocks, packed = q.reshape(n, k // BLOCK, 2, BLOCK // 2), out.view(n, k // BLOCK, BLOCK // 2)
    words, packed_words = _words(blocks), _words(packed)
    if words is not None and packed_words is not None:  # a byte below 16 shifted by 4 stays in its byte
        blocks, packed = words, packed_words
    torch.bitwise_left_shift(blocks[:, :, 1], 4, out=packed)  # in place: no temporaries the size of q
    packed.bitwise_or_(blocks[:, :, 0])
    return out


def unpack_nibbles(packed: Tensor, width: int = BLOCK // 2) -> Tensor:
    """[N, c * width] bytes -> [N, 2 * c * width] values 0..15: per chunk of `width` bytes, the low nibbles
    then the high ones (GGUF's layouts; `pack_nibbles`' inverse at width 16). Written in place, by 64-bit
    words where the layout allows: a 7B Q4_0 GGUF's load spent 8.5 of 22 s here byte by byte."""
    rows = packed.shape[0]
    src = packed.reshape(rows, -1, width)
    out = torch.empty(rows, src.shape[1], 2, width, dtype=torch.uint8, device=packed.device)
    words = _words(src.contiguous()) if width % 8 == 0 else None  # GGUF's blocks: a copy, then words
    if words is None:
        torch.bitwise_and(src, 0x0F, out=out[:, :, 0])
        torch.bitwise_right_shift(src, 4, out=out[:, :, 1])
        return out.view(rows, -1)
    halves = out.view(torch.int64)  # a word's right shift brings the next byte's low nibble in: masked off
    torch.bitwise_and(words, NIBBLES, out=halves[:, :, 0])
    torch.bitwise_right_shift(words, 4, out=halves[:, :, 1]).bitwise_and_(NIBBLES)
    return out.view(rows, -1)


def block_params(scale: Tensor, zero: Tensor | None, group_size: int, offset: int) -> tuple[Tensor, Tensor]:
    """Per-block (d, m) [N, K / 32] float16 so that w = d * stored + m, for w = (q - offset) * scale + zero:
    2 bytes each, as GGUF stores them (its Q4/Q8 values exactly), not 4 (a 7B decode step reads 20% fewer
    bytes). m comes from the rounded d, so that the rounding errs by (q - offset) * (d - scale), centred."""
    r = group_size // BLOCK
    d = scale.float().repeat_interleave(r, dim=1).half()
    z = 0 if zero is None else zero.float().repeat_interleave(r, dim=1)
    return d.contiguous(), (z - offset * d.float()).half().contiguous()


# ------------------------------------------------------------------------------ the matmul


def linear(x: Tensor, weight: Tensor, bits: int, d: Tensor, m: Tensor | None, n: int, lib=None) -> Tensor:
    """x [..., K] @ w[N, K]^T in x's dtype; w as `pack_nibbles` (bits 4) or int8 [N, K] (bits 8);
    w = d * stored + m per block of 32 (m None: no offsets). `lib`: a variant other than this CPU's best."""
    if lib is None and torch.compiler.is_compiling():  # eagerly the op's dispatch costs more than a direct call
        return cpu_qlinear(x, weight, bits, d, m, n)
    return _linear(x, weight, bits, d, m, n, lib)


def _linear(x: Tensor, weight: Tensor, bits: int, d: Tensor, m: Tensor | None, n: int, lib=None) -> Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype not in (torch.float32, torch.bfloat16) or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    bf16 = x2.dtype == torch.bfloat16  # converted inside the kernel: no cast ops around it
    rows, k = x2.shape
    out = torch.empty(rows, n, dtype=x2.dtype)
    status = (lib or library()).m7b_linear(x2.data_ptr(), rows, k, weight.data_ptr(), bits, d.data_ptr(),
                                           None if m is None else m.data_ptr(),
                                           n, out.data_ptr(), cpu_pool.threads(), bf16)
    if status:
        raise MemoryError(f"cpu_qlinear: no memory for {rows} x {k} quantized activations")
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.view(*shape[:-1], n)


cpu_qlinear = native.cpu_op("cpu_qlinear(Tensor x, Tensor weight, int bits, Tensor d, Tensor? m, int n) -> Tensor",
                            lambda x, weight, bits, d, m, n: _linear(x, weight, bits, d, m, n),
                            lambda x, weight, bits, d, m, n: x.new_empty(*x.shape[:-1], n))
