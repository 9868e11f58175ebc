"""The Triton kernels (split-K decode attention, int8/int4 weight-only matmuls, LoRA deltas), run by Triton's
interpreter on the CPU (a subprocess each: the interpreter is chosen when triton is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral7b.flash_decode import invariant_split_plan, plan, split_plan


def interpret(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(Path(__file__).with_name(script))], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out


def test_decode_kernel_matches_sdpa_on_rolling_buffers():
    out = interpret("flash_decode_check.py")
    assert out.stdout.count(" ok") == 4 and "fake kernel: the real output strides" in out.stdout


def test_weight_only_matmuls_match_the_dequantized_weight():
    """int8 per channel and int4 in the "halves" layout, several tile variants each."""
    out = interpret("triton_mm_check.py").stdout
    assert out.count(" ok") == 16 and "FAIL" not in out


def test_lora_kernels_match_float64_and_the_matmul_delta():
    """lora_triton's shrink and expand, and its fused kernel: 2-d and 3-d rows (strided, off the tiles, mixed
    slots 0 / -1 / repeats, int32 and int64, fused linears' parts), the fused kernel's counters reset, a
    model's logits with delta="triton" and "fused" eager and as a compiled step with no graph break against
    "matmul", the fake kernel, the row limit."""
    out = interpret("lora_triton_check.py").stdout
    assert out.count(" ok") == 17 and "FAIL" not in out, out


@pytest.mark.parametrize("batch, slots", [(1, 4096), (8, 4096), (1, 100), (64, 256), (3, 1)])
def test_split_plan_covers_every_key_once(batch, slots):
    splits, per_split = split_plan(batch, 8, slots, processors=132)
    assert per_split % 64 == 0
    assert (splits - 1) * per_split < slots <= splits * per_split  # no empty split, no key left out
    assert per_split <= 256 or splits == 1  # a live row among idle ones still spreads over the GPU


def test_batch_invariant_kernels_give_each_row_the_same_bits_in_any_batch():
    """batch_invariant.py's matmul and norm, the quantized matmuls' and decode attention's invariant
    launches: against float64, and row for row bitwise equal over prefixes, permutations and neighbours; a
    speculative verify's attention equal to each token's decode step."""
    out = interpret("batch_invariant_check.py").stdout
    assert out.count(" ok") == 20 and "FAIL" not in out, out


@pytest.mark.parametrize("slots", [1, 64, 256, 257, 4096, 32768])
def test_invariant_split_plan_ignores_the_batch(slots):
    """Positions per split fixed (a key's split is its position's offset from the window's first, rounded down
    to 256, // 256, whatever the batch or kv_len); every key covered with one split more for the rounding."""
    splits, per_split = invariant_split_plan(slots)
    assert per_split == 256 and (splits - 2) * per_split < slots <= (splits - 1) * per_split
    cpu = torch.device("cpu")
    assert {plan(batch, kv_heads, slots, cpu, invariant=True)[1] for batch in (1, 3, 8, 64) for kv_heads in (1, 8)} == {256}
