"""Prefix cache: prefill of N prompts that share a prefix, with and without the cache, on the model and
KVCache directly (no engine), plus what a restore and a store cost per block.

Random weights at a preset's shape (speed does not depend on the values). Without the cache every
prompt is prefilled whole, `--batch` rows per forward, in chunks of `--chunk`. With it the first prompt
is prefilled whole (a miss, storing its blocks after each chunk) and every prompt is then restored
from the cache and only its unique tail prefilled, rows batched the same way. The last-token logits of
both runs are compared (relative error, greedy next token).

`--engine`: the same workload through the Engine (all prompts arrive at once, each generates
`--max-tokens` greedy tokens), with and without `prefix_cache_gib`: time to first token (p50, max),
wall time, and whether the greedy tokens are equal.

H200: python benchmarks/prefix_bench.py --preset mistral-7b-v0.1 --json prefix.json
      python benchmarks/prefix_bench.py --preset mistral-7b-v0.1 --engine --n-prompts 64 --max-tokens 128
          (the pool: --prefix-cache-gib, by default what the prompts' blocks need: 1.26 GiB here)
      python benchmarks/prefix_bench.py --preset mistral-7b-v0.1 --prefix-len 6000   (prefix longer than W)
CPU:  python benchmarks/prefix_bench.py --preset smollm2-135m --window 512 --prefix-len 1024 --suffix-len 64 \
          --n-prompts 8 --device cpu
      python benchmarks/prefix_bench.py --preset smollm2-135m --window 128 --prefix-len 256 --suffix-len 32 \
          --n-prompts 4 --device cpu --engine --max-tokens 4
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from mistral7b.cache import KVCache
from mistral7b.config import ModelConfig, preset
from mistral7b.model import Transformer
from mistral7b.engine.prefix_cache import PrefixCache

SHAPES = {  # SmolLM2-135M's shape (SPEC), for CPU runs; a window can be given with --window
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, head_dim=64, hidden_dim=1536, n_heads=9, n_kv_heads=3,
                                vocab_size=49152, rope_theta=100000.0, sliding_window=None, max_seq_len=8192,
                                name="smollm2-135m"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mistral-7b-v0.1", help="a mistral7b preset or smollm2-135m")
    p.add_argument("--window", default="preset", help="sliding window: an integer, 'none', or 'preset'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--suffix-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="rows per prefill forward")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the smallest window, else 4096)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a loaded machine: "
                   "a second thread waiting for a busy core makes each small copy take milliseconds)")
    p.add_argument("--engine", action="store_true", help="measure TTFT through the Engine instead")
    p.add_argument("--max-tokens", type=int, default=1, help="--engine: greedy tokens per request")
    p.add_argument("--prefix-cache-gib", type=float, default=None,
                   help="--engine: the prefix pool (default: what the prompts' blocks need, at most half the free "
                        "GPU memory)")
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def build(args) -> tuple[Transformer, ModelConfig, torch.dtype]:
    config = SHAPES[args.preset] if args.preset in SHAPES else preset(args.preset)
    if args.window != "preset":
        config = config.with_(sliding_window=None if args.window == "none" else int(args.window))
    default_dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model = model.to_empty(device=args.device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    return model, config, dtype


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, runs):
    """Median seconds over `runs` calls after one warm-up call, and the last call's result."""
    result, times = fn(), []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


@torch.no_grad()
def prefill_rows(model, cache, prompts, rows, start, chunk, prefix=None):
    """Prefill prompts[i][start:] into rows[i] (all prompts of one length), one forward per chunk for all
    rows; store each row's new blocks after each chunk. Returns the last-token logits [n, vocab]."""
    length = len(prompts[0])
    index = slice(rows[0], rows[-1] + 1)
    s = start
    while s < length:
        e = min(s + chunk, length, s + (prefix.max_chunk(s) if prefix else chunk))
        tokens = torch.tensor([p[s:e] for p in prompts], device=model.output.weight.device)
        positions = torch.arange(s, e, device=tokens.device).expand(len(prompts), -1)
        logits = model(tokens, positions, cache, rows=index, kv_len=e, last_only=True)
        if prefix is not None:
            for row, p in zip(rows, prompts):
                prefix.store(row, p, s, e)
        s = e
    return logits[:, -1]


def without_cache(model, cache, prompts, batch, chunk):
    out = []
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        cache.reset()
        out.append(prefill_rows(model, cache, group, list(range(len(group))), 0, chunk))
    return torch.cat(out)


