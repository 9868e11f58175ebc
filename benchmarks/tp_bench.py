"""Tensor parallelism over N GPUs against one GPU, in the same run: decode speed and memory per GPU.

Random weights at a preset's shape (speed does not depend on the values), compiled decode with CUDA
graphs on every rank, as `mistral7b bench` does on one card. The engine drives a tensor-parallel
model as it is (its cache comes from `model.new_cache`, its compiled decode from
`model.compile_decode`). Decode tok/s is measured from the first token to the last (prefill
excluded). Memory: nvidia-smi's used memory per GPU (what a user sees, CUDA contexts and NCCL
buffers included), and rank 0's weights, cache and peak in torch.

Each measurement (one GPU, then each head split) runs in a child process under `--timeout` seconds,
so a split that hangs (the `vocab` head did not finish in 400 s once) is killed with its ranks and
reported as timed out, and the others still give their figures. NVLink multicast stays off in every
process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

    H200 x2: python benchmarks/tp_bench.py --tp 2 --timeout 270 --json benchmarks/results/DATE-h200x2-tp.json
    CPU:     python benchmarks/tp_bench.py --device cpu --preset tiny --tp 2 --new-tokens 8 --runs 1

Issue 16's targets: batch-1 decode >= 1.6x one GPU; memory per GPU about half the weights and cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mistral7b.bench import NO_MULTICAST, random_prompts, run_requests
from mistral7b.config import ModelConfig, preset
from mistral7b.engine import Engine
from mistral7b.model import Transformer
from mistral7b.parallel import launch

os.environ.update(NO_MULTICAST)  # read when NCCL starts; spawned ranks and child processes inherit it

# Mistral's shape family at a size a CPU runs in seconds (gloo ranks): 2 KV heads, so --tp 2 divides it.
TINY = ModelConfig(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=1024,
                   sliding_window=128, max_seq_len=1024, name="tiny")


def model_config(name: str) -> ModelConfig:
    return TINY if name == "tiny" else preset(name)


def gpu_memory_gib() -> list[float] | None:
    """Used memory of every GPU, as nvidia-smi reports it (all processes); None without a GPU."""
    if not torch.cuda.is_available():
        return None
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


def measure(model, args, config) -> dict:
    cuda = args.device == "cuda"
    engine = Engine(model, None, max_batch=max(args.batches), compile=cuda and not args.no_compile)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.warmup()
    result = {"warmup_s": time.perf_counter() - t0,
              "gpu": torch.cuda.get_device_name() if cuda else None, "gpus": torch.cuda.device_count() if cuda else 0}
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
        result[f"decode_b{batch}_tok_s"] = decode_rate(engine, prompts, args.new_tokens, args.runs)
        print(f"  batch {batch}: {result[f'decode_b{batch}_tok_s']:.1f} tok/s", flush=True)
    shard = getattr(model, "shard", model)
    result["rank0_weights_gib"] = sum(p.numel() * p.element_size() for p in shard.parameters()) / 2**30
    result["rank0_cache_gib"] = engine.cache.nbytes() / 2**30
    result["rank0_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result["gpu_used_gib"] = gpu_memory_gib()
    print(f"  memory: rank 0 weights {result['rank0_weights_gib']:.3f} GiB, cache {result['rank0_cache_gib']:.3f} GiB, "
          f"peak {result['rank0_peak_gib']}; nvidia-smi per GPU {result['gpu_used_gib']}", flush=True)
    return result


def run_one(args) -> dict:
    """One measurement in this process: `--one single` or `--one HEAD` (a head split over --tp ranks)."""
    config = model_config(args.preset)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.one == "single":
        with torch.device(args.device):
            model = Transformer(config).to(dtype).eval()
        return measure(model, args, config)
    t0 = time.perf_counter()
    model = launch(config, args.tp, device=args.device, dtype=dtype, head=args.one, timeout_s=args.timeout)
    print(f"  launched in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        return measure(model, args, config)
    finally:
        model.close()


def run_child(argv: list[str], what: str, timeout: float) -> dict:
    """This script with `--one WHAT` in a child process (its own process group, so that a hang is
    killed together with the ranks it spawned); its figures, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "one.json")
        cmd = [sys.executable, __file__, *argv, "--one", what, "--json", str(out)]
        child = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **NO_MULTICAST})
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            print(f"  {what}: timed out after {timeout:.0f} s (killed)", flush=True)
            return {"error": f"timed out after {timeout:.0f} s"}
        if code != 0 or not out.exists():
            return {"error": f"exited with code {code}"}
        return json.loads(out.read_text())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mistral-7b-v0.1", help="a preset's shape, or 'tiny' (a CPU check)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo ranks, fp32, eager")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    p.add_argument("--heads", default="replicated,vocab", help="head splits to measure")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-single", action="store_true", help="skip the one-GPU baseline")
    p.add_argument("--timeout", type=float, default=270,
                   help="seconds for each measurement (one GPU, each head split), start-up included; also "
                        "bounds every collective")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one measurement here
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.one is not None:
        result = run_one(args)
        args.json.write_text(json.dumps(result))
        return 0
    passed = without_json(argv)  # each child writes its own --json
    # No CUDA here: the children own the GPUs (and say which they were), so nvidia-smi counts only theirs.
    results = {"date": datetime.date.today().isoformat(), "device": args.device, "torch": torch.__version__,
               "preset": args.preset,
               "tp": args.tp, "args": {k: str(v) for k, v in vars(args).items()}}
    runs = ([] if args.skip_single else [("single", "single")]) + [(h, f"tp{args.tp}_{h}") for h in args.heads.split(",")]
    for what, key in runs:
        print("one device:" if what == "single" else f"{args.tp} ranks, head {what}:", flush=True)
        results[key] = run_child(passed, what, args.timeout)
    summarize(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any("error" in results[key] for _, key in runs) else 0


def without_json(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--json="):
            skip = False
            continue
        skip = a == "--json"
        if not skip:
            out.append(a)
    return out


def summarize(results: dict, args) -> None:
    single = results.get("single", {})
    for key, value in results.items():
        if not key.startswith(f"tp{args.tp}_") or not isinstance(value, dict):
            continue
        if "error" in value:
            print(f"{key}: {value['error']}")
            continue
        for batch in args.batches:
            name = f"decode_b{batch}_tok_s"
            ratio = f"{value[name] / single[name]:.2f}x one device" if name in single else "no baseline"
            print(f"{key} batch {batch}: {value[name]:.1f} tok/s, {ratio}")


if __name__ == "__main__":
    raise SystemExit(main())
