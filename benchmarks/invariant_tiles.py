"""Tile sweep for the batch-invariant bf16 matmul (issue 26): one decode step's weight matmuls at the
Mistral-7B shapes through `batch_invariant.invariant_mm` with each (BLOCK_M, BLOCK_N, BLOCK_K, warps,
stages), against cuBLAS, at a few row counts. Every tile is invariant (its K order is fixed whatever M);
the sweep only picks the fastest for `batch_invariant.TILES`. Each config is checked against fp32.

    python3 benchmarks/invariant_tiles.py [--rows 1,8] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from gemv_bench import PER_STEP, ROTATE_BYTES, SHAPES, time_us

from mistral7b import batch_invariant

# Pruned by the H100 sweep of 2026-12-05 (results/2026-12-05e-h100-tiles.log, cut after 17 of 36 tiles at
# 300 s): 8 warps ran at 0.70-0.85 of cuBLAS, and BLOCK_K 128 lost to 256 at every BLOCK_N tried; BLOCK_N 16
# ran at most 1.008 at M 8, BLOCK_N 32 1.010 (32, 256, 4, 3). BLOCK_N 64 was not reached.
GRID = {"block_n": (32, 64), "block_k": (256, 512), "warps": (4,), "stages": (3, 4)}


def configs(quick: bool) -> list[tuple[int, int, int, int, int]]:
    if quick:
        return [(16, n, k, w, s) for n, k, w, s in ((32, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4))]
    grid = [(16, n, k, w, s) for n, k, w, s in itertools.product(*GRID.values())]
    current = batch_invariant.TILES[torch.bfloat16]
    return grid if current in grid else [current, *grid]


def step_ms(fn, rows: list[int], mats: dict) -> dict[int, float]:
    out = {}
    for m in rows:
        total = 0.0
        for name, copies in mats.items():
            x = torch.randn(m, copies[0].shape[1], device="cuda", dtype=torch.bfloat16)
            total += time_us(lambda x, w, n: fn(x, w), x, copies, copies[0].shape[0]) * PER_STEP[name]
        out[m] = total / 1e3
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--quick", action="store_true", help="four configs (a sanity run)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    mats = {}
    for name, (n, k) in SHAPES.items():
        count = max(2, -(-ROTATE_BYTES // (n * k * 2)) * 2)
        mats[name] = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(count)]
    results = [{"tile": "cuBLAS", "ms": step_ms(F.linear, rows, mats)}]
    print("cuBLAS: " + ", ".join(f"M {m} {v:.3f} ms" for m, v in results[0]["ms"].items()), flush=True)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ mats["wo"][0].float().t()
    for cfg in configs(args.quick):
        batch_invariant.TILES[torch.bfloat16] = cfg
        try:
            got = batch_invariant.invariant_mm(x, mats["wo"][0]).float()
            err = float((got - want).norm() / want.norm())
            ms = step_ms(batch_invariant.invariant_mm, rows, mats)
        except Exception as e:  # a config Triton cannot fit (shared memory) is skipped, not fatal
            print(f"{cfg}: skipped ({type(e).__name__})", flush=True)
            continue
        results.append({"tile": list(cfg), "ms": ms, "rel_error": err})
        print(f"{cfg}: " + ", ".join(f"M {m} {v:.3f} ms ({results[0]['ms'][m] / v:.3f} of cuBLAS speed)"
                                     for m, v in ms.items()) + f", err {err:.1e}", flush=True)
    ranked = sorted(results[1:], key=lambda r: r["ms"][rows[-1]])
    print(f"\nfastest at M {rows[-1]} (step ms; cuBLAS {results[0]['ms'][rows[-1]]:.3f}):")
    for r in ranked[:8]:
        print(f"  {tuple(r['tile'])}: " + ", ".join(f"M {m} {v:.3f}" for m, v in r["ms"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "device": torch.cuda.get_device_name(), "torch": torch.__version__}, f,
                      indent=2)
    return 0 if ranked and all(r["rel_error"] < 1e-2 for r in ranked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
