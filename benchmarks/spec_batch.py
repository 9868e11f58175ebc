"""n-gram speculation at batch sizes above 1 (where SpeculativeConfig.max_batch's default comes from): the
shipped prompts of a kind decoded B at a time by three engines taking turns group by group, plain, n-gram
with backoff and n-gram without, greedy; decode-only tok/s (timed once every row of a group has its first
token) and each against plain. Outputs must equal plain's.

    python3 benchmarks/spec_batch.py [--batch 1 2 3 4] [--kinds grounded open] [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mistral7b import LLM, SamplingParams
from mistral7b.engine import Engine, EngineConfig, SpeculativeConfig
from spec_bench import load_prompts


def decode_group(engine: Engine, group: list[list[int]], params: SamplingParams) -> tuple[int, float, list]:
    """Tokens decoded after every row's first, their seconds, and the outputs."""
    requests = [engine.add(ids, params) for ids in group]
    while not all(r.output_ids for r in requests):
        engine.step()
    start, first = time.perf_counter(), sum(len(r.output_ids) for r in requests)
    while engine.has_work():
        engine.step()
    return sum(len(r.output_ids) for r in requests) - first, time.perf_counter() - start, [r.output_ids for r in requests]


def run(llm: LLM, prompts: list[list[int]], batch: int, k: int, max_tokens: int) -> dict:
    speculative = {"plain": None, "ngram": SpeculativeConfig("ngram", k, max_batch=batch),
                   "ngram/raw": SpeculativeConfig("ngram", k, max_batch=batch, backoff=False)}
    engines = {name: Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=batch, speculative=spec))
               for name, spec in speculative.items()}
    for engine in engines.values():  # warm-up
        decode_group(engine, prompts[:1], SamplingParams(max_tokens=8))
    totals = {name: [0, 0.0, []] for name in engines}
    for i in range(0, len(prompts) - batch + 1, batch):
        for name, engine in engines.items():
            tokens, seconds, outputs = decode_group(engine, prompts[i : i + batch], SamplingParams(max_tokens=max_tokens))
            totals[name][0] += tokens
            totals[name][1] += seconds
            totals[name][2] += outputs
    rates = {name: tokens / seconds for name, (tokens, seconds, _) in totals.items()}
    return {"batch": batch, "tok_s": rates, "vs_plain": {name: rate / rates["plain"] for name, rate in rates.items()},
            "identical": all(t[2] == totals["plain"][2] for t in totals.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--kinds", nargs="+", default=["grounded", "open"])
    p.add_argument("--num-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(max_batch=max(args.batch))
    by_kind: dict[str, list] = {}
    for kind, ids in load_prompts(llm, None):
        by_kind.setdefault(kind, []).append(ids)
    rows = []
    print("| kind | batch | plain tok/s | n-gram | n-gram, no backoff | outputs equal plain |\n|---|---|---|---|---|---|")
    for kind in args.kinds:
        for batch in args.batch:
            row = {"kind": kind, **run(llm, by_kind[kind], batch, args.num_tokens, args.max_tokens)}
            rows.append(row)
            x = row["vs_plain"]
            print(f"| {kind} | {batch} | {row['tok_s']['plain']:.1f} | {x['ngram']:.3f}x | {x['ngram/raw']:.3f}x | "
                  f"{row['identical']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "k": args.num_tokens, "torch": torch.__version__}, f, indent=2)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
