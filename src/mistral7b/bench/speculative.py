"""`mistral7b bench --speculative`: the decode section again, through a speculative engine on the same
model and prompts; per batch, tokens per verify step (mean accepted draft tokens + 1) and the speed-up
of decode after the first token over plain decode.

Random weights say little about acceptance: their greedy text falls into loops that prompt lookup
predicts or not (ngram accepted 36% to 95% of drafts over runs at the tiny shape, each run drawing new
weights), and an int4 copy agrees with them at times; benchmarks/spec_bench.py measures real weights. The speculative engine speculates at every batch
measured (its `max_batch` is raised to --batch), so the b8 figure is speculation at batch 8.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from ..config import ModelConfig
from ..engine import Engine, SpeculativeConfig
from ..engine.speculative import SpecStats
from ..quant import QuantConfig
from . import decode_only_rate, engine_config, peak_gib, quantized, random_prompts, reset_peak, run_requests, timed


def speculative_engine(model, spec: SpeculativeConfig, args) -> Engine:
    """An engine on `model` that speculates with `spec` at every batch up to --batch; "self-int4" drafts
    with an int4 copy of the random weights, "draft" with the model at `spec.draft`."""
    device = args.device
    draft = None
    if spec.method == "self-int4":
        draft = quantized(model, QuantConfig("int4"), device)
    elif spec.method == "draft":
        from ..engine.proposers import load_draft

        draft = load_draft(spec, None, device, torch.bfloat16)
    batch = max(args.batch, 1)
    config = engine_config(args, max_batch=batch, compile=torch.device(device).type == "cuda",
                           speculative=replace(spec, max_batch=max(spec.max_batch or 1, batch)))
    return Engine(model, None, config, draft_model=draft)


def bench_speculative(model, config: ModelConfig, args, results: dict) -> None:
    """Fill results["speculative"]: the method, k, and per batch the speculative figures beside plain's
    (results["ours"]'s decode figures, measured first on the same prompts)."""
    spec, device = args.spec, args.device
    engine = speculative_engine(model, spec, args)
    out = results["speculative"] = {"method": spec.method, "num_tokens": spec.num_tokens}
    for batch in (1, args.batch):
        prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
        engine.speculator.stats = SpecStats(spec.num_tokens)  # this batch's counts only
        reset_peak(device)
        finished = []
        t = timed(lambda: finished.append(run_requests(engine, prompts, args.new_tokens)), device, args.runs)
        stats = engine.speculator.stats
        rate = statistics.median(decode_only_rate(r) for r in finished[1:])
        plain = results["ours"].get(f"decode_b{batch}_decode_only_tok_s")
        out[f"b{batch}"] = {
            "tok_s": batch * args.new_tokens / t,
            "decode_only_tok_s": rate,
            "tokens_per_verify": stats.tokens_per_step,  # accepted + 1 per row and verify
            "acceptance_rate": stats.accepted_tokens / stats.draft_tokens if stats.draft_tokens else 0.0,
            "draft_tokens": stats.draft_tokens,
            "accepted_tokens": stats.accepted_tokens,
            "speedup": rate / plain if plain else None,
            "peak_gib": peak_gib(args),
        }
        print(f"ours speculative ({spec.method}, k={spec.num_tokens}) b{batch}: {rate:.1f} tok/s after the first "
              f"token, {stats.tokens_per_step:.2f} tokens per verify", flush=True)
    del engine


def print_speculative_table(results: dict, args) -> None:
    spec = results.get("speculative")
    if spec is None:
        return
    fmt = lambda v, unit="": "-" if v is None else f"{v:,.2f}{unit}"  # noqa: E731
    print(f"\nspeculative decoding, {spec['method']}, k = {spec['num_tokens']} (decode after the first token)")
    print("| batch | tokens per verify | acceptance | plain tok/s | speculative tok/s | speed-up |\n|---|---|---|---|---|---|")
    for batch in sorted({1, args.batch}):
        row = spec[f"b{batch}"]
        plain = results["ours"].get(f"decode_b{batch}_decode_only_tok_s")
        print(f"| {batch} | {fmt(row['tokens_per_verify'])} | {fmt(row['acceptance_rate'])} | {fmt(plain)} "
              f"| {fmt(row['decode_only_tok_s'])} | {fmt(row['speedup'], 'x')} |")
