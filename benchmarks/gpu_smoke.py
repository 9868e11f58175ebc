"""GPU smoke suite (issue 21): every GPU decode path once, at shapes small enough to take minutes.

1. The split-K decode kernel (`flash_decode`) against SDPA with the dense mask in fp32: 7B head shapes,
   a wrapped rolling buffer, batch 1 and 8, an idle row; and a verify's 5 tokens a row through grouped SDPA.
2. bf16, int8 and int4 weights (torch's kernels and quant/triton_mm.py), compiled with CUDA graphs
   at batch 1 and 8, all in this one process (ten compiled runners: the recompile-limit failure of 2026-12-04): every greedy token, teacher-forced
   through the eager path past the window, is the eager argmax or within a bf16 near-tie of it.
3. Speculative decoding with the compiled verify (CUDA graphs), rows of different lengths past the window:
   n-gram (k = 4) at batch 1 and 4, and the model as its own draft (k = 3, the draft's steps compiled too) at
   batch 4: the same near-tie check, verifies ran, and the self draft was accepted but for near-ties.
4. LoRA's Triton deltas, two kernels and fused, eager and compiled (CUDA graphs) against the matmul delta.
5. (`--only invariant-speculative`, in `h200.sh invariant`) With --batch-invariant, n-gram speculation at batch 4
   gives plain greedy's tokens exactly, past the window.
Run first on a fresh GPU machine (`bash benchmarks/h200.sh smoke`); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from gpu_check import random_model, rel
from mistral7b.attention import grouped_attention, sdpa_attention
from mistral7b.config import preset
from mistral7b.engine import Engine, SpeculativeConfig
from mistral7b.flash_decode import flash_decode
from mistral7b.sampling import SamplingParams
from quant_bench import quantize_model

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def rolling_case(batch, slots, device, window):
    heads, kv_heads, head_dim = 32, 8, 128
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, slots, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    positions = torch.randint(slots // 2, 5 * slots, (batch,)).tolist()
    if batch > 1:
        positions[-1] = -1  # an idle row rides along
    k_pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)
    for row, p in enumerate(positions):
        held = torch.arange(max(0, p - slots + 1), p + 1, device=device)
        k_pos[row, held % slots] = held
    return q, k, v, torch.tensor(positions, device=device)[:, None], k_pos


@torch.no_grad()
def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list:
    """Every prompt through `engine` together, to the end; the finished requests."""
    requests = [engine.add(p, params) for p in prompts]
    while not all(r.finished for r in requests):
        engine.step()
    return requests


@torch.inference_mode()  # the reference forwards must not keep an autograd graph per token
def worst_margin(model, prompt: list[int], output: list[int], device) -> float:
    """Feed `output` through the eager decode path one token at a time; the largest shortfall of a
    chosen token's eager logit below the eager maximum, relative to the largest |logit|. 0 when every
    choice is the eager argmax; a bf16 near-tie may give a little."""
    reference = Engine(model, None, max_batch=1)
    n = len(prompt)
    tokens = torch.tensor([prompt + output[:-1]], device=device)
    logits = model(tokens[:, :n], torch.arange(n, device=device)[None], reference.cache, rows=slice(0, 1),
                   kv_len=n, last_only=True)[0, -1]
    worst = 0.0
    for step, chosen in enumerate(output):
        if step:
            pos = n + step - 1
            logits = model(tokens[:, pos : pos + 1], torch.tensor([[pos]], device=device), reference.cache,
                           rows=slice(0, 1), kv_len=pos + 1)[0, -1]
        worst = max(worst, float((logits.max() - logits[chosen]) / logits.abs().max()))
    return worst


def kernel_checks(device) -> None:
    for batch in (1, 8):
        for slots, window in ((256, 4096), (4096, 4096), (1000, None)):
            q, k, v, q_pos, k_pos = rolling_case(batch, slots, device, window)
            got = flash_decode(q, k, v, q_pos, k_pos, window)
            want = sdpa_attention(q.float(), k.float(), v.float(), q_pos, k_pos, window)
            live = q_pos[:, 0] >= 0
            err = rel(got[live], want[live])
            idle_zero = bool((got[~live] == 0).all())
            check(f"flash_decode b{batch} slots {slots} window {window}", err < 1e-2 and idle_zero,
                  f"rel err vs fp32 SDPA {err:.2e}, idle rows zero: {idle_zero}")
    for batch in (1, 8):  # a verify's few tokens a row: grouped SDPA (no GQA copies) against fp32 SDPA
        q, k, v, q_pos, k_pos = rolling_case(batch, 4096, device, 4096)
        q = torch.randn(batch, q.shape[1], 5, q.shape[3], device=device, dtype=torch.bfloat16)
        q_pos = torch.where(q_pos >= 0, q_pos - 4 + torch.arange(5, device=device), -1)  # p - 4 .. p, idle -1
        got = grouped_attention(q, k, v, q_pos, k_pos, 4096)
        want = sdpa_attention(q.float(), k.float(), v.float(), q_pos, k_pos, 4096)
        live = q_pos[:, 0] >= 0
        err = rel(got[live], want[live])
        check(f"grouped attention b{batch} 5 tokens", err < 1e-2, f"rel err vs fp32 SDPA {err:.2e}")


METHODS = ["bf16", "int8", "int8-triton", "int4", "int4-triton", "int4-gemlite"]
LAYOUTS = {"int4": ["tiles"], "int4-triton": ["halves"], "int4-gemlite": ["gemlite"]}


def method_checks(device, args) -> None:
    config = small_config(args.window)
    dense = random_model(config, device, torch.bfloat16)
    from mistral7b.quant.linear import use_rows_kernel

    for method in args.methods:
        model = dense if method == "bf16" else quantize_model(dense, config, method.split("-")[0], device)
        # -triton, -gemlite: the same weights through quant/triton_mm.py or gemlite (MISTRAL7B_CUDA_ROWS_KERNEL).
        use_rows_kernel(model, method.split("-")[1] if "-" in method else "torch")
        layouts = sorted({m.layout for m in model.modules() if hasattr(m, "layout")})
        if layouts:  # int4: each kernel reads its own layout (the repack above), torch's tinygemm tiles
            check(f"{method} layout", layouts == LAYOUTS[method], f"int4 modules hold {layouts}")
        for batch in (1, 8):
            name, engine = f"{method} compiled b{batch}", None
            try:
                engine = Engine(model, None, max_batch=batch, compile=True, max_seq_len=4 * args.window)
                prompts = [torch.randint(0, config.vocab_size, (n,)).tolist()
                           for n in torch.randint(8, args.window + 40, (batch,)).tolist()]
                t0 = time.perf_counter()
                requests = run(engine, prompts, SamplingParams(max_tokens=args.tokens, ignore_eos=True))
                seconds = time.perf_counter() - t0
                margin = max(worst_margin(model, p, r.output_ids, device) for p, r in zip(prompts, requests))
                same = sum(len(r.output_ids) for r in requests)
                check(name, margin < 0.02, f"{same} greedy tokens; worst shortfall below the eager argmax "
                      f"{margin:.1e} of the largest logit (bf16 near-ties only); {seconds:.1f} s with compile")
            except Exception as e:  # noqa: BLE001 - one failure must not hide the other paths' results
                traceback.print_exc()
                check(name, False, f"{type(e).__name__}: {str(e)[:300]}")
            del engine
            torch.cuda.empty_cache()


def small_config(window: int):
    return preset("mistral-7b-v0.1").with_(dim=1024, n_layers=4, hidden_dim=3584, n_heads=8, n_kv_heads=2,
                                           sliding_window=window, vocab_size=32000)


def speculative_checks(device, args) -> None:
    """n-gram at b1 and b4; then the model as its own draft at b4, whose k steps and catch-ups run through
    the draft's compiled decode step: a draft equal to the target is accepted but for bf16 near-ties."""
    config = small_config(args.window)
    model = random_model(config, device, torch.bfloat16)
    # Backoff off: these check the verify's and the draft's compiled steps, which a row that backs off skips.
    ngram = SpeculativeConfig("ngram", 4, draft_by_match=(), backoff=False)
    self_draft = SpeculativeConfig("draft", 3, draft="self", backoff=False)
    for name, batch, spec, draft in (("ngram", 1, ngram, None), ("ngram", 4, ngram, None),
                                     ("self-draft", 4, self_draft, model)):
        engine = Engine(model, None, max_batch=batch, compile=True, max_seq_len=4 * args.window,
                        speculative=spec, draft_model=draft)
        # Repeating prompts, so that lookup proposes (random weights decide what is accepted).
        prompts = [(torch.randint(0, config.vocab_size, (5 + i,)).tolist() * 40)[: args.window + 9 * i]
                   for i in range(batch)]
        t0 = time.perf_counter()
        # Fewer tokens than the other paths: the verify graphs' compile is most of this check's time.
        requests = run(engine, prompts, SamplingParams(max_tokens=64, ignore_eos=True))
        seconds = time.perf_counter() - t0
        margin = max(worst_margin(model, p, r.output_ids, device) for p, r in zip(prompts, requests))
        stats = engine.speculator.stats
        graphs = engine.runner.compiled_verify is not None
        if draft is not None:
            graphs = graphs and engine.speculator.proposer.decode_fn is not None
        accepted = stats.accepted_tokens / max(stats.draft_tokens, 1)
        check(f"speculative {name} compiled b{batch}",
              margin < 0.02 and stats.verify_rows > 0 and graphs and (draft is None or accepted > 0.5),
              f"{sum(len(r.output_ids) for r in requests)} greedy tokens, {stats.verify_rows} verified rows, "
              f"{stats.accepted_tokens}/{stats.draft_tokens} drafts accepted, compiled verify{' and draft' if draft is not None else ''} "
              f"{graphs}; worst shortfall below the eager argmax {margin:.1e}; {seconds:.1f} s with compile")
        del engine
        torch.cuda.empty_cache()


