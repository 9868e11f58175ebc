"""Structured-output costs: grammar compile time and its cache, per-step mask time at batch 8, and
(on a GPU) constrained vs unconstrained decode tok/s at the 7B shape with random weights.

    python benchmarks/structured_bench.py                       # CPU: compile, cache, masks (32k/49k vocab)
    python benchmarks/structured_bench.py --compare-xgrammar    # the same with xgrammar, if importable
    python benchmarks/structured_bench.py --device cuda --tokenizer tokenizer.model.v1   # + decode tok/s
    python benchmarks/structured_bench.py --device cuda --tokenizer tokenizer.model.v1 --engine   # + through the Engine

Random weights give arbitrary tokens, but the mask still runs every step (a row whose value is
complete restarts its matcher), so the overhead measured is the real one. The GPU loop overlaps the
host's mask work with the forward of the same step, as structured.py tells the engine to:
forward(t) is queued, then the host waits only for step t-1's tokens, consumes them and fills the
mask for step t, which is copied and applied before sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mistral7b.sampling import SamplerBatch, SamplingParams, sample  # noqa: E402
from mistral7b.structured import Constraint, GrammarCache, allocate_bitmask, fill_bitmask, ll_tokenizer  # noqa: E402
from mistral7b.tokenizer import Tokenizer  # noqa: E402

NAME = {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"}
NESTED = {  # a realistic nested record: objects in arrays, enums, bounded integers, patterns, optional fields
    "type": "object", "additionalProperties": False, "required": ["id", "name", "address", "phones", "status"],
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 10**9},
        "name": {"type": "object", "required": ["first", "last"], "additionalProperties": False,
                 "properties": {"first": NAME, "last": NAME}},
        "address": {"type": "object", "required": ["street", "city", "zip"], "additionalProperties": False,
                    "properties": {"street": {"type": "string", "maxLength": 40}, "city": NAME,
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                   "country": {"enum": ["FR", "DE", "IT", "ES", "US"]}}},
        "phones": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "required": ["kind", "number"], "additionalProperties": False,
            "properties": {"kind": {"enum": ["home", "work", "mobile"]},
                           "number": {"type": "string", "pattern": "^\\+[0-9]{8,12}$"}}}},
        "status": {"enum": ["active", "suspended", "closed"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
    },
}


def tokenizers(args):
    """The vocabularies at hand: Mistral v1/v3 (shipped in mistral-common) and the default GGUF."""
    found = {}
    try:
        import mistral_common

        data = os.path.join(os.path.dirname(mistral_common.__file__), "data")
        found["mistral-v1 (32000)"] = os.path.join(data, "tokenizer.model.v1")
        found["mistral-v3 (32768)"] = os.path.join(data, "mistral_instruct_tokenizer_240323.model.v3")
    except ImportError:
        pass
    gguf = os.path.expanduser("~/.cache/mistral7b/SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(gguf) and _importable("gguf"):
        found["smollm2-gguf (49152)"] = gguf
    if args.tokenizer:
        found[f"{os.path.basename(args.tokenizer)}"] = args.tokenizer
    return found


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def random_walk(tok, ll, schema, batch, steps, seed=0):
    """Batch `batch` rows through `steps` masked steps on random logits; per-step mask-fill seconds."""
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(json_schema=schema, temperature=1.0)
    constraints = [Constraint.from_params(params, ll) for _ in range(batch)]
    sampler = SamplerBatch(batch, tok.vocab_size, torch.device("cpu"))
    for r in range(batch):
        sampler.assign(r, params, [])
    bitmask, fills = allocate_bitmask(batch, tok.vocab_size), []
    for _ in range(steps):
        t0 = time.perf_counter()
        fill_bitmask(bitmask, [(c, r) for r, c in enumerate(constraints)])
        fills.append(time.perf_counter() - t0)
        tokens = sample(torch.randn(batch, tok.vocab_size, generator=gen), sampler, list(range(batch)),
                        torch.arange(batch), bitmask=bitmask).tolist()
        for c, t in zip(constraints, tokens):
            if t in tok.stop_token_ids or not c.consume(t) or c.is_stopped():
                c.matcher.reset()  # keep masking every step
    return fills


def cpu_section(args, results):
    for label, path in tokenizers(args).items():
        tok = Tokenizer.from_file(path)
        t0 = time.perf_counter()
        ll = ll_tokenizer(tok, tok.vocab_size)
        entry = {"tokenizer_build_s": time.perf_counter() - t0}
        cache = GrammarCache(ll)
        bitmask = allocate_bitmask(1, tok.vocab_size)
        for what in ("first", "cached"):
            t0 = time.perf_counter()
            c = Constraint.from_params(SamplingParams(json_schema=NESTED), ll, cache)
            t1 = time.perf_counter()
            c.fill(bitmask, 0)
            entry[f"{what}_matcher_ms"] = (t1 - t0) * 1e3
            entry[f"{what}_first_mask_ms"] = (time.perf_counter() - t1) * 1e3
        fills = random_walk(tok, ll, NESTED, args.batch, args.steps)
        entry.update(mask_batch_median_ms=statistics.median(fills) * 1e3, mask_batch_p99_ms=pct(fills, 0.99) * 1e3)
        results["cpu"][label] = entry
        print(f"{label}: tokenizer {entry['tokenizer_build_s']:.2f} s; matcher new {entry['first_matcher_ms']:.2f} ms"
              f" + first mask {entry['first_first_mask_ms']:.2f} ms; cached {entry['cached_matcher_ms']:.3f} ms + "
              f"{entry['cached_first_mask_ms']:.2f} ms; batch-{args.batch} mask fill median "
              f"{entry['mask_batch_median_ms']:.3f} ms, p99 {entry['mask_batch_p99_ms']:.3f} ms", flush=True)
        if args.compare_xgrammar:
            compare_xgrammar(tok, label, args, results)


def compare_xgrammar(tok, label, args, results):
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        print(f"  xgrammar: not importable ({e})")
        return
    if tok._hf is None:
        print("  xgrammar: skipped (needs a `tokenizers` backend)")
        return
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok._hf),
                                              vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.stop_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(NESTED), any_whitespace=False)
    compile_ms = (time.perf_counter() - t0) * 1e3
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(args.batch)]
    bitmask = xgr.allocate_token_bitmask(args.batch, tok.vocab_size)
    gen, fills = torch.Generator().manual_seed(0), []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        for r, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, r)
        fills.append(time.perf_counter() - t0)
        logits = torch.randn(args.batch, tok.vocab_size, generator=gen)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        for m, t in zip(matchers, logits.argmax(-1).tolist()):
            if not m.accept_token(t) or m.is_terminated():
                m.reset()
    results["cpu"][label]["xgrammar"] = {"compile_ms": compile_ms, "mask_batch_median_ms": statistics.median(fills) * 1e3,
                                         "mask_batch_p99_ms": pct(fills, 0.99) * 1e3}
    print(f"  xgrammar: compile {compile_ms:.1f} ms; batch-{args.batch} mask fill median "
          f"{statistics.median(fills) * 1e3:.3f} ms, p99 {pct(fills, 0.99) * 1e3:.3f} ms", flush=True)


def gpu_decode(model, tok, ll, args, constrained: bool) -> float:
    """tok/s of `args.steps` decode steps at batch `args.batch`, masks overlapped with the forward."""
    from mistral7b import KVCache

    device, batch, vocab = torch.device(args.device), args.batch, model.config.vocab_size
    cache = KVCache(model.config, batch, device, torch.bfloat16, args.prompt_len + args.steps + 8)
    prompt = torch.randint(0, vocab, (batch, args.prompt_len), device=device)
    params = SamplingParams(temperature=1.0, json_schema=NESTED if constrained else None)
    sampler = SamplerBatch(batch, vocab, device)
    for r in range(batch):
        sampler.assign(r, params, [])
    constraints = [Constraint.from_params(params, ll) for _ in range(batch)] if constrained else []
    host_mask = allocate_bitmask(batch, vocab)
    index, rows = torch.arange(batch, device=device), list(range(batch))
    cuda = device.type == "cuda"
    host_tokens = torch.empty(batch, dtype=torch.long, pin_memory=cuda)
    with torch.inference_mode():
        logits = model(prompt, torch.arange(args.prompt_len, device=device).expand(batch, -1), cache,
                       slice(0, batch), args.prompt_len, last_only=True)[:, -1]
        if constrained:
            fill_bitmask(host_mask, [(c, r) for r, c in enumerate(constraints)])
        tokens = sample(logits, sampler, rows, index, bitmask=host_mask.to(device) if constrained else None)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for step in range(args.steps):
            host_tokens.copy_(tokens, non_blocking=cuda)
            ready = torch.cuda.Event() if cuda else None
            if cuda:
                ready.record()
            pos = args.prompt_len + step
            logits = model(tokens[:, None], torch.full((batch, 1), pos, device=device), cache, slice(0, batch),
                           pos + 1)[:, -1]  # queued; the host works on the mask meanwhile
            mask = None
            if constrained:
                if cuda:
                    ready.synchronize()  # step t-1's tokens only, not this forward
                for c, t in zip(constraints, host_tokens.tolist()):
                    if not c.consume(t) or c.is_stopped():
                        c.matcher.reset()
                fill_bitmask(host_mask, [(c, r) for r, c in enumerate(constraints)])
                mask = host_mask.to(device, non_blocking=True)
            tokens = sample(logits, sampler, rows, index, bitmask=mask)
        sync()
    return batch * args.steps / (time.perf_counter() - t0)


def engine_decode(engine, vocab: int, args, constrained: bool) -> float:
    """Decode tok/s through the Engine at batch `args.batch`: constrained rows run single unpipelined
    steps with masks (engine/constraints.py), free rows the engine's multi-step pipelined decode. The
    schema is a long array of NESTED records, so no row completes its value before `args.steps`."""
    schema = {"type": "array", "items": NESTED, "minItems": 64}
    params = SamplingParams(temperature=1.0, max_tokens=args.steps, ignore_eos=True,
                            json_schema=schema if constrained else None)
    gen = torch.Generator().manual_seed(1)
    requests = [engine.add(torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist(), params)
                for _ in range(args.batch)]
    while not all(r.output_ids for r in requests):  # prefill (and the first token) outside the timing
        engine.step()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    n0, t0 = sum(len(r.output_ids) for r in requests), time.perf_counter()
    while engine.has_work():
        engine.step()
    sync()
    return (sum(len(r.output_ids) for r in requests) - n0) / (time.perf_counter() - t0)


def engine_section(model, tok, args, results):
    from mistral7b.engine import Engine

    engine = Engine(model, tok, max_batch=args.batch, max_seq_len=args.prompt_len + args.steps + 8,
                    compile=args.device.startswith("cuda"))
    engine.warmup()
    figures = {}
    for run in range(args.runs):
        for constrained in (False, True):
            figures.setdefault(constrained, []).append(engine_decode(engine, model.config.vocab_size, args, constrained))
    free, masked = statistics.median(figures[False]), statistics.median(figures[True])
    results["engine"] = {"batch": args.batch, "unconstrained_tok_s": free, "constrained_tok_s": masked,
                         "ratio": masked / free, "decode_steps": engine.decode_steps, "pipeline": engine.pipeline,
                         "runs": {"unconstrained": figures[False], "constrained": figures[True]}}
    print(f"Engine {args.preset} batch {args.batch} (compile={engine.compiled}): unconstrained {free:.0f} tok/s, "
          f"constrained {masked:.0f} tok/s (ratio {masked / free:.3f})", flush=True)


def gpu_section(args, results):
    from mistral7b.config import preset
    from mistral7b.model import Transformer

    tok = Tokenizer.from_file(args.tokenizer)
    ll = ll_tokenizer(tok, tok.vocab_size)
    config = preset(args.preset)
    if args.tiny:  # a smoke test of the loop itself, e.g. on CPU
        config = config.with_(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Transformer(config).to(torch.bfloat16).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    figures = {}
    for run in range(args.runs):  # alternate, so drift hits both equally
        for constrained in (False, True):
            figures.setdefault(constrained, []).append(gpu_decode(model, tok, ll, args, constrained))
    free, masked = statistics.median(figures[False]), statistics.median(figures[True])
    results["gpu"] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device, "preset": args.preset, "batch": args.batch,
                      "unconstrained_tok_s": free, "constrained_tok_s": masked, "ratio": masked / free,
                      "runs": {"unconstrained": figures[False], "constrained": figures[True]}}
    print(f"GPU {args.preset} batch {args.batch}: unconstrained {free:.0f} tok/s, constrained {masked:.0f} tok/s "
          f"(ratio {masked / free:.3f})", flush=True)
    if args.engine:
        engine_section(model, tok, args, results)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--tokenizer", default=None, help="SentencePiece/tokenizer.json for the GPU run (vocab of the preset)")
    p.add_argument("--compare-xgrammar", action="store_true")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--tiny", action="store_true", help="decode comparison at a tiny shape (smoke test)")
    p.add_argument("--decode", action="store_true", help="run the decode comparison on a CPU device too")
    p.add_argument("--engine", action="store_true", help="also compare through the Engine (compiled on CUDA)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    results = {"torch": torch.__version__, "cpu": {}}
    if not args.skip_cpu:
        cpu_section(args, results)
    if torch.device(args.device).type == "cuda" or args.decode:
        if not args.tokenizer:
            p.error("--device cuda needs --tokenizer (e.g. mistral_common/data/tokenizer.model.v1 for mistral-7b-v0.1)")
        gpu_section(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
