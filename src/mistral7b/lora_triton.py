"""The batched LoRA delta as two Triton kernels (punica's / vLLM's BGMV): `out + B_s A_s x` for each row,
s that row's slot, for few rows (decode).

Why: in a compiled CUDA-graph decode step the masked delta (lora._masked_delta) costs every linear two
cuBLAS mms over all slots, a mask and an add; here it is a shrink (x A_s^T, fp32) and an expand (adds
xa B_s^T into the base output), each program reading only its own row's slot, with no host sync and no
branch on the slots in the graph. Rows on no adapter (slot 0 or -1) skip the work. The bank's default
delta: on an H100 (7B shape, 4 rank-16 adapters, compiled b8) x1.163-1.166 the base step against the
matmuls' x1.26. A fused linear's parts (q, k, v; gate, up) read only their own ranks of B^T.

Given `counters` (`new_counters`), both run in one launch (`lora_kernels.fused`): a decode step's delta is
about a fixed cost per kernel (H100: b1 and b8 both about +0.9-1.0 ms over 129 linears), and this halves the
kernels. Yet it measured slower on an H100 (7B shape, compiled, 2026-12-06d: b8 x1.328 against the two
kernels' x1.169, b1 x1.210 against x1.096), so it is not the default. Tests run every kernel in Triton's
interpreter on the CPU, and compile each config to an sm_90 cubin there.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor

from .quant.triton_mm import interpreting

MAX_ROWS = 64  # a program per row re-reads its slot's A and B^T: past this many rows the mms' reuse wins
# Inputs per shrink program: a row's A is in x (up to 14336) long, too long for one program of a few rows
# to stream; split, it spreads over the GPU's SMs (the expand adds the partial sums, so no atomics)
K_SPLIT = 1024
_TRITON = importlib.util.find_spec("triton") is not None  # lora_kernels: imported when a kernel first runs


def new_counters(device: torch.device) -> Tensor:
    """The fused kernel's three counters, zero between launches (its last program resets them). Made once,
    outside any compiled region, by whoever owns the launches (LoRABank): one set per stream of launches,
    which run in turn. Made inside a CUDA graph's capture, they would live in its private pool."""
    return torch.zeros(3, dtype=torch.int32, device=device)


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


# mutates_args=(): the fused form writes its counters but leaves them at zero, as it found them.
@torch.library.custom_op("mistral7b::lora_delta", mutates_args=())
def lora_delta(x: Tensor, a: Tensor, bt: Tensor, index: Tensor, out: Tensor, part_ends: list[int],
               counters: Tensor | None = None) -> Tensor:
    """out [B, ..., N] + each row's x [B, ..., K] @ a[s]^T @ bt[s], s = index[b] of its batch row (0 or -1:
    none, exactly out); a [S + 1, PR, K] and bt [S + 1, PR, N] (a bank's stacked slots), PR = parts x rank,
    part j's columns ending at part_ends[j] (the last part's at N, not listed). At most MAX_ROWS rows.
    With `counters` (`new_counters`): one launch (`lora_kernels.fused`) instead of a shrink and an expand."""
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
    from . import lora_kernels

    if counters is not None:
        lora_kernels.fused[lambda meta: (m * (-(-pr // meta["BLOCK_R"])) * splits + m * (-(-n // meta["BLOCK_N"])),)](
            x2, a, bt, index, out2, y2, xa, counters, m, k, n, pr, rank, end0, end1, splits, tokens, slots,
            x2.stride(0), a.stride(0), a.stride(1), bt.stride(0), bt.stride(1), out2.stride(0), y2.stride(0),
            K_SPLIT=K_SPLIT, PR_POW2=pr_pow2, BACKOFF=not interpreting())  # no inline PTX when interpreted
        return y
    lora_kernels.shrink[lambda meta: (m, -(-pr // meta["BLOCK_R"]), splits)](
        x2, a, index, xa, m, k, pr, tokens, slots, x2.stride(0), a.stride(0), a.stride(1), K_SPLIT=K_SPLIT)
    lora_kernels.expand[lambda meta: (m, -(-n // meta["BLOCK_N"]))](
        xa, bt, index, out2, y2, m, n, pr, rank, end0, end1, splits, tokens, slots, bt.stride(0), bt.stride(1),
        out2.stride(0), y2.stride(0), PR_POW2=pr_pow2)
    return y


@lora_delta.register_fake
def _(x, a, bt, index, out, part_ends, counters=None):
    _check(x, a, bt, index, out, part_ends)
    return torch.empty_like(out, memory_format=torch.contiguous_format)
