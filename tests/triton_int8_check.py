"""Run under TRITON_INTERPRET=1: the Triton int8 weight-only matmul, interpreted on the CPU, against
the dequantized weight in float64 on random shapes (fp32 activations: the interpreter's bf16 is not the
GPU's). Exits non-zero on a mismatch."""

from __future__ import annotations

import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mistral7b.quant.triton_int8 import int8_rows_mm


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures = 0
    for m, n, k in ((1, 40, 200), (8, 96, 128), (16, 17, 300), (3, 8200, 64)):
        x = torch.randn(m, k + 3, generator=g)[:, :k]  # a strided view, as activations can be
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) / 64 + 1e-3
        want = x.double() @ (q.double() * scale.double()[:, None]).t()
        got = int8_rows_mm(x, q, scale)
        err = ((got.double() - want).norm() / want.norm()).item()
        ok = err < 1e-5 and got.shape == (m, n)
        failures += not ok
        print(f"M {m} N {n} K {k}: rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    args = (torch.randn(4, 64), torch.randint(-128, 128, (32, 64), dtype=torch.int8), torch.rand(32))
    with FakeTensorMode() as mode:
        fake = int8_rows_mm(*(mode.from_tensor(a) for a in args))
    real = int8_rows_mm(*args)
    if (fake.shape, fake.stride(), fake.dtype) != (real.shape, real.stride(), real.dtype):
        print("fake kernel differs from the real one: FAIL")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
