"""Quantized weights in a device-independent form, and the quantizers that produce them.

A `QuantizedWeight` holds the rows of a matrix [N, K] as integers plus one scale (and maybe one zero)
per group of `group_size` consecutive inputs of a row; `group_size == K` is per output channel.

- "int4": q uint8 in 0..15, `w = (q - 8) * scale + zero` (tinygemm's convention).
- "int8": q int8, `w = q * scale`, or `q * scale + zero` when `zero` is set (exact images of GGUF's
  Q5_K and of int4 groups, used when one fused matrix mixes formats).

With `perm` (act-order: GPTQ's desc_act), column j holds input `perm[j]`: the inputs sorted by group, so
each group is again a run of columns; the module multiplies `x[..., perm]`, and `dequantize` puts the
columns back in input order.

Scales and zeros are float32 here; the kernels round them to their compute dtype (bf16) when packing.
Every row is quantized on its own, so quantizing a slice of rows equals slicing the quantized matrix:
that makes it exact to fill a fused matrix (wqkv, w13) part by part while streaming.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .cpu_kernels import unpack_nibbles


@dataclass
class QuantizedWeight:
    kind: str  # "int4" or "int8"
    q: Tensor  # [N, K]
    scale: Tensor  # [N, K // group_size] float32
    zero: Tensor | None  # like scale, or None
    group_size: int
    source: str | None = None  # the format it came from, e.g. "Q4_1"
    perm: Tensor | None = None  # int64 [K]: the input each column holds (act-order), None: column j
    # int4 only: q is [N, K / 32, 16], each block of 32 values in 16 bytes as `cpu_kernels.pack_nibbles`
    # lays them out (GGUF's Q4_0/Q4_1 blocks: a view of the file, strided between blocks). The CPU's
    # layout copies them in as they are; other consumers take `unpacked()`.
    nibbles: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1] * 32) if self.nibbles else tuple(self.q.shape)

    def unpacked(self) -> "QuantizedWeight":
        """The same weight with q [N, K], one value a byte."""
        if not self.nibbles:
            return self
        return replace(self, q=unpack_nibbles(self.q.reshape(self.q.shape[0], -1)), nibbles=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.nibbles:
            return self.unpacked().dequantize(dtype)
        n, k = self.q.shape
        g = k // self.group_size
        q = self.q.view(n, g, self.group_size).float()
        if self.kind == "int4":
            q = q - 8
        w = q * self.scale[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return unpermute(w.view(n, k), self.perm).to(dtype)

    def map_rows(self, fn) -> "QuantizedWeight":
        """The same weight with `fn` (a row slice or permutation) applied to q, scale and zero."""
        return replace(self, q=fn(self.q), scale=fn(self.scale), zero=None if self.zero is None else fn(self.zero))

    def regroup(self, group_size: int) -> "QuantizedWeight":
        """Smaller groups holding the same values (each scale repeated): exact."""
        if group_size == self.group_size:
            return self
        if self.group_size % group_size:
            raise ValueError(f"cannot split groups of {self.group_size} into groups of {group_size}")
        r = self.group_size // group_size
        rep = (lambda t: None if t is None else t.repeat_interleave(r, dim=1))
        return replace(self, scale=rep(self.scale), zero=rep(self.zero), group_size=group_size)

    def as_int8(self) -> "QuantizedWeight":
        """int4 groups as int8 with zeros: q - 8 in -8..7, same scale and zero (exact)."""
        if self.kind == "int8":
            return self
        if self.nibbles:
            return self.unpacked().as_int8()
        zero = self.zero if self.zero is not None else torch.zeros_like(self.scale)
        return replace(self, kind="int8", q=(self.q.to(torch.int16) - 8).to(torch.int8), zero=zero)


def pack_pairs(q: Tensor) -> Tensor:
    """int4 values [..., K] as bytes [..., K / 2], inputs 2j and 2j + 1 in the low and high nibble."""
    return q[..., ::2] | (q[..., 1::2] << 4)


def unpack_pairs(packed: Tensor) -> Tensor:
    """The inverse of `pack_pairs`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def unpermute(w: Tensor, perm: Tensor | None) -> Tensor:
    """Columns held in the order `perm` (act-order) back in input order."""
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm.to(w.device)] = w
    return out