def invariant_speculative_check(device, args) -> None:
    """With --batch-invariant, speculative greedy output equals plain greedy token for token: a verify's
    tokens go through flash_decode in one launch, each as its decode step would (attention.invariant_attention),
    and the matmuls' rows do not depend on M. Outputs pass the window: the invariant decode attention walks
    positions, so the speculating cache's k spare slots change no sum."""
    config = small_config(args.window)
    model = random_model(config, device, torch.bfloat16)
    prompts = [(torch.randint(0, config.vocab_size, (5 + i,)).tolist() * 40)[: args.window + 9 * i] for i in range(4)]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    outputs, verified = [], 0
    for spec in (None, SpeculativeConfig("ngram", 4, draft_by_match=(), backoff=False)):
        engine = Engine(model, None, max_batch=4, compile=True, batch_invariant=True, speculative=spec,
                        max_seq_len=4 * args.window)
        requests = run(engine, prompts, params)
        outputs.append([r.output_ids for r in requests])
        verified = engine.speculator.stats.verify_rows if spec is not None else verified
        del engine
    same = sum(a == b for a, b in zip(*outputs))
    check("speculative ngram compiled b4, batch-invariant: identical to plain", same == len(prompts) and verified > 0,
          f"{same}/{len(prompts)} outputs token-identical, {verified} verified rows")
    torch.cuda.empty_cache()


