"""Run under TRITON_INTERPRET=1 (set before triton is imported): the Triton split-K decode kernel,
interpreted on the CPU, against SDPA with the dense position mask, on random rolling-buffer states.
fp32, since the interpreter's bf16 arithmetic is not the GPU's; on the GPU the same kernel is checked
in bf16 by benchmarks/gpu_smoke.py. Prints one line per case and exits non-zero on a mismatch."""

from __future__ import annotations

import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mistral7b.attention import sdpa_attention
from mistral7b.flash_decode import flash_decode


def rolling_state(batch, kv_heads, slots, head_dim, positions, generator):
    """K/V views into a larger buffer (real cache strides) and the positions each slot holds."""
    k_buf = torch.randn(batch + 1, kv_heads, slots + 5, head_dim, generator=generator)
    v_buf = torch.randn(batch + 1, kv_heads, slots + 5, head_dim, generator=generator)
    k_pos = torch.full((batch, slots + 5), -1, dtype=torch.long)
    for row, p in enumerate(positions):
        held = torch.arange(max(0, p - slots + 1), p + 1)
        k_pos[row, held % slots] = held
    return k_buf[:batch, :, :slots], v_buf[:batch, :, :slots], k_pos[:, :slots]


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures = 0
    # (heads, kv heads, head dim, slots, window): Mistral's GQA, SmolLM2's 9/3, MHA, no window.
    for heads, kv_heads, head_dim, slots, window in ((32, 8, 128, 320, 256), (9, 3, 64, 100, None),
                                                       (4, 4, 32, 64, 16), (8, 2, 64, 130, 64)):
        batch = int(torch.randint(1, 4, (1,), generator=g))
        positions = torch.randint(0, 4 * slots, (batch,), generator=g).tolist()
        positions[-1] = -1 if batch > 1 else positions[-1]  # an idle row: no visible key
        q = torch.randn(batch, heads, 1, head_dim, generator=g)
        k, v, k_pos = rolling_state(batch, kv_heads, slots, head_dim, positions, g)
        q_pos = torch.tensor(positions)[:, None]
        got = flash_decode(q, k, v, q_pos, k_pos, window)
        want = sdpa_attention(q, k, v, q_pos, k_pos, window)
        want[q_pos[:, 0] < 0] = 0.0  # the kernel's idle rows are zeros (SDPA gives NaN there)
        err = ((got - want).norm() / want.norm()).item()
        ok = err < 1e-5 and bool(torch.isfinite(got).all())
        failures += not ok
        print(f"heads {heads}/{kv_heads} hd {head_dim} slots {slots} window {window} positions {positions}: "
              f"rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    # The fake (meta) kernel that torch.compile traces with must give the real output's strides, also
    # for a strided q (a view of the fused QKV projection, as in the model): inductor asserts them.
    qkv = torch.randn(2, 1, 12, 32, generator=g).transpose(1, 2)
    k, v, k_pos = rolling_state(2, 2, 64, 32, [70, 3], g)
    args = (qkv[:, :8], k, v, torch.tensor([[70], [3]]), k_pos, 16)
    real = torch.ops.mistral7b.flash_decode.default(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.mistral7b.flash_decode.default(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                         for a in args))
    if (fake.shape, fake.stride()) != (real.shape, real.stride()):
        print(f"fake kernel gives {fake.stride()}, the real one {real.stride()}: FAIL")
        return 1
    print("fake kernel: the real output strides")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
