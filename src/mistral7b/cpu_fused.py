"""RMSNorm and RoPE on a CPU in float32, each one C call through ctypes where torch runs a chain of ops.

At batch 1 on a CPU a step's elementwise work is tiny and each torch op's dispatch is what costs: the
model's `rms_norm` is 8 ops (about 22 us a call on a 2-core AVX2 box, 61 calls a default-model step),
`apply_rope` 6. `model.fused` sends its CPU float32 calls here, outside torch.compile (which fuses them
itself); every row is computed alone, so prefill, decode and a verify normalise a token alike.

- RoPE computes torch's products in torch's order, each rounded as torch rounds it (no FMA contraction):
  bit for bit `apply_rope`.
- RMSNorm sums the squares in double, so it can differ from torch's float sum in the last bit.

Built and loaded like `quant.cpu_kernels`; MISTRAL7B_CPU_FUSED=0 keeps torch's ops (read when first needed).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from .native import build, load_or_none

SOURCE = r"""
#include <math.h>
#include <stdint.h>

// out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w, rows of `dim` contiguous floats.
void m7b_rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        double sums[4] = {0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 4 <= dim; j += 4)
            for (int u = 0; u < 4; u++) sums[u] += (double)xr[j + u] * xr[j + u];
        for (; j < dim; j++) sums[0] += (double)xr[j] * xr[j];
        const float mean = (float)((sums[0] + sums[1] + sums[2] + sums[3]) / (double)dim);
        const float inv = 1.0f / sqrtf(mean + eps);
        for (j = 0; j < dim; j++) o[j] = (xr[j] * inv) * w[j];
    }
}

// out [B, H, T, D] contiguous = x * cos + roll(x, D / 2) * sin; x strided [B, H, T, D] (last stride 1),
// cos and sin contiguous [B, T, D], shared by the heads.
void m7b_rope(const float *x, int64_t sb, int64_t sh, int64_t st, int64_t batch, int64_t heads, int64_t tokens,
              int64_t dim, const float *cos_t, const float *sin_t, float *out) {
    const int64_t half = dim / 2;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t t = 0; t < tokens; t++) {
                const float *xr = x + b * sb + h * sh + t * st;
                const float *c = cos_t + (b * tokens + t) * dim, *s = sin_t + (b * tokens + t) * dim;
                float *o = out + ((b * heads + h) * tokens + t) * dim;
                for (int64_t j = 0; j < dim; j++) {
                    const float rolled = xr[j < half ? j + half : j - half];
                    const float a = xr[j] * c[j], r = rolled * s[j];
                    o[j] = a + r;
                }
            }
}
"""

# No FMA contraction: RoPE's a * b + c * d rounds each product, as torch's separate ops do.
FLAGS = ("-ffp-contract=off",)


@functools.cache
def library():
    """The loaded library for this CPU, or None (with a one-line notice) when it cannot be built."""
    return load_or_none(open_variant, "CPU fused norm and RoPE", "using torch's ops", switch="MISTRAL7B_CPU_FUSED")


def open_variant(variant: str):
    lib = ctypes.CDLL(str(build(variant, SOURCE, "m7b_fused", FLAGS)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.m7b_rms_norm.restype = lib.m7b_rope.restype = None
    lib.m7b_rms_norm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
    lib.m7b_rope.argtypes = [ptr] + [i64] * 7 + [ptr] * 3
    return lib


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """`model.rms_norm` in one call, or None where this path does not apply (then torch's ops run). Any
    layout goes through here (a copy first where x is not contiguous: the head's last-token rows), so
    that no token is normalised by torch's sum in one forward and by this one in another."""
    lib = library()
    if (lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or weight.shape != x.shape[-1:]):
        return None
    x, weight = x.contiguous(), weight.contiguous()
    dim = x.shape[-1]
    out = torch.empty_like(x)
    lib.m7b_rms_norm(x.data_ptr(), x.numel() // dim, dim, weight.data_ptr(), eps, out.data_ptr())
    return out


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor | None:
    """`model.apply_rope` on x [B, H, T, D], cos and sin [B, 1, T, D], in one call; or None where this
    path does not apply."""
    lib = library()
    if (lib is None or x.dtype != torch.float32 or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or x.device.type != "cpu" or x.dim() != 4):
        return None
    batch, heads, tokens, dim = x.shape
    if cos.shape != (batch, 1, tokens, dim) or sin.shape != cos.shape or dim % 2:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(batch, heads, tokens, dim)
    lib.m7b_rope(x.data_ptr(), *x.stride()[:3], batch, heads, tokens, dim, cos.data_ptr(), sin.data_ptr(),
                 out.data_ptr())
    return out
