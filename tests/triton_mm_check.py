"""Run under TRITON_INTERPRET=1: the Triton weight-only matmuls (quant/triton_mm.py), interpreted on the
CPU, against the dequantized weight in float64 on random shapes, each with several tile variants (fp32
activations: the interpreter's bf16 is not the GPU's). The int4 weights are packed into tinygemm's CUDA
layout by `kernels.pack_cuda_tiles_reference`, which the GPU smoke suite checks against torch's packer.
Exits non-zero on a mismatch."""

from __future__ import annotations

import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mistral7b.quant.kernels import pack_int4, pack_scales_zeros
from mistral7b.quant.triton_mm import int4_rows, int4_rows_mm, int8_rows, int8_rows_mm

G = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def report(name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    err = ((got.double() - want).norm() / want.norm()).item()
    ok = err < 1e-5 and got.shape == want.shape
    print(f"{name}: rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    return ok


def int8_cases() -> int:
    failures = 0
    for (m, n, k), config in zip(((1, 40, 200), (1, 37, 300), (8, 96, 128), (33, 17, 300), (64, 8200, 64)),
                                 (None, dict(BLOCK_N=4, BLOCK_K=128), dict(BLOCK_N=32, BLOCK_K=256),
                                  dict(BLOCK_N=16, BLOCK_K=128), dict(BLOCK_N=64, BLOCK_K=128))):
        x = torch.randn(m, k + 3, generator=G)[:, :k]  # a strided view, as activations can be
        q = torch.randint(-128, 128, (n, k), generator=G, dtype=torch.int8)
        scale = torch.rand(n, generator=G) / 64 + 1e-3
        want = x.double() @ (q.double() * scale.double()[:, None]).t()
        failures += not report(f"int8 M {m} N {n} K {k} {config}", int8_rows(x, q, scale, config), want)
    return failures


def int4_case(m: int, n: int, k: int, group: int, config: dict | None) -> bool:
    q = torch.randint(0, 16, (n, k), generator=G, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=G) / 16 + 1e-3
    zero = torch.randn(n, k // group, generator=G) / 8
    packed = pack_int4(q, torch.device("cpu"), "halves")
    scales_zeros = pack_scales_zeros(scale, zero, torch.device("cpu")).float()  # the kernel's stored values
    s, z = scales_zeros[:, :n, 0].t().double(), scales_zeros[:, :n, 1].t().double()
    w = (q.double() - 8).view(n, -1, group) * s[..., None] + z[..., None]
    x = torch.randn(m, k + 5, generator=G)[:, :k]
    want = x.double() @ w.view(n, k).t()
    name = f"int4 M {m} N {n} K {k} group {group} {config}"
    return report(name, int4_rows(x, packed, group, scales_zeros, n, config), want)


def int4_cases() -> int:
    cases = [((1, 36, 512, 128), None),                                  # one row, padded rows
             ((1, 20, 1024, 32), dict(BLOCK_N=8, GROUPS=4)),             # one row, four groups in a block
             ((1, 12, 1536, 128), dict(BLOCK_N=8, GROUPS=4)),            # one row, a half of 1.5 blocks
             ((1, 20, 1536, 96), dict(BLOCK_N=16, BLOCK_K=64)),          # one row, a group of no power of two
             ((16, 24, 512, 64), dict(BLOCK_N=16, BLOCK_K=64)),          # a group per block
             ((40, 20, 1024, 128), dict(BLOCK_N=32, BLOCK_K=256)),       # two groups in a block, a 64-row tile
             ((5, 72, 1536, 256), dict(BLOCK_N=64, BLOCK_K=128)),        # a block of half a group
             ((3, 8, 512, 32), dict(BLOCK_N=16, BLOCK_K=64))]            # two groups in a block, 16-row tile
    failures = sum(not int4_case(*shape, config) for shape, config in cases)
    for k, width in ((768, 384), (1024, 256)):  # K not a multiple of 512; packed for another K
        try:
            int4_rows(torch.randn(1, k), torch.zeros(8, width, dtype=torch.uint8), 128, torch.rand(k // 128, 8, 2), 8)
            print(f"int4 K {k} packed width {width} accepted: FAIL")
            failures += 1
        except ValueError as e:
            print(f"int4 K {k} packed width {width} refused ok: {e}")
    return failures


def fake_matches_real() -> bool:
    """The custom ops' fake kernels give the real outputs' shapes, strides and dtypes (inductor asserts them)."""
    q4 = torch.randint(0, 16, (32, 512), dtype=torch.uint8)
    cases = [(int8_rows_mm, (torch.randn(4, 64), torch.randint(-128, 128, (32, 64), dtype=torch.int8), torch.rand(32))),
             (int4_rows_mm, (torch.randn(3, 512), pack_int4(q4, torch.device("cpu"), "halves"), 128,
                             torch.rand(4, 32, 2), 30))]
    for op, args in cases:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        real = op(*args)
        if (fake.shape, fake.stride(), fake.dtype) != (real.shape, real.stride(), real.dtype):
            print(f"{op} fake kernel differs from the real one: FAIL")
            return False
    print("fake kernels: the real output shapes and strides ok")
    return True


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    failures = int8_cases() + int4_cases()
    return 1 if failures or not fake_matches_real() else 0


if __name__ == "__main__":
    sys.exit(main())
