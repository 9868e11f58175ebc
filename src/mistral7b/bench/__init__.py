"""`mistral7b bench`: our engine and HF transformers side by side, in one process on one card.

Random weights at a preset's shape (speed does not depend on the values), shared by both engines.
Figures are medians over `--runs`; the table goes to stdout and everything to `--json`.

`--quantize int8|int4` runs our sections on those random weights quantized through the loader's
quantizing path (HF stays bf16), and gpt-fast (`--peer`) quantizes its own the same way. A second
table sets decode after the first token against the limit: the model's resident weight bytes
(embeddings included, as issue 21 counts them) read once per decode step at `--bandwidth-tb-s`
(default: the device's copy bandwidth, measured in the run), so batch B's limit is B x bandwidth / bytes.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ModelConfig, preset
from ..quant import QuantConfig, QuantModule, resident_bytes
from ..engine import Engine, EngineConfig
from ..loading import Checkpoint, assemble, canonical_views
from ..model import Transformer
from ..sampling import SamplingParams
from .report import limits, print_limit_table, print_table  # noqa: F401 - print_table is used by tests too


# Mistral's shape family at a size a CPU decodes in milliseconds (`--preset tiny`: checks and tests).
TINY = ModelConfig(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=1024,
                   sliding_window=128, max_seq_len=2048, name="tiny")


NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def bench_config(name: str) -> ModelConfig:
    """A preset's shape, or TINY; a ValueError naming the choices otherwise."""
    if name == "tiny":
        return TINY
    try:
        return preset(name)
    except ValueError as e:
        raise ValueError(f"{e}, or tiny") from None


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, runs):
    """Median seconds of `runs` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(args) -> float | None:
    """Peak CUDA memory since `reset_peak`, less `args.other_resident_bytes` (the HF model's weights while
    it shares the card: not ours to count; set by `build_models`)."""
    if torch.device(args.device).type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated() - getattr(args, "other_resident_bytes", 0)) / 2**30


def release_compiled(device) -> None:
    """Drop compiled graphs, their CUDA-graph memory pool and what deleted engines held (in reference
    cycles until collected: an invariant bench's 64-row cache, 32 GiB, ran the next engine out of memory on
    an H100), so that later peaks are a section's own."""
    gc.collect()
    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.empty_cache()


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def build_hf(config: ModelConfig, device):
    """An HF MistralForCausalLM with random weights at this shape, initialised on the device."""
    from transformers import MistralConfig, MistralForCausalLM

    hf_config = MistralConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, sliding_window=config.sliding_window, rope_theta=config.rope_theta,
        max_position_embeddings=max(config.max_seq_len, 32768), rms_norm_eps=config.norm_eps,
        attn_implementation="sdpa",
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def ours_from_hf(hf_model, config: ModelConfig, device):
    from ..loading.hf import to_canonical

    tensors = ((to_canonical(n), t) for n, t in hf_model.state_dict().items())
    return assemble(Checkpoint(Path("random-weights"), config, tensors, 0), device, torch.bfloat16)


