"""The batch-invariant mode (issue 26, `EngineConfig.batch_invariant`) on random weights at the 7B shape.

(a) Checks: one greedy request alone against the same request among 7, 31 and 63 others (other
lengths, one of the same length so that prefills group, requests joining at different steps), for
bf16, int8 and int4 weights, on eager engines (the row count changes every step); then alone against
among 7 on the compiled engine (CUDA graphs) of (b). Token ids and log-probabilities must be
bit-identical: a PASS or FAIL line each, exit status 1 on any FAIL.
(b) Decode tok/s after the first token at batch 1 and 8 (compiled, max_batch 8, as `mistral7b bench`),
default kernels against invariant ones, and their ratio (the issue's target: >= 0.85 at batch 8).

    python benchmarks/invariant_bench.py --json out.json             # H200: bash benchmarks/h200.sh invariant
    python benchmarks/invariant_bench.py --device cpu --tiny         # a quick sanity run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from mistral7b.bench import TINY, decode_only_rate, quantized, random_model, random_prompts, release_compiled
from mistral7b.config import preset
from mistral7b.engine import Engine, EngineConfig
from mistral7b.quant import QuantConfig
from mistral7b.sampling import SamplingParams

QUANT = {"bf16": None, "int8": QuantConfig("int8"), "int4": QuantConfig("int4")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny shape instead of Mistral 7B (CPU sanity runs)")
    p.add_argument("--formats", default="bf16,int8,int4", help="weights to check (eager engines)")
    p.add_argument("--time-formats", default="bf16", help="weights to time, default against invariant (compiled)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode tokens per timed request")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    for name in args.formats.split(",") + args.time_formats.split(","):
        if name and name not in QUANT:
            p.error(f"unknown format {name!r}; choose from {', '.join(QUANT)}")
    return args


def run_schedule(engine: Engine, schedule: list[tuple[int, list[int], SamplingParams]]):
    """Add each (step, prompt, params) at its step and run until all finish; the requests in order."""
    requests, step = [None] * len(schedule), 0
    while step == 0 or not all(r is not None and r.finished for r in requests):
        for i, (at, prompt, params) in enumerate(schedule):
            if at == step:
                requests[i] = engine.add(prompt, params)
        engine.step()
        step += 1
    return requests


def check_batches(engine: Engine, vocab: int, sizes: tuple[int, ...], label: str, rng: random.Random) -> bool:
    """The target alone, then among size - 1 others (one of its length) joining at steps 0-5; PASS/FAIL lines."""
    target = [rng.randrange(vocab) for _ in range(37)]
    greedy = SamplingParams(max_tokens=24, temperature=0, logprobs=1, ignore_eos=True)
    (alone,) = run_schedule(engine, [(0, target, greedy)])
    ok = True
    for size in sizes:
        lengths = [37] + [rng.randint(1, 90) for _ in range(size - 2)]
        others = [(rng.randint(0, 5), [rng.randrange(vocab) for _ in range(n)],
                   SamplingParams(max_tokens=rng.randint(8, 40), temperature=0.8, seed=rng.randrange(99), ignore_eos=True))
                  for n in lengths]
        others[0] = (2, *others[0][1:])  # the target's length, joining with it: their prefills share a forward
        at = rng.randint(0, len(others))
        others.insert(at, (2, target, greedy))
        got = run_schedule(engine, others)[at]
        same = got.output_ids == alone.output_ids and [x.logprob for x in got.logprobs] == [x.logprob for x in alone.logprobs]
        print(f"{'PASS' if same else 'FAIL'} {label}: alone == in a batch of {size}", flush=True)
        ok &= same
    return ok


def decode_rates(engine: Engine, vocab: int, args) -> dict[str, float]:
    """Median decode tok/s after the first token at batch 1 and 8 (one warm-up pass each)."""
    rates = {}
    for batch in (1, 8):
        prompts = random_prompts(batch, 128, vocab)
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
        runs = []
        for _ in range(args.runs + 1):
            runs.append(decode_only_rate(run_schedule(engine, [(0, p, params) for p in prompts])))
        rates[f"b{batch}"] = statistics.median(runs[1:])
    return rates


def model_for(fmt: str, base, device):
    return base if QUANT[fmt] is None else quantized(base, QUANT[fmt], device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, cuda = torch.device(args.device), torch.device(args.device).type == "cuda"
    config = TINY if args.tiny else preset("mistral-7b-v0.1")
    base, rng, ok = random_model(config, device), random.Random(0), True
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "shape": config.name, "checks": {}, "decode": {}}
    started = time.perf_counter()
    for fmt in filter(None, args.formats.split(",")):
        model = model_for(fmt, base, device)
        # 64: the target, identical requests among 63 others (32 alone ran on the H100, 2026-12-05g)
        engine = Engine(model, None, EngineConfig(max_batch=64, max_seq_len=1024, batch_invariant=True))
        passed = check_batches(engine, config.vocab_size, (8, 32, 64), f"{fmt} eager", rng)
        results["checks"][f"{fmt}_eager"] = passed
        ok &= passed
        del engine, model
        release_compiled(device)  # an engine's 64 rows hold 32 GiB of cache (W = 4096 slots each)
    for fmt in filter(None, args.time_formats.split(",")):
        model, figures = model_for(fmt, base, device), {}
        for mode in ("default", "invariant"):
            engine = Engine(model, None, EngineConfig(max_batch=8, max_seq_len=1024, compile=cuda,
                                                      batch_invariant=mode == "invariant"))
            figures[mode] = decode_rates(engine, config.vocab_size, args)
            if mode == "invariant":
                passed = check_batches(engine, config.vocab_size, (8,), f"{fmt} compiled={cuda}", rng)
                results["checks"][f"{fmt}_compiled"] = passed
                ok &= passed
            del engine
            release_compiled(device)
        results["decode"][fmt] = {b: {**{m: figures[m][b] for m in figures}, "ratio": figures["invariant"][b] / figures["default"][b]}
                                  for b in ("b1", "b8")}
        del model
    print_table(results["decode"])
    print(f"{'ALL PASS' if ok else 'SOME FAILED'} ({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if ok else 1


def print_table(decode: dict) -> None:
    print(f"{'weights':8} {'batch':>5} {'default tok/s':>14} {'invariant tok/s':>16} {'ratio':>6}")
    for fmt, rows in decode.items():
        for batch, row in rows.items():
            print(f"{fmt:8} {batch[1:]:>5} {row['default']:14.1f} {row['invariant']:16.1f} {row['ratio']:6.3f}")


if __name__ == "__main__":
    sys.exit(main())
