"""Quantized weights: speed and error, on the CPU (the default model) or on a GPU (the 7B shape).

CPU (default when no GPU): the default SmolLM2 Q4_1 GGUF through `LLM`, 128 greedy tokens, as loaded
(int4/int8 from the file) with fp32 and bf16 activations, against the dequantized fp32 model; load
time, resident bytes, logit error, and a profile of one decode step's time by op.

GPU (`--gpu`): the Mistral-7B shape with random bf16 weights, quantized int8 and int4 g128 on the
device: the tile layout of our unpacking checked against torch's packing, quantized vs dequantized
error, and batch-1 / batch-8 decode (compiled, CUDA graphs) and prefill 4096 for bf16 / int8 / int4,
printed as a table (and --json). `--small` runs the GPU path at a small shape to check it quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time

import torch

from mistral7b.bench import sync
from mistral7b.loading import load_model
from mistral7b.sampling import SamplingParams


def greedy_tok_s(generate, tokens: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(tokens)
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def cpu(args) -> dict:
    from mistral7b import LLM
    from mistral7b.default_model import default_model_path
    from mistral7b.engine import Engine
    from mistral7b.quant import describe_weights, resident_bytes

    torch.set_num_threads(args.threads)
    path = default_model_path()
    prompt = "The capital of France is"
    results = {"threads": args.threads, "tokens": args.tokens, "file_bytes": path.stat().st_size,
               "machine": machine(), "load_average_before": os.getloadavg()}
    print(f"{results['machine']}; load average {results['load_average_before']}", flush=True)
    runs = {}
    for label, dtype in (("quantized, fp32 activations", "float32"), ("quantized, bf16 activations", "bfloat16")):
        t0 = time.perf_counter()
        llm = LLM(path, device="cpu", dtype=dtype, max_batch=1)
        load = time.perf_counter() - t0
        params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0)
        speed = greedy_tok_s(lambda n: llm.generate(prompt, params), args.tokens, args.repeats)
        runs[label] = {"load_s": load, "tok_s": speed, "resident_bytes": resident_bytes(llm.model),
                       "ids": llm.generate(prompt, params)[0].token_ids}
        print(f"{label:32s} load {load:5.2f} s  decode {speed:6.1f} tok/s  "
              f"weights {resident_bytes(llm.model) / 1e6:.1f} MB", flush=True)
        model, tokenizer = llm.model, llm.tokenizer
    results["formats"] = describe_weights(model)
    dense = load_model(path, quantize=False)
    engine = Engine(dense, tokenizer, max_batch=1)
    ids = tokenizer.encode(prompt, bos=True)

    def run_dense(n):
        request = engine.add(ids, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))
        while not request.finished:
            engine.step()
        return request.output_ids

    speed = greedy_tok_s(run_dense, args.tokens, args.repeats)
    ref = run_dense(args.tokens)
    runs["dequantized fp32"] = {"tok_s": speed, "resident_bytes": resident_bytes(dense), "ids": ref}
    print(f"{'dequantized fp32':32s}                decode {speed:6.1f} tok/s  weights {resident_bytes(dense) / 1e6:.1f} MB")
    tokens = torch.tensor([ids + ref])
    with torch.no_grad():
        want = dense(tokens)
        for label in ("quantized, fp32 activations", "quantized, bf16 activations"):
            run = runs[label]
            prefix = next((i for i, (a, b) in enumerate(zip(run["ids"], ref)) if a != b), len(ref))
            run["greedy_common_prefix"] = prefix
            print(f"{label:32s} greedy tokens identical to fp32 for the first {prefix}/{len(ref)}")
    with torch.no_grad():
        got = model(tokens)  # the bf16-activation model
        run = runs["quantized, bf16 activations"]
        run["logits_norm_rel_err"] = ((got - want).norm() / want.norm()).item()
    for run in runs.values():
        run.pop("ids")
    results["runs"] = runs
    results["int4_kernel_floor"] = kernel_floor(llm.model, args.threads)
    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {results['load_average_after']}")
    if args.profile:
        profile_step(llm)
    return results


def kernel_floor(model, threads: int) -> dict:
    """The bare int4 kernel calls of one decode step, timed alone on the model's own packed weights:
    the decode speed with no other cost at all (torch's CPU int4 kernel, bf16 activations)."""
    from mistral7b.quant.linear import Int4Linear, Int8Linear

    calls = []
    for module in model.modules():
        if isinstance(module, Int4Linear):
            calls.append((module.packed, module.scales_zeros, module.group_size, module.in_features))
        elif isinstance(module, Int8Linear) and module.kernel == "planes":
            for plane in ("hi", "lo"):
                calls.append((getattr(module, f"packed_{plane}"), getattr(module, f"scales_zeros_{plane}"),
                              module.group_size, module.in_features))
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in {c[3] for c in calls}}
    step = lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], p, g, sz) for p, sz, g, k in calls]  # noqa: E731
    step()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        best = min(best, (time.perf_counter() - t0) / 10)
    print(f"int4 kernel alone: {len(calls)} calls a step, {best * 1e3:.2f} ms = at most {1 / best:.0f} tok/s "
          f"({threads} threads)", flush=True)
    return {"calls": len(calls), "step_ms": best * 1e3, "max_tok_s": 1 / best}