@torch.no_grad()
def lora_checks(device, args) -> None:
    """The Triton LoRA deltas ("triton": shrink and expand; "fused": one kernel with a ticketed handoff) in
    fp32 on 3 adapters of rank 16 over 8 rows (slots 0 and -1 among them): eager, and as the compiled
    decode step (CUDA graphs, replayed), against the eager "matmul" delta; the fused kernel's counters
    back at zero after the replays."""
    from lora_bench import random_adapter
    from mistral7b.lora import enable_lora

    config = small_config(args.window)
    model = random_model(config, device, torch.float32)
    bank = enable_lora(model, max_loras=3, max_rank=16, delta="matmul")
    generator = torch.Generator().manual_seed(int(time.time()))
    for slot in (1, 2, 3):
        bank.write(slot, random_adapter(config, 16, generator, 0.05), 1.0)
    slots = torch.tensor([1, 0, 2, 3, 1, -1, 3, 2], device=device)
    prompt = torch.randint(0, config.vocab_size, (8, 40), device=device)
    caches = {name: model.new_cache(8, device, max_seq_len=64) for name in ("want", "plain", "triton", "fused")}
    for name, cache in caches.items():  # 320 prompt rows: the matmul paths whatever the delta
        model(prompt, torch.arange(40, device=device).expand(8, 40), cache, kv_len=40,
              adapters=None if name == "plain" else slots)
    token, at = prompt[:, -1:], torch.full((8, 1), 40, device=device)
    want = model(token, at, caches["want"], kv_len=41, adapters=slots)
    moved = rel(want, model(token, at, caches["plain"], kv_len=41))
    for delta in ("triton", "fused"):
        bank.delta = delta
        eager = rel(model(token, at, caches[delta], kv_len=41, adapters=slots), want)  # rewrites position 40
        step = model.compile_decode(caches[delta], mode="reduce-overhead")
        compiled = max(rel(step(token, at, 41, slots), want) for _ in range(3))  # recorded, then replayed
        counters = bank.counters.tolist()
        check(f"lora {delta} b8", max(eager, compiled) < 1e-4 and moved > 1e-2 and counters == [0, 0, 0],
              f"rel err vs eager matmul: eager {eager:.1e}, compiled over 3 calls {compiled:.1e}; adapters move "
              f"{moved:.1e}; counters {counters}")
    torch.cuda.empty_cache()


SECTIONS = {"kernels": lambda device, args: kernel_checks(device), "methods": method_checks,
            "speculative": speculative_checks, "lora": lora_checks,
            "invariant-speculative": invariant_speculative_check}
DEFAULT = ["kernels", "methods", "lora", "speculative"]  # the smoke group's; h200.sh invariant runs invariant-speculative


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=128, help="sliding window of the small model (outputs pass it)")
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=DEFAULT, help="these sections alone")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="the methods section's weights")
    args = p.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(int(time.time()))
    for name in args.only:
        try:
            SECTIONS[name](device, args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            check(name, False, f"{type(e).__name__}: {str(e)[:300]}")
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
