"""Speculative decoding on a real model: tokens per target forward and wall-clock speed-up at batch 1.

Greedy decoding of the shipped prompts (benchmarks/data/spec_prompts.json: 'grounded' answers that
reuse the input, and 'open' chat prompts), once plainly and once per proposer, through the engine.
Random weights accept nothing, so this needs real weights: the default model unless --model is given.

Per proposer and prompt kind it prints: the share of tokens that came from speculative steps (a row
backs off while its drafts do not pay: engine/spec_backoff.py), tokens per target forward (1.0 without
speculation), accepted
draft tokens per verify, acceptance rate, decode tok/s, speed-up over plain (total decode time of the
same prompts), and how many outputs are token-identical to plain greedy. With quantized weights on the
CPU, the int4 matmul rounds a k+1-token verify differently from a one-token step, so an output can part
from plain greedy at a near-tie; dense float32 (--quantize none) is token-identical.

CPU:  python benchmarks/spec_bench.py --threads 2 --json spec.json
H200: python benchmarks/spec_bench.py --device cuda --json spec.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from mistral7b import LLM, SamplingParams, SpeculativeConfig
from mistral7b.engine import Engine, EngineConfig
from mistral7b.engine.proposers import load_draft

PROMPTS = Path(__file__).parent / "data" / "spec_prompts.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target model (default: the bundled SmolLM2-135M GGUF)")
    p.add_argument("--methods", default="ngram,self-int4", help="comma-separated: ngram, self-int4, draft:SRC")
    p.add_argument("--num-tokens", type=int, default=4, help="k, draft tokens per step")
    p.add_argument("--min-ngram", type=int, default=None, help="n-gram: shortest match that proposes")
    p.add_argument("--draft-by-match", default=None,
                   help="n-gram: draft lengths after matches of 1, 2, ... tokens (e.g. 1,2; '' for k after any)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each kind only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None, help="as LLM(quantize=...): int4, int8, none")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backoff", choices=("on", "off", "both"), default="on",
                   help="speculative backoff (spec_backoff.py) as served (on), every step speculating (off: the "
                        "proposer's raw acceptance and cost), or both, as method and method/raw")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="every engine in the batch-invariant mode (CUDA: speculative greedy then equals plain "
                        "greedy token for token short of a window wrap); default: the device's")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile decode, verify and draft steps (default: on a GPU only)")
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def load_prompts(llm: LLM, limit: int | None) -> list[tuple[str, list[int]]]:
    prompts, seen = [], {}
    for entry in json.loads(PROMPTS.read_text())["prompts"]:
        seen[entry["kind"]] = seen.get(entry["kind"], 0) + 1
        if limit is None or seen[entry["kind"]] <= limit:
            prompts.append((entry["kind"], llm.chat_prompt(entry["messages"])))
    return prompts


def run_all(llm: LLM, engines: dict, prompts, max_tokens: int) -> dict[str, list[dict]]:
    """Greedy decode of every prompt by every engine, the engines taking turns prompt by prompt (so a
    shared machine's changing load falls on all of them alike); per engine and prompt its tokens,
    decode time and counts."""
    params = SamplingParams(max_tokens=max_tokens)
    records = {name: [] for name in engines}
    for name, engine in engines.items():  # warm-up: compiled, the decode, verify and draft graphs too
        if engine.compiled:
            engine.warmup()
        llm.engine = engine
        llm.generate([prompts[0][1]], SamplingParams(max_tokens=8))
    for kind, ids in prompts:
        for name, engine in engines.items():
            before, graphs = _counts(engine), _graphs_compiled()
            request = engine.add(ids, params)
            while not request.finished:
                engine.step()
            after, graphs = _counts(engine), _graphs_compiled() - graphs
            decode = request.finish_time - request.first_token_time
            records[name].append({"kind": kind, "tokens": request.output_ids, "decode_s": decode,
                                  "graphs_compiled": graphs, **{k: after[k] - before[k] for k in after}})
            # A compile inside the timed run stalls that prompt (7.89 s against 0.2-0.3, H100, 2026-12-05f)
            note = f" ({graphs} graphs compiled during it)" if graphs else ""
            print(f"  {name} {kind}: {len(request.output_ids)} tokens in {decode:.2f} s{note}", flush=True)
    return records


def _graphs_compiled() -> int:
    """Dynamo's count of graphs compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _counts(engine) -> dict:
    s = engine.speculator.stats if engine.speculator is not None else None
    names = ("row_steps", "verify_rows", "draft_tokens", "accepted_tokens", "emitted_tokens")
    return {n: getattr(s, n) if s is not None else 0 for n in names}


def summarize(records: list[dict], plain: list[dict], kind: str) -> dict:
    rows = [(r, p) for r, p in zip(records, plain) if r["kind"] == kind]
    total = lambda key, rs: sum(r[key] for r in rs)  # noqa: E731
    mine = [r for r, _ in rows]
    decoded = sum(len(r["tokens"]) - 1 for r in mine)  # the first token comes from the prefill
    plain_decoded = sum(len(p["tokens"]) - 1 for _, p in rows)
    tok_s = decoded / total("decode_s", mine)
    plain_tok_s = plain_decoded / total("decode_s", [p for _, p in rows])
    steps, verifies = total("row_steps", mine), total("verify_rows", mine)
    plain_steps = max(0, decoded - total("emitted_tokens", mine))  # a backed-off row: one token a forward
    return {
        "kind": kind, "prompts": len(rows),
        "tokens_per_forward": decoded / (steps + plain_steps) if steps else 1.0,
        "speculated_share": min(1.0, total("emitted_tokens", mine) / decoded) if decoded else 0.0,
        "accepted_per_verify": total("accepted_tokens", mine) / verifies if verifies else 0.0,
        "acceptance_rate": total("accepted_tokens", mine) / max(1, total("draft_tokens", mine)),
        "decode_tok_s": tok_s, "speedup": tok_s / plain_tok_s,
        "identical_to_plain": sum(r["tokens"] == p["tokens"] for r, p in rows),
        "graphs_compiled_while_timed": total("graphs_compiled", mine),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize, max_batch=1)
    prompts = load_prompts(llm, args.limit)
    kinds = sorted({k for k, _ in prompts})
    load = os.getloadavg()[0]
    # On a GPU as served: decode, verify and draft steps compiled with CUDA graphs (eager, a small model's
    # step is launch-bound, and a verify costs what a step does).
    compile = llm.device.type == "cuda" if args.compile is None else args.compile
    invariant = args.batch_invariant  # None: the device's default (on for CPU, off for CUDA)
    engines = {"plain": Engine(llm.model, llm.tokenizer,
                               EngineConfig(max_batch=1, compile=compile, batch_invariant=invariant))}
    backoffs = {"on": (True,), "off": (False,), "both": (True, False)}[args.backoff]
    for method in args.methods.split(","):
        spec = SpeculativeConfig.parse(method, args.num_tokens)
        if args.min_ngram is not None:
            spec = dataclasses.replace(spec, min_ngram=args.min_ngram)
        if args.draft_by_match is not None:
            spec = dataclasses.replace(spec, draft_by_match=tuple(int(d) for d in args.draft_by_match.split(",") if d))
        draft = load_draft(spec, llm.source, llm.device, llm.dtype)
        for backoff in backoffs:
            config = EngineConfig(max_batch=1, speculative=dataclasses.replace(spec, backoff=backoff), compile=compile,
                                  batch_invariant=invariant)
            name = method if backoff or args.backoff == "off" else f"{method}/raw"
            engines[name] = Engine(llm.model, llm.tokenizer, config, draft_model=draft)
    records = run_all(llm, engines, prompts, args.max_tokens)
    plain = records.pop("plain")
    table = [{"method": method, **summarize(r, plain, kind)} for method, r in records.items() for kind in kinds]
    for kind in kinds:
        table.append({"method": "plain", **summarize(plain, plain, kind)})
    print(f"load average at start {load:.1f}, after {os.getloadavg()[0]:.1f}; k = {args.num_tokens}, "
          f"{args.max_tokens} greedy tokens per prompt, batch 1, {torch.get_num_threads()} threads")
    print(f"backoff {args.backoff} (method/raw: every step speculates)")
    header = ("method", "kind", "prompts", "speculated", "tok/forward", "acc/verify", "accept", "tok/s", "speed-up",
              "identical")
    print(f"{header[0]:>16}" + "".join(f"{h:>12}" for h in header[1:]))
    for row in table:
        print(f"{row['method']:>16}{row['kind']:>12}{row['prompts']:>12}{row['speculated_share']:>12.2f}"
              f"{row['tokens_per_forward']:>12.2f}"
              f"{row['accepted_per_verify']:>12.2f}{row['acceptance_rate']:>12.2f}{row['decode_tok_s']:>12.1f}"
              f"{row['speedup']:>12.2f}{row['identical_to_plain']:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_average": load, "table": table}, indent=1))


if __name__ == "__main__":
    main()