def random_model(config: ModelConfig, device) -> Transformer:
    """Random bf16 weights at this shape built on the device, N(0, 0.02) and norms 1 (no transformers)."""
    with torch.device("meta"):
        model = Transformer(config).to(torch.bfloat16)
    model = model.to_empty(device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model


def quantized(model: Transformer, quant: QuantConfig, device) -> Transformer:
    """`model`'s weights streamed through the loader's quantizing path (a quantized copy, bf16 activations)."""
    views = canonical_views(model)
    checkpoint = Checkpoint(Path(f"random-{quant.label}"), model.config, iter(views.items()), len(views))
    return assemble(checkpoint, device, torch.bfloat16, quant)


def with_config(model: Transformer, config: ModelConfig) -> Transformer:
    """A model built from `config` holding `model`'s weights (shared, not copied): a variant such as
    full attention is a different config, never a model changed in place."""
    with torch.device("meta"):
        variant = Transformer(config)
    variant.load_state_dict(model.state_dict(), assign=True)
    return variant.eval()


def engine_config(args, **fields) -> EngineConfig:
    """EngineConfig(**fields) with --batch-invariant's setting (None: the device's default) and
    --kv-cache-dtype's."""
    return EngineConfig(batch_invariant=getattr(args, "batch_invariant", None),
                        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"), **fields)


def random_prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_requests(engine: Engine, prompts, new_tokens):
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    requests = [engine.add(p, params) for p in prompts]
    while not all(r.finished for r in requests):
        engine.step()
    return requests


def main(args) -> int:
    device, cuda = args.device, torch.device(args.device).type == "cuda"
    config, quant = bench_config(args.preset), getattr(args, "quant", None)
    if quant is not None and quant.method == "int4" and quant.group_size is None:
        # random weights have no stored grid: name the group the loader will use (the label, gpt-fast's too)
        quant = replace(quant, group_size=quant.group_size_for(config.dim))
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": None if args.no_hf else __import__("transformers").__version__,
        "preset": args.preset,
        "decode_kernel": getattr(args, "decode_kernel", None) or "flash",
        "single_row_tuning": bool(getattr(args, "single_row_tuning", True)),
        "ours": {},
        "hf": {},
        "hf_compiled": {},
    }
    sections = set(args.sections.split(","))
    print(f"building random {args.preset} weights on {device}...", flush=True)
    model, hf = build_models(config, args, quant)
    tp = getattr(args, "tensor_parallel_size", 1)
    results["weights"] = {"format": quant.label if quant else "bf16", "bytes": resident_bytes(model)}
    if tp > 1:  # rank 0's shard: every rank reads its own at the same time
        results["weights"] |= {"tensor_parallel_size": tp, "per": "GPU (rank 0's shard)"}
    ours = results["ours"]
    if sections & {"decode", "context"}:
        bench_decode_sections(model, config, args, results, sections)
    if "prefill" in sections:
        bench_prefill(model, config, args, ours)
    if "long" in sections and args.long_context:
        bench_long(model, config, args, ours)
    if hf is not None:
        bench_hf(hf, config, args, results)
    if tp > 1:
        model.close()  # the ranks exit
    if getattr(args, "peer", None):
        from .peers import run_gpt_fast

        del model, hf
        torch.cuda.empty_cache() if cuda else None
        results["peers"] = {"gpt-fast": run_gpt_fast(args.peer[1], quant.method if quant else "bf16", args.prompt_len,
                                                     args.new_tokens, runs=args.runs,
                                                     group_size=quant.group_size if quant and quant.group_size else 128)}
    results["limit"] = limits(results, args)
    print_table(results, args)
    print_limit_table(results, args)
    if "speculative" in results:
        from .speculative import print_speculative_table

        print_speculative_table(results, args)
    write_outputs(results, args)
    return 0


def write_outputs(results: dict, args) -> None:
    """--json's file, then --plot's PNG (mistral7b.bench.plot, which alone imports matplotlib)."""
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if getattr(args, "plot", None):
        from .plot import plot_results

        plot_results(results, args.plot)


def build_models(config: ModelConfig, args, quant: QuantConfig | None):
    """(ours, HF's or None): random weights, shared with HF unless --no-hf, quantized with --quantize;
    with --tensor-parallel-size N > 1, sharded over N ranks by mistral7b.parallel (random per rank, no HF)."""
    device, tp = args.device, getattr(args, "tensor_parallel_size", 1)
    if tp > 1:
        from ..parallel import launch

        os.environ.update(NO_MULTICAST)  # before the ranks start: they inherit it
        return launch(config, tp, device=device, dtype=torch.bfloat16, timeout_s=600), None
    hf = None if args.no_hf else build_hf(config, device)
    model = random_model(config, device) if hf is None else ours_from_hf(hf, config, device)
    args.other_resident_bytes = 0 if hf is None else sum(p.numel() * p.element_size() for p in hf.parameters())
    if quant is not None:
        model = quantized(model, quant, device)
        torch.cuda.empty_cache() if torch.device(device).type == "cuda" else None  # the bf16 copy is gone
    if getattr(args, "decode_kernel", None):
        model.use_decode_kernel(args.decode_kernel)
    model.tune_single_row = bool(getattr(args, "single_row_tuning", True))
    return model, hf


def bench_decode_sections(model: Transformer, config: ModelConfig, args, results: dict, sections: set) -> None:
    """Decode and context on one engine; with --speculative, decode again through a speculative engine."""
    device = args.device
    engine = Engine(model, None, engine_config(args, max_batch=max(args.batch, 1),
                                                   compile=torch.device(device).type == "cuda"))
    if "decode" in sections:
        bench_decode(engine, config, args, results["ours"])
    if "context" in sections:
        bench_context(engine, config, args, results["ours"])
    # Its cache (4 GiB at batch 8) and CUDA-graph pool must not count in the later sections' peaks.
    del engine
    release_compiled(device)
    if "decode" in sections and getattr(args, "spec", None) is not None:
        from .speculative import bench_speculative

        bench_speculative(model, config, args, results)
        release_compiled(device)


def bench_decode(engine: Engine, config: ModelConfig, args, ours: dict) -> None:
    device = args.device
    for batch in (1, args.batch):
        prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
        reset_peak(device)
        finished = []
        t = timed(lambda: finished.append(run_requests(engine, prompts, args.new_tokens)), device, args.runs)
        ours[f"decode_b{batch}_tok_s"] = batch * args.new_tokens / t
        ours[f"decode_b{batch}_decode_only_tok_s"] = statistics.median(decode_only_rate(r) for r in finished[1:])
        ours[f"decode_b{batch}_peak_gib"] = peak_gib(args)
        print(f"ours decode b{batch}: {ours[f'decode_b{batch}_tok_s']:.1f} tok/s with the prefill, "
              f"{ours[f'decode_b{batch}_decode_only_tok_s']:.1f} after the first token", flush=True)


def decode_only_rate(requests) -> float:
    """Tokens after the first, over the time from the first token to the last: gpt-fast's measure."""
    tokens = sum(len(r.output_ids) - 1 for r in requests)
    return tokens / (max(r.finish_time for r in requests) - min(r.first_token_time for r in requests))


def bench_context(engine: Engine, config: ModelConfig, args, ours: dict) -> None:
    for ctx in (1024, args.context):
        prompts = random_prompts(1, ctx, config.vocab_size, seed=1)
        run_requests(engine, prompts, args.new_tokens)  # warm-up: records this kv_len's graph
        rates = []
        for _ in range(args.runs):
            (r,) = run_requests(engine, prompts, args.new_tokens)
            rates.append((len(r.output_ids) - 1) / (r.finish_time - r.first_token_time))
        ours[f"decode_at_{ctx}_tok_s"] = statistics.median(rates)
        print(f"ours decode at {ctx} context: {ours[f'decode_at_{ctx}_tok_s']:.1f} tok/s", flush=True)
    ours["context_ratio"] = ours[f"decode_at_{args.context}_tok_s"] / ours["decode_at_1024_tok_s"]


def bench_prefill(model: Transformer, config: ModelConfig, args, ours: dict) -> None:
    device = args.device
    prefill_lengths = [int(x) for x in args.prefill.split(",") if x]
    prefill_engine = Engine(model, None, engine_config(args, max_batch=1))
    for n in prefill_lengths:
        prompts = random_prompts(1, n, config.vocab_size, seed=2)
        reset_peak(device)
        t = timed(lambda: run_requests(prefill_engine, prompts, 1), device, args.runs)
        ours[f"prefill_{n}_tok_s"] = n / t
        ours[f"prefill_{n}_peak_gib"] = peak_gib(args)
        print(f"ours prefill {n} (window, chunked): {n / t:.0f} tok/s", flush=True)
    del prefill_engine
    # One flex pass over the whole prompt, to pick the chunk size by measurement.
    n = max(prefill_lengths)
    prompts = random_prompts(1, n, config.vocab_size, seed=2)
    one_pass = Engine(model, None, engine_config(args, max_batch=1, chunk_size=n))
    t = timed(lambda: run_requests(one_pass, prompts, 1), device, args.runs)
    ours[f"prefill_{n}_window_one_pass_tok_s"] = n / t
    print(f"ours prefill {n} (window, one pass): {n / t:.0f} tok/s", flush=True)
    del one_pass
    if not isinstance(model, Transformer) or any(isinstance(m, QuantModule) for m in model.modules()):
        return  # sharded or quantized: with_config's dense variant cannot take its weights
    # The paper's promise: at long lengths the window must beat our own full attention.
    full_model = with_config(model, replace(config, sliding_window=None, max_seq_len=n + 8))
    full_engine = Engine(full_model, None, engine_config(args, max_batch=1, chunk_size=n))
    t = timed(lambda: run_requests(full_engine, prompts, 1), device, args.runs)
    ours[f"prefill_{n}_full_attention_tok_s"] = n / t
    print(f"ours prefill {n} (full attention): {n / t:.0f} tok/s", flush=True)
    del full_engine, full_model


def bench_long(model: Transformer, config: ModelConfig, args, ours: dict) -> None:
    device = args.device
    long_engine = Engine(model, None, engine_config(args, max_batch=1, compile=torch.device(device).type == "cuda"))
    run_requests(long_engine, random_prompts(1, 8192, config.vocab_size, seed=4), 16)  # compile
    prompts = random_prompts(1, args.long_context, config.vocab_size, seed=3)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    (r,) = run_requests(long_engine, prompts, 128)
    sync(device)
    ours["long_context_tokens"] = args.long_context
    ours["long_context_seconds"] = time.perf_counter() - t0
    ours["long_context_prefill_seconds"] = r.first_token_time - r.arrival_time
    ours["long_context_cache_gib"] = long_engine.cache.nbytes() / 2**30
    ours["long_context_peak_gib"] = peak_gib(args)
    ours["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if ours["long_context_peak_gib"] is not None:  # issue 13's figure: what the long prompt adds to the weights
        ours["long_context_above_weights_gib"] = ours["long_context_peak_gib"] - ours["weights_gib"]
    print(f"ours long context {args.long_context}: {ours['long_context_seconds']:.1f} s, "
          f"cache {ours['long_context_cache_gib']:.2f} GiB, peak {ours['long_context_peak_gib']}", flush=True)
    del long_engine


def bench_hf(hf, config, args, results):
    device = args.device
    out = results["hf"]

    def generate(prompts, **kwargs):
        ids = torch.tensor(prompts, device=device)
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **kwargs)

    with torch.no_grad():
        hf_sections = set(args.hf_sections.split(","))
        for batch in (1, args.batch) if "decode" in hf_sections else ():
            prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
            t = timed(lambda: generate(prompts), device, max(1, args.runs - 1))
            out[f"decode_b{batch}_tok_s"] = batch * args.new_tokens / t
            print(f"hf decode b{batch}: {out[f'decode_b{batch}_tok_s']:.1f} tok/s", flush=True)
        for n in [int(x) for x in args.prefill.split(",") if x] if "prefill" in hf_sections else ():
            ids = torch.tensor(random_prompts(1, n, config.vocab_size, seed=2), device=device)
            for label, window in (("", config.sliding_window), ("_full_attention", None)):
                hf.config.sliding_window = window
                t = timed(lambda: hf(ids, use_cache=False, logits_to_keep=1), device, max(1, args.runs - 1))
                out[f"prefill_{n}{label}_tok_s"] = n / t
                print(f"hf prefill {n}{label}: {n / t:.0f} tok/s", flush=True)
            hf.config.sliding_window = config.sliding_window
        if "compile" in hf_sections:
            prompts = random_prompts(1, args.prompt_len, config.vocab_size)
            generate(prompts, cache_implementation="static")  # compiles
            t = timed(lambda: generate(prompts, cache_implementation="static"), device, max(1, args.runs - 1))
            results["hf_compiled"]["decode_b1_tok_s"] = args.new_tokens / t
            print(f"hf compiled decode b1: {args.new_tokens / t:.1f} tok/s", flush=True)
