"""LoRA: what the batched adapter delta costs per decode step, on the model and KVCache directly.

Random weights at a preset's shape (speed does not depend on the values). Each batch size is timed
three ways: the base model (no adapters), every row on one of `--adapters` adapters of rank `--rank` on
all linears (head included), and the same with half the rows on the base model (slot 0). Eager by default
(`--compile`: the engine's compiled step, CUDA graphs on a GPU): the delta adds two matmuls and a
scatter per slot present and linear, kernel launches that graphs would hide. `--delta` picks the
formulations (lora.LoRABank.delta) timed in the same run, each its own compiled step: compiled, "all"
(the default: "matmul", "reduce", "triton", lora_triton's two kernels a linear, and "fused", its one);
eager, "triton" and "fused" run those kernels on a GPU too. Each batch size prints as it finishes, with
what each way's first call took (compiling, when compiled), and the JSON is rewritten after each: a run
cut off still shows what finished.

H200: python benchmarks/lora_bench.py --preset mistral-7b-v0.1 --batch 1 8 64 [--compile] [--delta matmul triton fused]
CPU:  OMP_NUM_THREADS=1 python benchmarks/lora_bench.py --preset tiny --batch 1 8 --device cpu --steps 30 --rounds 5

Seen on the shared 2-core CPU (tiny shape, fp32, 4 adapters of rank 16, one thread, --steps 30):
- 2026-12-04, per-row gather of A and B and two bmm, three runs on a loaded machine: batch 1 x1.08 to
  x1.26 the base step, batch 8 x1.28 to x1.43; the gathers of each row's B (the head's 32000 x 16 per
  row above all) were most of it.
- 2026-12-04 23:44-23:46 UTC, load average 4.4-5.2, --rounds 5, three runs of each alternated: the per-row gather
  x1.13-1.25 at batch 1, x1.29-1.42 at batch 8 (fastest: base 16.82 ms, every row 21.72, half 21.69);
  rows grouped by slot, one matmul pair per slot (lora.py) x0.85-1.10 at batch 1, x1.14-1.18 at batch 8
  (fastest: base 16.21 ms, every row 18.45, half the rows 17.12).
Four rank-16 adapters on every linear add 26% to the base weights' elements at the tiny shape (the fused
q/k/v and gate/up B read with their zero blocks), 3.6% at the 7B shape: what a memory-bound step reads
more.
H100 (2026-12-05, 7B shape, bf16, 4 adapters of rank 16): eager x1.37 at batch 1, x2.17 at 8, x2.36 at
64; compiled ("matmul"), base 5.69 ms / 5.90 ms, every row 7.55 ms (x1.33) / 7.75 ms (x1.31) at batch
1 / 8; batch 64 was still compiling when the run was cut off at 240 s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mistral7b.cache import KVCache
from mistral7b.config import ModelConfig, preset
from mistral7b.lora import DELTAS, _linear_slots, enable_lora
from mistral7b.model import Transformer

TINY = ModelConfig(dim=512, n_layers=4, head_dim=64, hidden_dim=1536, n_heads=8, n_kv_heads=2, vocab_size=32000,
                   sliding_window=None, max_seq_len=4096, name="tiny")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mistral-7b-v0.1", help="a mistral7b preset or tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--context", type=int, default=512, help="position of the decoded token")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1,
                   help="time the three ways in turn this many times and keep each one's fastest (a loaded machine)")
    p.add_argument("--compile", action="store_true",
                   help="the engine's compiled decode step (CUDA graphs on a GPU) instead of eager forwards")
    p.add_argument("--delta", nargs="+", choices=(*DELTAS, "both", "all"), default=None,
                   help="the delta formulation(s) to time, each its own compiled step: both = matmul and "
                        "reduce, all = every one (default: all with --compile, else matmul)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    named = args.delta or (["all"] if args.compile else ["matmul"])
    groups = {"both": ["matmul", "reduce"], "all": list(DELTAS)}
    args.deltas = list(dict.fromkeys(d for name in named for d in groups.get(name, [name])))
    args.delta = ",".join(args.deltas)
    if "reduce" in args.deltas and not args.compile:
        p.error("--delta reduce needs --compile (eager forwards group rows by slot instead)")
    return args


def random_adapter(config, rank: int, generator: torch.Generator, std: float) -> dict:
    """canonical name -> (A [rank, in], B [out, rank]) with N(0, std^2) entries, for every linear an adapter may
    target (the head included): a `LoRABank.write` argument."""
    return {s.name: (torch.randn(rank, s.cols, generator=generator) * std,
                     torch.randn(s.hi - s.lo, rank, generator=generator) * std) for s in _linear_slots(config)}


def build(args):
    config = TINY if args.preset == "tiny" else preset(args.preset)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = Transformer(config).to(dtype).eval()
    bank = enable_lora(model, args.adapters, args.rank)
    g = torch.Generator(device="cpu").manual_seed(0)
    for slot in range(1, args.adapters + 1):  # random adapters: speed does not depend on the values
        bank.write(slot, random_adapter(config, args.rank, g, 0.01), 1.0)
    return model, config, dtype, bank


def first_call(model, cache, batch, context, adapters, device, compiled=None) -> float:
    """Seconds the first step takes: compiling (and Triton autotuning), when compiled."""
    t0 = time.perf_counter()
    time_decode(model, cache, batch, context, adapters, 0, device, compiled, warmup=1)
    return time.perf_counter() - t0


def decode_step(model, cache, batch, context, adapters, device, compiled=None, tokens=None):
    """One decode step's callable (compiled or eager) at `context`, returning the logits."""
    tokens = torch.ones(batch, 1, dtype=torch.long, device=device) if tokens is None else tokens
    positions = torch.full((batch, 1), context, device=device)
    kw = {} if adapters is None else {"adapters": adapters}

    def step():
        if compiled is not None:
            return compiled(tokens, positions, context + 1, **kw)
        return model(tokens, positions, cache, rows=slice(0, batch), kv_len=context + 1, **kw)
    return step


