"""Where a compiled decode step's time goes: torch.profiler over engine steps at the 7B shape.

Prints wall time per token, GPU busy time per token, and the kernels that take the GPU time, so the
gap to the bandwidth roofline can be split into host overhead and slow kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mistral7b.bench import build_hf, ours_from_hf, random_prompts, run_requests
from mistral7b.config import preset
from mistral7b.engine import Engine
from mistral7b.sampling import SamplingParams


def decode_phase(engine: Engine, prompts, tokens: int, prof=None) -> float:
    """Prefill every prompt, then time (and optionally profile) only the decode steps that follow."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    requests = [engine.add(p, params) for p in prompts]
    while not all(r.output_ids for r in requests):
        engine.step()
    torch.cuda.synchronize()
    if prof is not None:
        prof.start()
    t0 = time.perf_counter()
    while not all(r.finished for r in requests):
        engine.step()
    torch.cuda.synchronize()
    if prof is not None:
        prof.stop()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    args = p.parse_args()
    config = preset(args.preset)
    hf = build_hf(config, "cuda")
    model = ours_from_hf(hf, config, "cuda")
    del hf
    torch.cuda.empty_cache()
    engine = Engine(model, None, max_batch=args.batch, compile=True)
    prompts = random_prompts(args.batch, args.prompt_len, config.vocab_size)
    t0 = time.perf_counter()
    run_requests(engine, prompts, args.tokens)  # compile + record
    print(f"warm-up (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    run_requests(engine, prompts, args.tokens)
    wall = decode_phase(engine, prompts, args.tokens)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    decode_phase(engine, prompts, args.tokens, prof)
    averages = prof.key_averages()
    # Kernels only: the "## Call CompiledFxGraph" ranges wrap kernels already counted.
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                 for e in averages if not e.key.startswith("## "))
    n = args.tokens - 1  # the first token of each request came from its prefill
    print(f"batch {args.batch}: wall {wall / n * 1e3:.2f} ms/step ({args.batch * n / wall:.1f} tok/s); "
          f"GPU busy {gpu_us / n / 1e3:.2f} ms/step (profiled run)")
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(averages.table(sort_by=key, row_limit=18, max_name_column_width=70))
            break
        except Exception as e:  # noqa: BLE001 - the sort key's name changed across torch versions
            print(f"(sort by {key} failed: {e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
