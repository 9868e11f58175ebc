"""Decode's weight matmuls, one matrix at a time at the Mistral-7B shapes, on a GPU: each kernel checked
against its dequantized weight, then timed (µs per call, TB/s of weight bytes read) at M = 1, 8, 16 rows.

Kernels: bf16 cuBLAS; int8 per channel through torch (the compiled reduction, with --reduction: it
compiles per shape) and `quant/triton_mm.py`; int4 g128 through tinygemm (`_weight_int4pack_mm`),
`triton_mm` on its "halves" layout (byte j of a row holds inputs j and K/2 + j), gemlite's Triton
kernels on their layout (`quant/gemlite_mm.py`) where gemlite is installed, and tinygemm's weight
dequantized then cuBLAS (what `int4_mm` runs from CUDA_DEQUANT_ROWS rows on). Each timed call reads a
different copy of the weight (over 256 MB in all, beyond the 50 MB L2), replayed as one CUDA graph.
The last table sums one decode step (32 layers and the head) per kernel: the ceiling its weight reads set
on tok/s.

    python3 benchmarks/gemv_bench.py [--rows 1,8,16] [--kernels bf16,int4] [--reduction] [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mistral7b.quant import gemlite_mm, kernels
from mistral7b.quant.triton_mm import _int4_kernel, _int4_row_kernel, _int8_kernel, int4_rows_mm, int8_rows_mm

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336), "head": (32000, 4096)}
PER_STEP = {"wqkv": 32, "wo": 32, "w13": 32, "w2": 32, "head": 1}
GROUP = 128
ROTATE_BYTES = 256 << 20


def weights(n: int, k: int, dev) -> dict:
    q4 = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
    scale4 = torch.rand(n, k // GROUP, device=dev) / 64 + 1e-3
    zero4 = torch.randn(n, k // GROUP, device=dev) / 64
    q8 = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
    scale8 = (torch.rand(n, device=dev) / 256 + 1e-4).to(torch.bfloat16)
    w4 = ((q4.float() - 8).view(n, -1, GROUP) * scale4[..., None] + zero4[..., None]).view(n, k)
    sz4 = kernels.pack_scales_zeros(scale4, zero4, dev)
    out = {"bf16": torch.randn(n, k, device=dev, dtype=torch.bfloat16) / 64,
            "int4": (kernels.pack_int4(q4, dev), sz4), "int4h": (kernels.pack_int4(q4, dev, "halves"), sz4),
            "int8": (q8, scale8), "dense4": w4.to(torch.bfloat16), "dense8": (q8.float() * scale8.float()[:, None])}
    if gemlite_mm.available():
        gemlite_mm.require()  # as a module's packing does: float32 split-K sums
        out["gemlite4"] = gemlite_int4(q4, scale4, zero4)
    return out


def gemlite_int4(q4, scale4, zero4):
    """Our int4 weight in gemlite's layout (quant/gemlite_mm.py), as the module holds it."""
    return kernels.pack_int4(q4, q4.device, "gemlite"), kernels.pack_scales_zeros(scale4, zero4, q4.device, "gemlite")


def gemlite_layout_matches(q4, scale4, zero4) -> bool:
    """gemlite_mm's words, scales, offsets and integer arguments against `GemLiteLinear.pack(..., fma_mode=True)`
    of the same weight (zeros given in its (q - zeros) * scales form: 8 - z / s, so that it stores z - 8 s)."""
    from gemlite import DType, GemLiteLinear

    n, k = q4.shape
    lin = GemLiteLinear(4, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.BF16,
                        output_dtype=DType.BF16)
    s = scale4.to(torch.bfloat16)
    lin.pack(q4, s, (8 - zero4 / s.float()), None, fma_mode=True)
    packed, sz = gemlite_int4(q4, scale4, zero4)
    offsets_close = torch.allclose(lin.zeros.float(), sz[1].float(), rtol=2e-2, atol=1e-3)
    ok = (torch.equal(lin.W_q.view(torch.int32), packed) and torch.equal(lin.scales, sz[0]) and offsets_close
          and lin.get_meta_args() == gemlite_mm.meta_args(GROUP))
    print(f"gemlite layout {n}x{k}: {'ok' if ok else 'FAIL'} (meta {lin.get_meta_args()} against "
          f"{gemlite_mm.meta_args(GROUP)}; words {tuple(lin.W_q.shape)} {lin.W_q.dtype})", flush=True)
    return ok