def check_ways(model, bank, cache, batch, ways, args) -> list[str]:
    """Each way's logits on random tokens against the eager grouped delta's ("matmul" uncompiled) for the
    same rows' slots: the formulations differ only in rounding. Returns the failures' names."""
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=args.device)
    failures = []
    with torch.no_grad():
        for name, (d, a, compiled) in ways.items():
            bank.delta = "matmul"
            want = decode_step(model, cache, batch, args.context, a, args.device, None, tokens)().float()
            bank.delta = d
            got = decode_step(model, cache, batch, args.context, a, args.device, compiled, tokens)().float()
            err = ((got - want).norm() / want.norm()).item()
            ok = err < 3e-2  # bf16 on a GPU: differently rounded sums, not a wrong delta (that is O(1))
            print(f"batch {batch:3d}: check {name}: rel err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
            failures += [] if ok else [name]
    return failures


def time_decode(model, cache, batch, context, adapters, steps, device, compiled=None, warmup=3) -> float:
    step = decode_step(model, cache, batch, context, adapters, device, compiled)

    with torch.no_grad():
        for _ in range(warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(steps, 1) * 1e3


def main(argv=None) -> None:
    args = parse_args(argv)
    model, config, dtype, bank = build(args)
    rows = []
    for batch in args.batch:
        t_batch = time.perf_counter()
        print(f"batch {batch:3d}: starting ({'compiled, ' if args.compile else ''}delta {args.delta})", flush=True)
        cache = KVCache(config, batch, torch.device(args.device), dtype, args.context + 8)
        ways = batch_ways(model, cache, batch, args)
        first, broken = first_calls(model, bank, cache, batch, ways, args)
        failures = check_ways(model, bank, cache, batch, ways, args)
        times: dict[str, float] = {}
        for _ in range(args.rounds):  # in turn, so a burst of load from other jobs hits every way alike
            for name, (d, a, compiled) in ways.items():
                bank.delta = d
                t = time_decode(model, cache, batch, args.context, a, args.steps, args.device, compiled)
                times[name] = min(times.get(name, t), t)
        rows.append({"batch": batch, "first_call_s": {k: round(v, 1) for k, v in first.items()},
                     "failed": failures + [f"{d}: {error}" for d, error in broken.items()],
                     **{k: round(v, 3) for k, v in times.items()}})
        report(batch, times, args, time.perf_counter() - t_batch)
        del ways, cache
        if args.json:  # after each batch size: a run cut off keeps what finished
            with open(args.json, "w") as f:
                json.dump({"preset": config.name, "device": args.device, "rank": args.rank, "compile": args.compile,
                           "adapters": args.adapters, "deltas": args.deltas, "rows": rows}, f, indent=2)


def first_calls(model, bank, cache, batch, ways, args) -> tuple[dict, dict]:
    """Each way's first call (compile, graph record) in seconds, and delta -> error for a delta whose first
    call failed: its ways are dropped, so the others are still timed (2026-12-06c: the fused delta's failure
    cost the triton delta's timings). The base step's failure is raised: nothing would compare."""
    first, broken = {}, {}
    for name, (d, a, compiled) in list(ways.items()):
        if d in broken and a is not None:
            continue
        bank.delta = d  # a step compiled for one delta recompiles if called with the other
        try:
            first[name] = first_call(model, cache, batch, args.context, a, args.device, compiled)
        except Exception as e:  # noqa: BLE001 - one delta's failure must not hide the others' figures
            if a is None:
                raise
            broken[d] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"batch {batch:3d}: {name}: FAILED, {broken[d]}", flush=True)
            for other in [n for n, way in ways.items() if way[0] == d and way[1] is not None]:
                del ways[other]
            continue
        print(f"batch {batch:3d}: {name}: first call {first[name]:.1f} s", flush=True)
    return first, broken


def batch_ways(model, cache, batch, args) -> dict:
    """name -> (delta, the rows' slots or None, the compiled step or None): the base model, then every row
    and half the rows on an adapter for each delta timed, each delta with a compiled step of its own."""
    every = (torch.arange(batch) % args.adapters + 1).to(args.device)
    half = torch.where(torch.arange(batch, device=args.device) % 2 == 0, every, 0)
    mode = "reduce-overhead" if args.device == "cuda" else None
    ways = {}
    for d in args.deltas:
        compiled = model.compile_decode(cache, mode) if args.compile else None
        if not ways:
            ways["base"] = (d, None, compiled)
        ways[f"all rows {d}"] = (d, every, compiled)
        ways[f"half rows {d}"] = (d, half, compiled)
    return ways


def report(batch, times, args, seconds) -> None:
    """One line for a batch size: each delta's time and its ratio to the base step, side by side."""
    base = times["base"]

    def side(rows: str) -> str:
        return ", ".join(f"{d} {times[f'{rows} {d}']:.2f} ms (x{times[f'{rows} {d}'] / base:.3f})"
                         if f"{rows} {d}" in times else f"{d} failed" for d in args.deltas)

    print(f"batch {batch:3d}: base {base:.2f} ms | {args.adapters} adapters r{args.rank} on every row: "
          f"{side('all rows')}"
          f" | on half the rows: {side('half rows')} | {seconds:.0f} s for this batch size", flush=True)


if __name__ == "__main__":
    main()