def with_cache(model, cache, prompts, batch, chunk, budget, block_size):
    """A cold prefix cache: the first prompt is a miss and fills it; every other prompt restores the
    shared prefix and prefills its tail."""
    prefix = PrefixCache(cache, budget, block_size)
    cache.reset()
    out = [prefill_rows(model, cache, prompts[:1], [0], 0, chunk, prefix)]
    for i in range(1, len(prompts), batch):
        group = prompts[i : i + batch]
        starts = {prefix.load(row, p) for row, p in enumerate(group)}
        assert len(starts) == 1, starts  # every prompt of the group restored the same prefix
        out.append(prefill_rows(model, cache, group, list(range(len(group))), starts.pop(), chunk, prefix))
    return torch.cat(out), prefix


def block_costs(model, cache, prompt, chunk, block_size, device, runs):
    """Seconds per block to store (after prefill) and to restore, for one row and this prompt."""
    budget = (len(prompt) // block_size + 1) * PrefixCache(cache, 0, block_size).block_bytes
    cache.reset()
    prefix = PrefixCache(cache, budget, block_size)
    prefill_rows(model, cache, [prompt], [0], 0, chunk, prefix)
    hit = prefix.match(prompt)  # the blocks in position order
    prefix.release(hit)
    held = min(layer.size for layer in cache.layers) // block_size
    first = max(0, len(hit.blocks) - held)

    def store_again():  # copy out again the blocks that row 0 still holds in every layer (rewrites the same data)
        prefix._copy_out(0, first * block_size, list(hit.blocks[first:]))
        return len(hit.blocks) - first

    store_s, stored = timed(store_again, device, runs)
    restore_s, _ = timed(lambda: prefix._restore(cache.max_batch - 1, hit), device, runs)
    copied = sum(min(hit.n_tokens, layer.size) for layer in cache.layers) / len(cache.layers) / block_size
    return {"store_ms_per_block": 1e3 * store_s / stored, "restore_ms": 1e3 * restore_s,
            "restored_tokens": hit.n_tokens, "copied_blocks_per_layer": copied,
            "restore_ms_per_copied_block": 1e3 * restore_s / copied, "block_bytes": prefix.block_bytes}


@torch.no_grad()
def engine_run(model, prompts, args, prefix_gib: float) -> dict:
    """All prompts added at once and stepped to completion; TTFT of each, wall time, and the tokens."""
    from mistral7b.engine import Engine
    from mistral7b.sampling import SamplingParams

    length = len(prompts[0]) + args.max_tokens + 1
    engine = Engine(model, None, max_batch=len(prompts), chunk_size=args.chunk, prefill_budget=args.chunk,
                    max_seq_len=length, prefix_cache_gib=prefix_gib, prefix_block_size=args.block_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    sync(args.device)
    t0 = time.perf_counter()
    requests = [engine.add(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    sync(args.device)
    wall = time.perf_counter() - t0
    ttft = sorted(r.first_token_time - r.arrival_time for r in requests)
    out = {"wall_s": wall, "ttft_p50_s": statistics.median(ttft), "ttft_max_s": ttft[-1],
           "output_tok_per_s": len(prompts) * args.max_tokens / wall, "tokens": [r.output_ids for r in requests]}
    if engine.prefix is not None:
        out["hit_tokens"], out["query_tokens"] = engine.prefix.counters.hits, engine.prefix.counters.queries
    return out


def pool_gib(args, model, prompts) -> tuple[float, str]:
    """The prefix pool for --engine: --prefix-cache-gib if given, else what the prompts' blocks need
    (the shared prefix once, each prompt's own complete blocks; a partial last block is never
    stored), capped on CUDA at half the memory left after the engine's KV cache. (It was 2 x each
    prompt's whole cache row: 64 GiB for 64 prompts of 4096 tokens or more at the 7B shape: out of memory.)"""
    if args.prefix_cache_gib is not None:
        return args.prefix_cache_gib, "--prefix-cache-gib"
    dtype = next(model.parameters()).dtype
    row = KVCache(model.config, 1, args.device, dtype, len(prompts[0]) + args.max_tokens + 1)
    block_bytes = PrefixCache(row, 0, args.block_size).block_bytes
    B = args.block_size
    blocks = args.prefix_len // B + sum(len(p) // B - args.prefix_len // B for p in prompts) + 1
    need = blocks * block_bytes / 2**30
    if torch.device(args.device).type != "cuda":
        return need, f"the prompts' {blocks} blocks of {block_bytes / 2**20:.2f} MiB"
    free = torch.cuda.mem_get_info(torch.device(args.device))[0] - len(prompts) * row.nbytes()
    cap = max(0.0, 0.5 * free / 2**30)
    if need <= cap:
        return need, f"the prompts' {blocks} blocks of {block_bytes / 2**20:.2f} MiB"
    return cap, f"half the free memory (the prompts' blocks need {need:.2f} GiB: some will be evicted)"


def engine_main(args, model, prompts) -> dict:
    budget_gib, why = pool_gib(args, model, prompts)
    print(f"prefix pool {budget_gib:.3f} GiB ({why})", flush=True)
    base = engine_run(model, prompts, args, 0.0)
    free_memory(args.device)  # the first engine's cache must be gone before the second allocates its own
    cached = engine_run(model, prompts, args, budget_gib)
    results = {"mode": "engine", "prefix_cache_gib": budget_gib, "prefix_cache_gib_from": why,
               **{f"{k}_without": v for k, v in base.items() if k != "tokens"},
               **{f"{k}_with": v for k, v in cached.items() if k != "tokens"},
               "ttft_p50_ratio": cached["ttft_p50_s"] / base["ttft_p50_s"],
               "wall_speedup": base["wall_s"] / cached["wall_s"],
               "greedy_equal": f"{sum(a == b for a, b in zip(base['tokens'], cached['tokens']))}/{len(prompts)}"}
    return results


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, config, dtype = build(args)
    if args.engine:
        args.chunk = args.chunk or min([w for w in config.layer_windows() if w is not None] or [4096])
        shared = torch.randint(0, config.vocab_size, (args.prefix_len,)).tolist()
        prompts = [shared + torch.randint(0, config.vocab_size, (args.suffix_len,)).tolist()
                   for _ in range(args.n_prompts)]
        print(f"engine: {config.name} {dtype} on {args.device}: {args.n_prompts} x ({args.prefix_len} shared + "
              f"{args.suffix_len}), {args.max_tokens} tokens each, chunk {args.chunk}, block {args.block_size}", flush=True)
        return report(engine_main(args, model, prompts), args.json)
    windows = [w for w in config.layer_windows() if w is not None]
    chunk = args.chunk or (min(windows) if windows else 4096)
    length = args.prefix_len + args.suffix_len
    batch = min(args.batch, args.n_prompts)
    cache = KVCache(config, max_batch=batch, device=args.device, dtype=dtype, max_seq_len=length + 1)
    shared = torch.randint(0, config.vocab_size, (args.prefix_len,)).tolist()
    prompts = [shared + torch.randint(0, config.vocab_size, (args.suffix_len,)).tolist() for _ in range(args.n_prompts)]
    block_bytes = PrefixCache(cache, 0, args.block_size).block_bytes
    # room for the shared blocks and every prompt's own
    budget = (args.prefix_len // args.block_size + args.n_prompts * (args.suffix_len // args.block_size + 2)) * block_bytes

    print(f"{config.name} window={windows[0] if windows else None} {dtype} on {args.device}: {args.n_prompts} x "
          f"({args.prefix_len} shared + {args.suffix_len}), batch {batch}, chunk {chunk}, block {args.block_size}",
          flush=True)
    base_s, base_logits = timed(lambda: without_cache(model, cache, prompts, batch, chunk), args.device, args.runs)
    cached_s, (cached_logits, prefix) = timed(
        lambda: with_cache(model, cache, prompts, batch, chunk, budget, args.block_size), args.device, args.runs)
    err = ((cached_logits - base_logits).norm(dim=-1) / base_logits.norm(dim=-1)).max().item()
    agree = (cached_logits.argmax(-1) == base_logits.argmax(-1)).sum().item()
    costs = block_costs(model, cache, prompts[0], chunk, args.block_size, args.device, args.runs)
    recompute_ms_per_block = 1e3 * base_s / (args.n_prompts * length) * args.block_size
    results = {
        "config": config.name, "window": windows[0] if windows else None, "dtype": str(dtype), "device": args.device,
        "n_prompts": args.n_prompts, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "batch": batch,
        "chunk": chunk, "block_size": args.block_size,
        "without_cache_s": base_s, "with_cache_s": cached_s, "speedup": base_s / cached_s,
        "prompt_tok_per_s_without": args.n_prompts * length / base_s,
        "prompt_tok_per_s_with": args.n_prompts * length / cached_s,
        "recompute_ms_per_block": recompute_ms_per_block, **costs,
        "max_rel_err_last_logits": err, "greedy_next_token_agree": f"{agree}/{args.n_prompts}",
        "hit_tokens": prefix.counters.hits, "query_tokens": prefix.counters.queries,
    }
    return report(results, args.json)


def report(results: dict, path: str | None) -> int:
    for k, v in results.items():
        print(f"  {k:30s} {v:.4g}" if isinstance(v, float) else f"  {k:30s} {v}")
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