def machine() -> str:
    """CPU model, cores, the widest SIMD the CPU has (the int4 kernel's speed depends on it), torch."""
    flags = model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            model = value.strip() if key.strip() == "model name" and not model else model
            flags = value.split() if key.strip() == "flags" and not flags else flags
    simd = next((s for s in ("avx512f", "avx2") if s in flags), "no avx2")
    return f"{model or platform.processor()}, {os.cpu_count()} cores, {simd}, torch {torch.__version__}"


def profile_step(llm) -> None:
    from torch.profiler import profile

    params = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0)
    with profile() as prof:
        llm.generate("The capital of France is", params)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# --------------------------------------------------------------------------------------------- GPU


def gpu(args) -> dict:
    from mistral7b.bench import build_hf, ours_from_hf
    from mistral7b.config import preset
    from mistral7b.quant import kernels

    config = preset("mistral-7b-v0.1")
    if args.small:
        config = config.with_(dim=1024, n_layers=4, hidden_dim=3584, n_heads=8, n_kv_heads=2, vocab_size=32000)
    device = torch.device(args.device)
    results = {"config": config.to_dict()}
    if device.type == "cuda":
        results["tile_layout_matches_torch"] = check_tiles(device)
    hf = build_hf(config, device)
    dense = ours_from_hf(hf, config, device)
    del hf
    empty_cache(device)
    rows = {}
    methods = args.methods.split(",")
    if "bf16" in methods:
        rows["bf16"] = time_model(dense, config, args)
    for method in (m for m in ("int8", "int4") if m in methods):
        try:
            model = quantize_model(dense, config, method, device)
            rows[method] = {"rel_err_vs_dequantized": error_vs_dequantized(model, dense, config)}
            print(f"{method}: logits vs dequantized weights, rel. err {rows[method]['rel_err_vs_dequantized']:.2e}", flush=True)
            rows[method] |= time_model(model, config, args)
        except Exception as e:  # one method's failure must not lose the others' figures
            rows[method] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{method} failed: {rows[method]['error']}", flush=True)
        model = None
        empty_cache(device)
    results["rows"] = rows
    if args.peer:
        del dense
        empty_cache(device)
        results["gpt_fast"] = gpt_fast_rows(args, methods)
    print_gpu_table(rows, results.get("gpt_fast", {}))
    return results


def gpt_fast_rows(args, methods) -> dict:
    from mistral7b.bench.peers import run_gpt_fast

    rows = {}
    for method in methods:
        rows[method] = run_gpt_fast(args.peer, method, args.prompt, args.new, runs=args.repeats)
        print(f"gpt-fast {method}: {json.dumps(rows[method])}", flush=True)
    return rows