def requantize_int8(weight: QuantizedWeight, group_size: int, has_zero: bool) -> QuantizedWeight:
    """`weight`'s values on int8 groups of `group_size`, coarser than its own (Q6_K's 16 onto the CPU
    kernel's blocks of 32): not exact, each value off by at most half a step of its new group, 1/254 of
    the group's largest |w| (1/510 of its range with zeros). Scales and zeros are rounded to float16 first,
    as the CPU layout stores them, so the integers are chosen for the scales that will be used. Rows go
    a chunk at a time, in place: a 7B ffn_down took 1 s whole."""
    if weight.perm is not None:
        raise ValueError("an act-order weight cannot be requantized onto coarser groups")
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // group_size)
    zero = torch.empty(n, k // group_size) if has_zero else None
    for lo in range(0, n, 256):
        hi = min(lo + 256, n)
        groups = weight.map_rows(lambda t: t[lo:hi]).dequantize().view(hi - lo, -1, group_size)
        if has_zero:
            low = groups.amin(-1)
            s = (groups.amax(-1) - low).div_(255).clamp_(min=2**-24).half().float()
            z = (low + 128 * s).half().float()
            q[lo:hi] = groups.sub_(z[..., None]).div_(s[..., None]).round_().clamp_(-128, 127).view(hi - lo, k)
            zero[lo:hi] = z
        else:
            q[lo:hi], s = symmetric_int8(groups, min_scale=2**-24, scale_dtype=torch.float16)
        scale[lo:hi] = s
    return QuantizedWeight("int8", q, scale, zero, group_size, weight.source)


def check_group_size(name: str, k: int, group_size: int) -> None:
    if k % group_size:
        raise ValueError(
            f"{name}: group size {group_size} does not divide the input width {k}; "
            f"choose a group size that divides {k}"
        )


def symmetric_int8(groups: Tensor, min_scale: float = 1e-12, scale_dtype: torch.dtype | None = None):
    """q [N, K] int8 and scales [N, G] of float groups [N, G, size]: scale = max|group| / 127 (rounded through
    `scale_dtype` when given, so that q is chosen for the scale that will be used), q = round(w / scale)."""
    scale = (groups.abs().amax(-1) / 127).clamp_(min=min_scale)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    q = torch.round(groups / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(groups.shape[0], -1), scale


def quantize_int8(w: Tensor, source: str | None = None) -> QuantizedWeight:
    """Symmetric per output channel: scale = max|row| / 127, q = round(w / scale)."""
    q, scale = symmetric_int8(w.float()[:, None])
    return QuantizedWeight("int8", q, scale, None, w.shape[1], source)


def quantize_int4(w: Tensor, group_size: int, source: str | None = None) -> QuantizedWeight:
    """Asymmetric groups along the input: [min, max] of each group onto 0..15 (torchao's tinygemm
    choice of qparams): scale = (max - min) / 15, zero = min + 8 * scale."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = lo + 8 * scale
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight("int4", q.reshape(n, k), scale, zero, group_size, source)


@dataclass(frozen=True)
class WeightFormat:
    """The storage of one matrix: "int4" or "int8", groups of `group_size` (None: one per row),
    with or without zeros, where it came from (a GGUF type, or None when quantized here), and whether
    its inputs are permuted (`act_order`: the module keeps the permutation and applies it to x)."""

    kind: str
    group_size: int | None = None
    has_zero: bool = False
    source: str | None = None
    act_order: bool = False

    def label(self) -> str:
        text = self.kind + (f" g{self.group_size}" if self.group_size else "") + (" act-order" * self.act_order)
        return text + (f" (from {self.source})" if self.source else "")

    def quantize(self, w: Tensor, name: str = "weight") -> QuantizedWeight:
        """Quantize a float matrix into this format (a clear ValueError if the groups do not fit)."""
        if self.act_order:
            raise ValueError(f"{name}: quantizing into {self.label()} is not supported (it is read as stored)")
        if self.kind == "int4":
            check_group_size(name, w.shape[1], self.group_size)
            return quantize_int4(w, self.group_size)
        if self.group_size is not None or self.has_zero:
            raise ValueError(f"{name}: quantizing into {self.label()} is not supported")
        return quantize_int8(w)

    def conform(self, qw: QuantizedWeight) -> QuantizedWeight:
        """`qw` in this format: exactly, as the plan only asks for conversions that lose nothing, except int8
        groups coarser than `qw`'s, which a CPU module asks for (`linear.runnable_format`): requantized."""
        if self.kind == "int4":
            assert qw.kind == "int4" and qw.group_size == self.group_size, (qw.kind, qw.group_size, self)
            return qw
        group = self.group_size or qw.shape[1]
        if group > qw.group_size:
            return requantize_int8(qw, group, self.has_zero)
        out = qw.as_int8().regroup(group)
        if self.has_zero and out.zero is None:
            out = replace(out, zero=torch.zeros_like(out.scale))
        return out


def merge_formats(formats: list[WeightFormat]) -> WeightFormat:
    """One format that holds every part of a fused matrix exactly: the common one when they agree,
    int4 when all are int4 groups of one size, else int8 with zeros at the smallest group size."""
    first = formats[0]
    sources = "+".join(dict.fromkeys(f.source for f in formats if f.source)) or None
    if any(f.act_order for f in formats):  # one permutation of the shared input (the reader checks it)
        want = (first.kind, first.group_size, first.has_zero, True)
        if not all((f.kind, f.group_size, f.has_zero, f.act_order) == want for f in formats):
            raise ValueError("the parts of a fused matrix mix act-order with other formats")
        return replace(first, source=sources)
    if all((f.kind, f.group_size, f.has_zero) == (first.kind, first.group_size, first.has_zero) for f in formats):
        return replace(first, source=sources)
    if all(f.kind == "int4" and f.group_size == first.group_size for f in formats):
        return WeightFormat("int4", first.group_size, True, sources)
    sizes = [f.group_size for f in formats if f.group_size]
    has_zero = any(f.has_zero or f.kind == "int4" for f in formats)
    return WeightFormat("int8", min(sizes) if sizes else None, has_zero, sources)
