"""CPU attention for a few query tokens a row (decode, a speculative verify), in C through ctypes.

Each query token attends over the keys it may see, in slot order, skipping the others; nothing depends
on how many invisible slots surround them, on the other rows or on the other tokens of the forward. So a
verify of k + 1 tokens computes each token's attention exactly as the decode step at its position does,
in one call a layer where SDPA took one call a token (its sums change with the key length and batch: it
was called over each token's own keys), and a batch of decode rows is one call, each row as alone
(issue 26). On the default model a call costs 10-30 us where SDPA's cost about 120 us.

Built and loaded like `quant.cpu_kernels` (same compiler, flags and cache folder) from `attention_cpu_c`.
Float32 queries; keys and values float32, or float16 (a float16 KV cache: a library of its own). Each
(row, token, KV head) is a tile of `cpu_pool`'s threads: a verify of 5 tokens on the default model took
8.3 ms a step on one thread, 4.8 on two (2-core AVX2 box). A tile's query heads (up to 4) read each key and
value row once together, each head's sums unchanged: x1.1-1.2 on the default model, x1.6 at the 7B shape.
MISTRAL7B_CPU_ATTENTION=0 keeps SDPA (read when first needed).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import cpu_pool, native
from .attention_cpu_c import ENTRY, FLAGS, SOURCE
from .native import build, load_or_none

KV_DTYPES = (torch.float32, torch.float16)  # what the kernel reads keys and values as (a float16 cache)


@functools.cache
def library(kv_dtype: torch.dtype = torch.float32):
    """The loaded library for this CPU and keys/values of `kv_dtype`, or None (with a one-line notice)
    when it cannot be built: SDPA then."""
    return load_or_none(lambda variant: open_variant(variant, kv_dtype), "CPU attention kernel", "using SDPA",
                        switch="MISTRAL7B_CPU_ATTENTION")


def open_variant(variant: str, kv_dtype: torch.dtype = torch.float32):
    """Build (once) and load one variant ("vnni" and "avx2" take the AVX2 paths, "portable" plain C)."""
    flags = FLAGS + (("-DM7B_KV_HALF",) if kv_dtype == torch.float16 else ())
    lib = cpu_pool.attach(ctypes.CDLL(str(build(variant, SOURCE + cpu_pool.CLIENT + ENTRY, "m7b_attend", flags))))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.m7b_attend.restype = ctypes.c_int
    lib.m7b_attend.argtypes = [ptr, i64, i64, i64] * 3 + [ptr] * 3 + [i64] * 7 + [ctypes.c_float, ptr, ctypes.c_int]
    return lib


def built() -> bool:
    """Whether the library for float32 keys and values loaded: a constant to torch.compile, which cannot
    trace ctypes."""
    return library() is not None


def built_half() -> bool:
    """The same for float16 keys and values."""
    return library(torch.float16) is not None


# torch.compiler.assume_constant_result(built) without importing torch._dynamo, which that does: 1.9 s of
# every process's start (eager runs never compile). Its decorator sets only this attribute (tested).
built._dynamo_marked_constant = built_half._dynamo_marked_constant = True


def supports(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Float32 queries on a CPU with keys and values of float32 or float16 (a float16 cache), contiguous
    head dims, and the library built. Compiled steps call the kernel as the opaque op
    `mistral7b::slot_attention`, so their attention is the eager step's, bit for bit."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == v.dtype in KV_DTYPES
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and (built() if k.dtype == torch.float32 else built_half()))


def slot_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                   order: Tensor | None = None, lib=None) -> Tensor:
    """q [B, H, T, D]; k, v [B, KV, S, D]; q_pos [B, T]; k_pos [B, S] (-1: empty). Each query token over
    the keys it sees (`attention.visible`) in slot order, or `order` [B, T, S] int32 (the slots it reads
    in turn, -1 ending the list). A query at position -1 gets zeros. `lib`: a variant other than this CPU's."""
    if lib is None and torch.compiler.is_compiling():  # eagerly the op's dispatch costs more than a direct call
        return slot_attention_op(q, k, v, q_pos, k_pos, window or 0, order)
    return _attend(lib or library(k.dtype), q, k, v, q_pos, k_pos, window, order)


def _attend(lib, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
            order: Tensor | None) -> Tensor:
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, heads, tokens, dim, dtype=torch.float32)
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    status = lib.m7b_attend(
        q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], v.data_ptr(), *v.stride()[:3], q_pos.data_ptr(),
        k_pos.data_ptr(), None if order is None else order.data_ptr(), batch, heads, k.shape[1], tokens, k.shape[2],
        dim, window or 0, dim**-0.5, out.data_ptr(), cpu_pool.threads())
    if status:
        raise MemoryError("CPU attention: no memory for its scores")
    return out


# `slot_attention` with this CPU's library (window 0: none), one op to torch.compile.
slot_attention_op = native.cpu_op(
    "slot_attention(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, int window, Tensor? order) -> Tensor",
    lambda q, k, v, q_pos, k_pos, window, order: _attend(library(k.dtype), q, k, v, q_pos, k_pos, window, order),
    lambda q, k, v, q_pos, k_pos, window, order: q.new_empty(q.shape, dtype=torch.float32))
