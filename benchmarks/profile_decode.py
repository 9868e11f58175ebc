"""Where a compiled decode step's time goes: torch.profiler over engine steps at the 7B shape.

Prints wall time per token, GPU busy time per token, and the kernels that take the GPU time, so the
gap to the bandwidth roofline can be split into host overhead and slow kernels. With `--peer gpt-fast
DIR`, gpt-fast's compiled decode steps (its own model.py/generate.py, random bf16 weights) are profiled
the same way in the same process, and a table sets the two steps side by side per kind of kernel.

    python3 benchmarks/profile_decode.py [--batch 1] [--tokens 64] [--peer gpt-fast .peer/gpt-fast]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config
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


# Kernel names by kind, first match wins: attention (ours: flash_decode.py's Triton kernels; gpt-fast's is inductor's
# code for math SDPA), inductor's other fused kernels, cuBLAS/CUTLASS matmuls, fills and copies.
KINDS = (("attention", r"flash|fmha|attention|cudnn|decode|scaled_dot|sdpa|bmm|partial_kernel|merge_kernel"),
         ("triton fused", r"^triton_"),
         ("matmul", r"nvjet|gemv|gemm|cutlass|sm90_|splitK"),
         ("memset/memcpy", r"^Memset|^Memcpy|FillFunctor|CopyFunctor|copy_kernel"))


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def gpu_kernels(prof) -> dict[str, tuple[int, float]]:
    """Name -> (launches, GPU µs) of the CUDA kernels and memory ops a profile saw."""
    timed = [(e, getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0))
             for e in prof.key_averages()]
    timed = [(e, us) for e, us in timed if us and not e.key.startswith("## ")]
    on_gpu = [(e, us) for e, us in timed if str(getattr(e, "device_type", "")).endswith("CUDA")]
    # if this torch does not mark kernels' device, the host-side ops (aten::, cuda*) are left out by name
    kernels = on_gpu or [(e, us) for e, us in timed if not re.match(r"aten::|cuda[A-Z]", e.key)]
    return {e.key: (e.count, us) for e, us in kernels}


def step_summary(kernels: dict, steps: int) -> dict[str, tuple[float, float]]:
    """Kind -> (kernels launched per step, GPU µs per step); 'all' sums them."""
    out = defaultdict(lambda: [0.0, 0.0])
    for name, (count, us) in kernels.items():
        for kind in (kind_of(name), "all"):
            out[kind][0] += count / steps
            out[kind][1] += us / steps
    return {k: tuple(v) for k, v in out.items()}


def print_side_by_side(summaries: dict[str, dict], walls: dict[str, float]) -> None:
    names = list(summaries)
    print("\nper decode step: kernels launched / GPU µs, by kind")
    print("| kind | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    kinds = [k for k, _ in KINDS] + ["other", "all"]
    for kind in kinds:
        cells = [f"{summaries[n].get(kind, (0, 0))[0]:.1f} / {summaries[n].get(kind, (0, 0))[1]:.1f}" for n in names]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("| wall ms per step | " + " | ".join(f"{walls[n]:.3f}" for n in names) + " |")


def profile_gpt_fast(directory: Path, prompt_len: int, tokens: int):
    """gpt-fast's decode_n_tokens, compiled as its generate.py compiles it (reduce-overhead), after one
    generate call (compile, caches); (wall seconds per step, kernels of a profiled run of as many steps)."""
    from mistral7b.bench.peers import _random_gpt_fast_model, check_gpt_fast_dir

    sys.path.insert(0, str(check_gpt_fast_dir(directory)))
    import generate as gf  # gpt-fast's
    import model as gf_model

    model = _random_gpt_fast_model(gf_model, "bf16", "cuda")
    gf.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, 32000, (prompt_len,), device="cuda", dtype=torch.int)
    sampling = dict(temperature=0.8, top_k=200)  # what bench's peer run asks of it
    gf.generate(model, prompt, tokens + 1, batch_size=1, draft_model=None, speculate_k=0, interactive=False,
                callback=lambda x: x, **sampling)
    token = prompt[-1:].view(1, 1)

    def steps() -> float:
        pos = torch.tensor([prompt_len], device="cuda", dtype=torch.int)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gf.decode_n_tokens(model, token, pos, tokens, **sampling)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    steps()
    wall = steps()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.start()
    steps()
    prof.stop()
    return wall / tokens, gpu_kernels(prof)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--peer", nargs=2, metavar=("NAME", "DIR"), help="also profile gpt-fast: --peer gpt-fast DIR")
    p.add_argument("--single-row-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="ours' one-row step compiled with coordinate-descent tuning (model.SINGLE_ROW_OPTIONS), "
                        "as gpt-fast's generate.py compiles (its import sets the flag for the whole process)")
    args = p.parse_args()
    if args.peer and (args.peer[0] != "gpt-fast" or args.batch != 1):
        p.error("--peer takes gpt-fast, at --batch 1")
    config = preset(args.preset)
    hf = build_hf(config, "cuda")
    model = ours_from_hf(hf, config, "cuda")
    model.tune_single_row = args.single_row_tuning
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
    if args.peer:
        ours_kernels = gpu_kernels(prof)
        summaries, walls = {"ours": step_summary(ours_kernels, n)}, {"ours": wall / n * 1e3}
        del engine, model
        torch.cuda.empty_cache()
        peer_wall, peer_kernels = profile_gpt_fast(Path(args.peer[1]), args.prompt_len, n)
        summaries["gpt-fast"], walls["gpt-fast"] = step_summary(peer_kernels, n), peer_wall * 1e3
        print_side_by_side(summaries, walls)
        for name, kernels in (("ours", ours_kernels), ("gpt-fast", peer_kernels)):
            top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
            print(f"\n{name}: kernels by GPU time (per step: launches, µs)")
            for kname, (count, us) in top:
                print(f"  {count / n:5.1f}  {us / n:8.1f}  {kind_of(kname):13s}  {kname[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
