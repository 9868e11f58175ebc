"""The CPU's quantized matmuls (`quant/cpu_kernels`) one matrix at a time, at the Mistral-7B shapes or the
default model's: each checked against the dequantized weight's float matmul, then timed at 1 row (decode),
5 (a verify of k = 4) and 8 rows. The last table sums one 7B decode step's layers (32 of each matrix):
the matmuls' share of a step, and what a verify of 5 tokens costs in decode steps.

Those timings repeat one matrix, so its bytes come from the caches. A decode step reads every weight
once from memory: `--cold` also times a step's sequence of q4_1 matmuls over distinct weights per layer
(3 layers at the 7B shape, scaled to 32; all 30 and the Q8_0 head for the default model), in GB/s of
weight bytes against this machine's copy bandwidth.

    python3 benchmarks/cpu_matmul.py [--shape mistral-7b|default] [--rows 1 5 8] [--threads 2] [--cold] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mistral7b.native import cpu_variant
from mistral7b.quant import cpu_kernels

# (name, out features N, in features K) of one layer, as this project fuses them (QKV, gate+up).
SHAPES = {
    "mistral-7b": [("wqkv", 6144, 4096), ("wo", 4096, 4096), ("w13", 28672, 4096), ("w2", 4096, 14336)],
    "default": [("wqkv", 960, 576), ("wo", 576, 576), ("w13", 3072, 576), ("w2", 576, 1536)],
}
LAYERS = {"mistral-7b": 32, "default": 30}
FORMATS = {"q4_1": (4, True), "q8_0": (8, False)}  # bits, block offsets


def quantized(n: int, k: int, bits: int, offsets: bool, gen: torch.Generator):
    q = torch.randint(0, 16 if bits == 4 else 256, (n, k), dtype=torch.uint8, generator=gen)
    stored = cpu_kernels.pack_nibbles(q) if bits == 4 else (q.to(torch.int16) - 128).to(torch.int8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half()
    m = (torch.randn(n, k // 32, generator=gen) * 0.05).half() if offsets else None
    values = (q.float() if bits == 4 else q.float() - 128).view(n, k // 32, 32)
    dense = values * d.float()[..., None] + (0 if m is None else m.float()[..., None])
    return stored, d, m, dense.view(n, k)


def ms_per_call(fn, repeats: int) -> float:
    """Median over `repeats` timings of enough calls to fill 20 ms (small matrices take microseconds)."""
    start = time.perf_counter()
    fn()
    calls = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def measure(shape: str, rows: list[int], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    table = []
    for fmt, (bits, offsets) in FORMATS.items():
        for name, n, k in SHAPES[shape]:
            stored, d, m, dense = quantized(n, k, bits, offsets, gen)
            for r in rows:
                x = torch.randn(r, k, generator=gen)
                got = cpu_kernels.linear(x, stored, bits, d, m, n)
                want = x @ dense.t()
                # 8-bit activations: errors of about 1/127 of a block's largest input, relative to the output's scale
                err = ((got - want).norm() / want.norm()).item()
                if err > 2e-2:
                    raise SystemExit(f"{fmt} {name} rows {r}: relative error {err:.2e} against the dequantized matmul")
                ms = ms_per_call(lambda: cpu_kernels.linear(x, stored, bits, d, m, n), repeats)
                table.append({"format": fmt, "matrix": name, "n": n, "k": k, "rows": r, "ms": ms,
                              "gmac_s": r * n * k / ms / 1e6, "rel_err": err})
    return table


def print_tables(shape: str, table: list[dict], rows: list[int]) -> None:
    print(f"{'format':>6} {'matrix':>6} {'N x K':>12} {'rows':>4} {'ms':>8} {'GMAC/s':>8} {'rel err':>9}")
    for t in table:
        print(f"{t['format']:>6} {t['matrix']:>6} {t['n']:>6}x{t['k']:<5} {t['rows']:>4} {t['ms']:>8.3f} "
              f"{t['gmac_s']:>8.2f} {t['rel_err']:>9.2e}")
    print(f"\none step's matmuls ({LAYERS[shape]} layers, no head), ms:")
    for fmt in FORMATS:
        step = {r: LAYERS[shape] * sum(t["ms"] for t in table if t["format"] == fmt and t["rows"] == r) for r in rows}
        ratios = "  ".join(f"{r} rows {step[r]:.1f} ({step[r] / step[rows[0]]:.2f}x)" for r in rows)
        print(f"  {fmt}: {ratios}")


def cold_step(shape: str, rows: list[int], repeats: int) -> list[dict]:
    """Each row count's step of matmuls over distinct weights per layer (memory-bound, as decode is)."""
    gen = torch.Generator().manual_seed(1)
    built = LAYERS[shape] if shape == "default" else 3
    layers = [[(*quantized(n, k, 4, True, gen)[:3], n, k) for _, n, k in SHAPES[shape]] for _ in range(built)]
    head = quantized(49152, 576, 8, False, gen)[:2] if shape == "default" else None  # SmolLM2's tied Q8_0 head
    nbytes = sum(t.nbytes for layer in layers for w in layer for t in w[:3]) + (sum(t.nbytes for t in head) if head else 0)
    table = []
    for r in rows:
        xs = {k: torch.randn(r, k, generator=gen) for _, _, k in SHAPES[shape]}

        def step():
            for layer in layers:
                for stored, d, m, n, k in layer:
                    cpu_kernels.linear(xs[k], stored, 4, d, m, n)
            if head:
                cpu_kernels.linear(xs[576], head[0], 8, head[1], None, 49152)

        step()
        seconds = min(timed_once(step) for _ in range(repeats))
        table.append({"rows": r, "ms": seconds * 1e3 * LAYERS[shape] / built, "gb_s": nbytes / seconds / 1e9})
    return table


def timed_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_gb_s() -> float:
    """Memory read bandwidth: the best of 5 sums of a 256 MB tensor."""
    x = torch.ones(64 << 20)
    x.sum()
    return x.nbytes / min(timed_once(x.sum) for _ in range(5)) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5, 8])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cold", action="store_true", help="also a decode step's matmuls from memory (see above)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = measure(args.shape, args.rows, args.repeats)
    print(f"{args.shape}, variant {cpu_variant()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print_tables(args.shape, table, args.rows)
    cold = cold_step(args.shape, args.rows, args.repeats) if args.cold else []
    if cold:
        bandwidth = copy_gb_s()
        print(f"\none step's q4_1 matmuls from memory{' and the Q8_0 head' if args.shape == 'default' else ''} "
              f"(best of {args.repeats}); memory read {bandwidth:.1f} GB/s:")
        for c in cold:
            print(f"  {c['rows']} rows {c['ms']:.1f} ms, {c['gb_s']:.1f} GB/s ({c['gb_s'] / bandwidth:.0%} of memory read)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "variant": cpu_variant(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "table": table, "cold": cold}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