def print_gpu_table(rows: dict, peer: dict) -> None:
    print("| weights | GiB | b1 tok/s (with prefill) | b1 after 1st token | gpt-fast b1 (with / after 1st) "
          "| ours / gpt-fast (after 1st) | b8 tok/s | prefill tok/s | rel. err vs dequantized |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        g = peer.get(name, {})
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        both = f"{g['tok_s_with_prefill']:.1f} / {g['tok_s_decode_only']:.1f}" if "tok_s_decode_only" in g else g.get("error", "-")
        ratio = f"{r['decode_b1_decode_only'] / g['tok_s_decode_only']:.2f}x" if "tok_s_decode_only" in g else "-"
        print(f"| {name} | {r['weight_gib']:.2f} | {r['decode_b1']:.1f} | {r['decode_b1_decode_only']:.1f} | {both} "
              f"| {ratio} | {r['decode_b8']:.1f} | {r['prefill']:,.0f} | {r.get('rel_err_vs_dequantized', 0):.2e} |")


def empty_cache(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_tiles(device) -> bool:
    """Our tensor-op image of tinygemm's layout is torch's: pack both ways and unpack."""
    from mistral7b.quant import kernels

    ok = True
    for n, k in ((256, 4096), (4096, 14336), (64, 576)):
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
        theirs = kernels.pack_int4(q, device)
        ok &= torch.equal(theirs, kernels.pack_cuda_tiles_reference(q))
        ok &= torch.equal(kernels.unpack_int4(theirs, n, k), q)
    print(f"tile layout matches torch's _convert_weight_to_int4pack: {ok}", flush=True)
    return bool(ok)


def quantize_model(dense, config, method: str, device):
    """The dense model's weights streamed through the loader's quantizing path (a quantized copy)."""
    from mistral7b.loading import Checkpoint, assemble, canonical_views
    from mistral7b.quant import QuantConfig

    views = canonical_views(dense)
    checkpoint = Checkpoint(__import__("pathlib").Path(f"random-{method}"), config,
                            iter(views.items()), len(views))
    quant = QuantConfig("int8") if method == "int8" else QuantConfig("int4", 128)
    return assemble(checkpoint, device, torch.bfloat16, quant)


def error_vs_dequantized(model, dense, config) -> float:
    """Logits of the quantized model against the same model with its weights dequantized to bf16."""
    from mistral7b.quant.linear import QuantModule

    device = next(model.parameters()).device
    # fewer rows than CUDA_DEQUANT_ROWS, so the int4 kernel (not the dequantized-tile path) is checked
    tokens = torch.randint(0, config.vocab_size, (1, 16), device=device)
    saved = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantModule):
                target = dense.get_submodule(name).weight
                saved[name] = target.detach().clone()
                target.copy_(module.dequantize(target.dtype))
        want, got = dense(tokens), model(tokens)
        for name, w in saved.items():
            dense.get_submodule(name).weight.copy_(w)
    return ((got - want).norm() / want.norm()).item()


def weight_gib(model) -> float:
    from mistral7b.quant import resident_bytes

    return resident_bytes(model) / 2**30


def time_model(model, config, args) -> dict:
    from mistral7b.bench import decode_only_rate, random_prompts, run_requests
    from mistral7b.engine import Engine

    device = next(model.parameters()).device
    out = {"weight_gib": weight_gib(model)}
    for batch in (1, 8):
        engine = Engine(model, None, max_batch=batch, compile=device.type == "cuda",
                        max_seq_len=args.prompt + args.new + 64)
        prompts = random_prompts(batch, args.prompt, config.vocab_size)
        t0 = time.perf_counter()
        run_requests(engine, prompts, args.new)  # compile and record
        sync(device)
        # Progress as it happens: a run cut off by the device's time limit still shows how far it got.
        print(f"  b{batch}: warm-up (compile, record) {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        requests = run_requests(engine, prompts, args.new)
        sync(device)
        out[f"decode_b{batch}"] = batch * args.new / (time.perf_counter() - t0)
        out[f"decode_b{batch}_decode_only"] = decode_only_rate(requests)
        print(f"  b{batch}: {out[f'decode_b{batch}']:.1f} tok/s", flush=True)
        del engine
    tokens = torch.randint(0, config.vocab_size, (1, args.prefill), device=device)
    with torch.no_grad():
        model(tokens, last_only=True)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            model(tokens, last_only=True)
        sync(device)
    out["prefill"] = 3 * args.prefill / (time.perf_counter() - t0)
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the 7B shape on CUDA")
    p.add_argument("--small", action="store_true", help="with --gpu: a small shape, to check the path")
    p.add_argument("--device", default="cuda", help="with --gpu: run that path on another device (cpu, to test it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--methods", default="bf16,int8,int4", help="with --gpu: which weights to time")
    p.add_argument("--peer", default=None, metavar="DIR", help="with --gpu: gpt-fast's folder; its b1 decode per method, same run")
    p.add_argument("--rows-kernel", choices=("torch", "triton"), default=None,
                   help="with --gpu: CUDA int8/int4 kernels for few rows (MISTRAL7B_CUDA_ROWS_KERNEL)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.rows_kernel:  # every load from here on plans with it, in this process and the ones it starts
        os.environ["MISTRAL7B_CUDA_ROWS_KERNEL"] = args.rows_kernel
    results = gpu(args) if args.gpu else cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