def kernel_table(reduction: bool) -> dict:
    reduce = torch.compile(kernels.int8_mm_cuda, dynamic=False) if reduction else None
    table = {
        "bf16 cuBLAS": (lambda x, w, n: F.linear(x, w["bf16"]), "bf16"),
        "int8 triton": (lambda x, w, n: int8_rows_mm(x, *w["int8"]), "int8"),
        "int4 tinygemm": (lambda x, w, n: torch.ops.aten._weight_int4pack_mm(x, w["int4"][0], GROUP, w["int4"][1]),
                          "int4"),
        "int4 triton": (lambda x, w, n: int4_rows_mm(x, w["int4h"][0], GROUP, w["int4h"][1], n), "int4h"),
        # What kernels.int4_mm does from CUDA_DEQUANT_ROWS rows on: the weight dequantized, then cuBLAS
        "int4 dequant+cuBLAS": (lambda x, w, n: F.linear(x, kernels.dense_int4(*w["int4"], GROUP, n, x.shape[-1])),
                                "int4"),
    }
    if gemlite_mm.available():
        table["int4 gemlite"] = (lambda x, w, n: gemlite_mm.mm(x, *w["gemlite4"], GROUP, n), "gemlite4")
    if reduce is not None:
        table["int8 reduction"] = (lambda x, w, n: reduce(x, *w["int8"], "torch"), "int8")
    return table


def weight_bytes(w: dict, fmt: str) -> int:
    if fmt == "bf16":
        return w["bf16"].nbytes
    return sum(t.nbytes for t in w[fmt])


def check(fn, x, w, n, fmt) -> float:
    want = x.float() @ (w["dense4"] if fmt.startswith(("int4", "gemlite4")) else w["dense8"] if fmt == "int8" else w["bf16"]).float().t()
    got = fn(x, w, n)[:, :n].float()
    return float((got - want).norm() / want.norm())


def time_us(fn, x, copies, n) -> float:
    import triton.testing

    def run():
        for w in copies:
            fn(x, w, n)

    run()  # autotune and compile outside the graph
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(run, rep=200) * 1000 / len(copies)


def best_configs() -> str:
    return "; ".join(f"{name} {getattr(k, 'best_config', None)}" for name, k in
                     (("int8 M1", _int8_kernel(True)), ("int8", _int8_kernel(False)), ("int4 M1", _int4_row_kernel()), ("int4", _int4_kernel(False))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--reduction", action="store_true", help="also torch's compiled int8 reduction (slow to compile)")
    p.add_argument("--kernels", default="", help="only kernels whose label contains one of these (e.g. bf16,int4)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    table = {k: v for k, v in kernel_table(args.reduction).items() if any(f in k for f in args.kernels.split(","))}
    results, worst = [], {}
    layouts_ok = True
    for name, (n, k) in SHAPES.items():
        base = weights(n, k, dev)
        if gemlite_mm.available():
            q4 = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
            layouts_ok &= gemlite_layout_matches(q4, torch.rand(n, k // GROUP, device=dev) / 64 + 1e-3,
                                                 torch.randn(n, k // GROUP, device=dev) / 64)
        for label, (fn, fmt) in table.items():
            for m in (1, 8):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                worst[label] = max(worst.get(label, 0.0), check(fn, x, base, n, fmt))
        count = max(2, -(-ROTATE_BYTES // weight_bytes(base, "bf16")) * 2)
        copies = [base] + [weights(n, k, dev) for _ in range(count - 1)]
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            for label, (fn, fmt) in table.items():
                us = time_us(fn, x, copies, n)
                tbs = weight_bytes(base, fmt) / us / 1e6
                results.append({"matrix": name, "n": n, "k": k, "rows": m, "kernel": label, "us": us, "tb_s": tbs})
                print(f"{name:5s} {n:6d}x{k:<6d} M {m:2d}  {label:15s} {us:8.1f} µs  {tbs:5.2f} TB/s", flush=True)
            print(f"  autotuned: {best_configs()}", flush=True)
        del copies, base
        torch.cuda.empty_cache()
    print("\nrel. error vs the dequantized weight (fp32), M 1 and 8: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    print("\none decode step's weight matmuls (32 layers + head), ms, and the tok/s they cap:")
    print("| kernel | " + " | ".join(f"M {m}" for m in rows) + " |\n|---|" + "---|" * len(rows))
    steps = {}
    for label in table:
        cells = []
        for m in rows:
            ms = sum(r["us"] * PER_STEP[r["matrix"]] for r in results if r["kernel"] == label and r["rows"] == m) / 1e3
            steps[f"{label} M{m}"] = ms
            cells.append(f"{ms:.2f} ms ({1e3 / ms:.0f} tok/s)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "step_ms": steps, "rel_error": worst, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__}, f, indent=2)
    return 1 if any(v > 2e-2 for v in worst.values()) or not layouts_ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
