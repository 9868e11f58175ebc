"""Tensor parallelism over N GPUs against one GPU, in the same run: decode speed and memory per GPU.

Random bf16 weights at a preset's shape (speed does not depend on the values), compiled decode with
CUDA graphs on every rank, as `mistral7b bench` does on one card. Decode tok/s is measured from the
first token to the last (prefill excluded). Memory: nvidia-smi's used memory per GPU (what a user
sees, CUDA contexts and NCCL buffers included), and rank 0's weights, cache and peak in torch.

    python benchmarks/tp_bench.py --tp 2 --json benchmarks/results/DATE-h200x2-tp.json

Issue 16's targets: batch-1 decode >= 1.6x one GPU; memory per GPU about half the weights and cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mistral7b.bench import random_prompts, run_requests
from mistral7b.config import preset
from mistral7b.engine import Engine
from mistral7b.model import Transformer
from mistral7b.parallel import launch


class TensorParallelEngine(Engine):
    """The engine with the two changes that wire tensor parallelism in: its cache comes from the
    model's `new_cache`, and `compile=True` compiles every rank's own decode step."""

    def __init__(self, model, *args, **kwargs):
        module = sys.modules[Engine.__module__]
        original = module.KVCache
        module.KVCache = lambda config, *a: model.new_cache(config, *a)
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            module.KVCache = original

    def _compile_decode(self):
        return self.model.compile_decode(self.cache, "reduce-overhead" if self.device.type == "cuda" else None)


def gpu_memory_gib() -> list[float]:
    """Used memory of every GPU, as nvidia-smi reports it (all processes)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(line) / 1024 for line in out.split()]


def decode_rate(engine: Engine, prompts, new_tokens: int, runs: int) -> float:
    """Median decode tok/s over `runs` (after one warm-up that compiles and records the graphs)."""
    run_requests(engine, prompts, new_tokens)
    rates = []
    for _ in range(runs):
        requests = run_requests(engine, prompts, new_tokens)
        start = min(r.first_token_time for r in requests)
        end = max(r.finish_time for r in requests)
        rates.append(sum(len(r.output_ids) - 1 for r in requests) / (end - start))
    return statistics.median(rates)


def measure(model, engine_cls, args, config) -> dict:
    engine = engine_cls(model, None, max_batch=max(args.batches), compile=not args.no_compile)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.warmup()
    result = {"warmup_s": time.perf_counter() - t0}
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
        result[f"decode_b{batch}_tok_s"] = decode_rate(engine, prompts, args.new_tokens, args.runs)
        print(f"  batch {batch}: {result[f'decode_b{batch}_tok_s']:.1f} tok/s", flush=True)
    shard = getattr(model, "shard", model)
    result["rank0_weights_gib"] = sum(p.numel() * p.element_size() for p in shard.parameters()) / 2**30
    result["rank0_cache_gib"] = engine.cache.nbytes() / 2**30
    result["rank0_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["gpu_used_gib"] = gpu_memory_gib()
    print(f"  memory: rank 0 weights {result['rank0_weights_gib']:.2f} GiB, cache {result['rank0_cache_gib']:.2f} GiB, "
          f"peak {result['rank0_peak_gib']:.2f} GiB; nvidia-smi per GPU {result['gpu_used_gib']}", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    p.add_argument("--heads", default="replicated,vocab", help="head splits to measure")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-single", action="store_true", help="skip the one-GPU baseline")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    config, dtype = preset(args.preset), torch.bfloat16
    results = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
               "gpus": torch.cuda.device_count(), "torch": torch.__version__, "preset": args.preset,
               "tp": args.tp, "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_single:
        print("one GPU:", flush=True)
        with torch.device("cuda"):
            model = Transformer(config).to(dtype).eval()
        results["single"] = measure(model, Engine, args, config)
        del model
        torch.cuda.empty_cache()
    for head in args.heads.split(","):
        print(f"{args.tp} GPUs, head {head}:", flush=True)
        t0 = time.perf_counter()
        model = launch(config, args.tp, device="cuda", dtype=dtype, head=head, timeout_s=600)
        print(f"  launched in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            results[f"tp{args.tp}_{head}"] = measure(model, TensorParallelEngine, args, config)
        finally:
            model.close()
        torch.cuda.empty_cache()
    if "single" in results:
        for key, value in results.items():
            if key.startswith("tp") and isinstance(value, dict):
                for batch in args.batches:
                    name = f"decode_b{batch}_tok_s"
                    print(f"{key} batch {batch}: {value[name] / results['single'][name]:.2f}x one GPU")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
