"""GGUF quantized blocks repacked, exactly, into the formats our kernels run (no dequantize-requantize).

Block layouts are llama.cpp's (ggml-common.h), as the `gguf` package decodes them in `gguf.quants`:

| GGUF | block | values | ours |
|---|---|---|---|
| Q4_0 | 32 | `d * (q - 8)` | int4 g32: scale d, zero 0 |
| Q4_1 | 32 | `d * q + m` | int4 g32: scale d, zero m + 8d |
| Q4_K | 256 = 8 x 32 | `d*sc_j * q - dmin*m_j` (6-bit sc, m) | int4 g32: scale d*sc_j, zero 8 d*sc_j - dmin*m_j |
| Q8_0 | 32 | `d * q`, q int8 | int8 g32 |
| Q5_K | 256 = 8 x 32 | `d*sc_j * q - dmin*m_j`, q in 0..31 | int8 g32 with zeros: q - 16, zero 16 d*sc_j - dmin*m_j |
| Q6_K | 256 = 16 x 16 | `d*sc_j * (q - 32)`, q in 0..63 | int8 g16: q - 32, scale d*sc_j |

Q5_K and Q6_K have no 5- or 6-bit kernel; int8 holds their integers exactly, so the nearest format
is also an exact one: the only rounding anywhere is of scales and zeros to the kernels' bf16
(tests/test_quant_gguf.py measures it against `gguf.quants.dequantize`). The cost is memory: 8 bits
per value where the file has 5.5 or 6.6. One exception: the CPU's integer kernels take groups of 32 and
up, so there a module of Q6_K's groups of 16 (or a fused matrix holding one) takes int8 blocks of 32
(`linear.runnable_format`) and its Q6_K parts are requantized onto them (`qtensor.requantize_int8`: within
half a step of the block's 8-bit grid; other parts exactly), not dequantized every call.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from .cpu_kernels import NIBBLES, unpack_nibbles
from .qtensor import QuantizedWeight, WeightFormat

FORMATS = {
    "Q4_0": WeightFormat("int4", 32, True, "Q4_0"),
    "Q4_1": WeightFormat("int4", 32, True, "Q4_1"),
    "Q4_K": WeightFormat("int4", 32, True, "Q4_K"),
    "Q8_0": WeightFormat("int8", 32, False, "Q8_0"),
    "Q5_K": WeightFormat("int8", 32, True, "Q5_K"),
    "Q6_K": WeightFormat("int8", 16, False, "Q6_K"),
}


def _file_bytes(qs: np.ndarray) -> torch.Tensor:
    """A view of the file's read-only pages as a tensor: read, never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(qs)


def _f16(column: np.ndarray) -> np.ndarray:
    """A [nb, 2] byte column of the blocks as float32: torch reads it strided and converts in one pass
    (numpy's strided copy of 2-byte items took 3 of a 7B file's 9 s of loading)."""
    return _file_bytes(column).view(torch.float16).float().numpy()  # [nb, 1]


def _q4_0(b):  # q: a view of the file's nibbles (`_PACKED`)
    d = _f16(b[:, :2])
    return _file_bytes(b[:, 2:]), d, np.zeros_like(d)


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _file_bytes(b[:, 4:]), d, m + 8 * d


def _q4_k_nibbles(qs: np.ndarray) -> torch.Tensor:
    """Q4_K's 128 bytes a block, 32-byte chunks holding values 0-31 in their low nibbles and 32-63 in their
    high ones, as `pack_nibbles` lays out blocks of 32 (byte j: values j and j + 16): per chunk, halves
    h0 and h1 give (h0 & 15) | (h1 & 15) << 4, then h0 >> 4 | (h1 & 0xF0). By 64-bit words, no unpacking."""
    words = _file_bytes(qs).contiguous().view(torch.int64).view(-1, 4, 2, 2)  # [block, chunk, half, word]
    h0, h1 = words[:, :, 0], words[:, :, 1]
    out = torch.empty_like(words)
    low, high = out[:, :, 0], out[:, :, 1]
    torch.bitwise_and(h1, NIBBLES, out=low).bitwise_left_shift_(4).bitwise_or_(h0 & NIBBLES)
    torch.bitwise_right_shift(h0, 4, out=high).bitwise_and_(NIBBLES).bitwise_or_(h1 & ~NIBBLES)
    return out.view(torch.uint8).view(len(qs), 8, 16)


def _k_scales(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(b[:, 4:16])
    return d * sc.astype(np.float32), dmin * m.astype(np.float32)


def _q4_k(b):
    scale, offset = _k_scales(b)
    return _q4_k_nibbles(b[:, 16:]), scale, 8 * scale - offset


def _q5_k(b):  # in torch, as `_q6_k`
    scale, offset = _k_scales(b)
    n, src = len(b), _file_bytes(b)
    low = unpack_nibbles(src[:, 48:], 32).view(n, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = (src[:, 16:48].reshape(n, 1, 32) >> shifts).bitwise_and_(1)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(16)  # 0..31 - 16
    return q.view(n, 256).numpy(), scale, 16 * scale - offset


def _q6_k(b):  # in torch, in place where it can: numpy's passes took 8 of a 7B Q4_K_M file's 30 s of loading
    n, src = len(b), _file_bytes(b)
    low = unpack_nibbles(src[:, :128], 64).view(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = (src[:, 128:192].reshape(n, 2, 1, 32) >> shifts).bitwise_and_(3).view(n, 8, 32)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)  # 0..63 - 32
    scale = torch.from_numpy(_f16(b[:, 208:210])) * src[:, 192:208].view(torch.int8).float()
    return q.view(n, 256).numpy(), scale.numpy(), None


def _q8_0(b):
    return b[:, 2:].copy().view(np.int8), _f16(b[:, :2]), None


_REPACK = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "Q8_0": _q8_0}
# Types kept packed (QuantizedWeight.nibbles), in `cpu_kernels.pack_nibbles`' layout (byte j of a block of 32:
# values j and j + 16), which the CPU's layout copies in as they are: Q4_0's and Q4_1's bytes are that
# layout already (q is a view of the file), Q4_K's are rearranged by words. Unpacking and packing again
# took 8 of a 7B Q4_0 file's 19 s of loading, a contiguous copy of the file's bytes 2.4 more.
_PACKED = ("Q4_0", "Q4_1", "Q4_K")


def repack(data: np.ndarray, type_name: str, rows: int, cols: int) -> QuantizedWeight:
    """The raw bytes of a GGUF tensor [rows, cols] (row-major, blocks along cols) as a QuantizedWeight."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if cols % block:
        raise ValueError(f"a {type_name} row of {cols} values is not a whole number of blocks of {block}")
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, size)
    if len(blocks) != rows * cols // block:
        raise ValueError(f"expected {rows * cols // block} blocks of {type_name}, found {len(blocks)}")
    q, scale, zero = _REPACK[type_name](blocks)
    fmt = FORMATS[type_name]
    groups = cols // fmt.group_size

    def as_rows(a, dtype=None):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).reshape(rows, -1)

    packed = type_name in _PACKED
    q = q.view(rows, cols // 32, 16) if packed else as_rows(q).reshape(rows, cols)
    return QuantizedWeight(fmt.kind, q, as_rows(scale).reshape(rows, groups),
                           None if zero is None else as_rows(zero).reshape(rows, groups), fmt.group_size, type_name,
                           nibbles=packed)
