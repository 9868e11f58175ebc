"""Speculative decoding's cost at a preset's shape (issue 22): one verify forward of k + 1 tokens per
row against one decode step, through the engine's runner (compiled, CUDA graphs on a GPU), at batch 1
and 8; the eager verify beside it. Random weights: acceptance comes from spec_bench.py's real model,
and the speed-up a given acceptance buys is tokens per verify x decode ms / verify ms.

    python3 benchmarks/verify_cost.py [--preset mistral-7b-v0.1] [--k 4] [--accept 1.57,2.0,2.91] [--json F]
    python3 benchmarks/verify_cost.py --model default --device cpu --batch 1 2 4 8   # the CPU's threshold
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from mistral7b import SamplingParams
from mistral7b.bench import bench_config, random_model, timed
from mistral7b.engine import Engine, SpeculativeConfig


def ms_per_call(fn, device: torch.device, calls: int) -> float:
    """Median ms a call; one call beyond `timed`'s warm-up, since CUDA graphs record on the second."""
    fn()
    return timed(fn, device, calls) * 1e3


def in_scope(runner, fn):
    """`fn` inside the runner's decode scope, as the engine runs a speculative step (on a CPU: torch's
    ops on one thread; outside it, the logits' reduction woke an OpenMP team that then spun on the
    cores the next verify needed)."""
    def run():
        with runner.decode_scope():
            return fn()
    return run


def decoding_requests(engine: Engine, n: int, prompt_len: int, vocab: int) -> list:
    rng = random.Random(0)
    requests = [engine.add([rng.randrange(vocab) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=2048, ignore_eos=True)) for _ in range(n)]
    while not all(r.output_ids for r in requests):
        engine.step()
    return requests


def profile(fn, title: str, calls: int = 5) -> None:
    """The kernels `calls` calls of `fn` ran, by GPU time, or by CPU time on a CPU (where the extra
    milliseconds go)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
    print(f"--- {title}, {calls} calls")
    key = "cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=70), flush=True)


@torch.no_grad()  # as Engine.step: the runner's forwards are traced without autograd
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--model", default=None,
                   help="real weights through LLM (as users run them: a GGUF quantized on the CPU) instead of "
                        "the preset's random ones; 'default' for the bundled model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--k", type=int, default=4, help="draft tokens per verify")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--calls", type=int, default=50)
    # 2.91: n-gram's tokens per verify step on the grounded prompts (default model, spec_bench.py, CPU); 1.57 is
    # its tokens per forward, plain steps without a draft included: the bound if every step were a verify
    p.add_argument("--accept", default="1.57,2.0,2.91", help="tokens per verify to project the speed-up at")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode and verify steps (default: on a GPU only)")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="print where the compiled and eager verify spend time")
    args = p.parse_args()
    device = torch.device(args.device)
    compile = device.type == "cuda" if args.compile is None else args.compile
    spec = SpeculativeConfig("ngram", args.k, max_batch=max(args.batch))
    if args.model:
        from mistral7b import LLM

        llm = LLM(None if args.model == "default" else args.model, device, max_batch=max(args.batch),
                  compile=compile, speculative=spec)
        engine, config = llm.engine, llm.engine.runner.model.config
    else:
        config = bench_config(args.preset)
        engine = Engine(random_model(config, device), None, max_batch=max(args.batch), compile=compile,
                        speculative=spec)
    runner = engine.runner
    t0 = time.perf_counter()
    requests = decoding_requests(engine, max(args.batch), args.prompt_len, config.vocab_size)
    print(f"{len(requests)} requests decoding after {time.perf_counter() - t0:.1f} s", flush=True)
    rng = random.Random(1)
    rows, accept = [], [float(a) for a in args.accept.split(",")]
    for b in args.batch:
        group = requests[:b]
        drafts = [[rng.randrange(config.vocab_size) for _ in range(args.k)] for _ in group]
        t0 = time.perf_counter()
        decode = ms_per_call(lambda: runner.launch(group, 1, None, False)[0].read(), device, args.calls)
        print(f"batch {b}: decode timed ({time.perf_counter() - t0:.1f} s with its compile)", flush=True)
        t0 = time.perf_counter()
        verify = ms_per_call(in_scope(runner, lambda: runner.verify(group, drafts).float().sum().item()), device, args.calls)
        print(f"batch {b}: verify timed ({time.perf_counter() - t0:.1f} s with its compile)", flush=True)
        graphs, runner.compiled_verify = runner.compiled_verify, None
        eager = ms_per_call(in_scope(runner, lambda: runner.verify(group, drafts).float().sum().item()), device,
                            max(5, args.calls // 5))
        runner.compiled_verify = graphs
        if args.profile:
            profile(in_scope(runner, lambda: runner.verify(group, drafts).float().sum().item()), f"compiled verify b{b}")
            profile(lambda: runner.launch(group, 1, None, False)[0].read(), f"decode b{b}")
        row = {"batch": b, "decode_ms": decode, "verify_ms": verify, "eager_verify_ms": eager,
               "ratio": verify / decode, "speedup_at": {a: a * decode / verify for a in accept}}
        rows.append(row)
        print(f"batch {b}: decode {decode:.3f} ms, verify of {args.k + 1} {verify:.3f} ms ({verify / decode:.3f}x), "
              f"eager verify {eager:.3f} ms; speed-up at " +
              ", ".join(f"{a} tok/verify {s:.2f}x ({b * 1e3 * s / decode:.0f} tok/s)"
                        for a, s in row["speedup_at"].items()), flush=True)
    print("\n| batch | decode ms | verify ms (k+1 = %d) | verify / decode | eager verify ms |" % (args.k + 1))
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['decode_ms']:.3f} | {r['verify_ms']:.3f} | {r['ratio']:.3f} | {r['eager_verify_ms']:.3f} |")
    for a in accept:  # SpeculativeConfig.max_batch: the largest batch measured where a verify still pays
        paying = [r["batch"] for r in rows if a * r["decode_ms"] > r["verify_ms"]]
        print(f"at {a} tokens per verify, speculation pays up to batch {max(paying) if paying else 'none'} "
              f"of {[r['batch'] for r in rows]}")
    if args.json:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "k": args.k, "preset": args.model or args.preset, "device": name,
                       "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
