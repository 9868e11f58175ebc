"""The 2-core CPU target against llama.cpp: the default model, 128 new greedy tokens, 2 threads, one run.

Ours (`LLM`: load time, time to the first token, decode tok/s) in this process, and llama.cpp
(llama-cpp-python 0.3.36) on the same GGUF file in a subprocess under `--peer-python`, the python of
a separate venv that built it:

    python3 -m venv .peer-venv && CMAKE_BUILD_PARALLEL_LEVEL=1 .peer-venv/bin/pip install llama-cpp-python==0.3.36
    python benchmarks/cpu_peer.py --peer-python .peer-venv/bin/python
    python benchmarks/cpu_peer.py --peer-python .peer-venv/bin/python --ours none:float32,int4:bfloat16

Both read the same prompt token ids (our tokenizer's). Decode tok/s = (tokens - 1) / (time of the last
token - time of the first), the median over `--runs`; load is the model's construction, imports excluded.
`--ours` lists `QUANTIZE:DTYPE` pairs (QUANTIZE `none` is the GGUF as this build loads it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def run_ours(path: Path, quantize: str, dtype: str, prompt: list[int], args) -> dict:
    from mistral7b import LLM, SamplingParams

    kwargs = {}
    if quantize != "none":
        if "quantize" not in inspect.signature(LLM).parameters:
            return {"skipped": "this build's LLM takes no quantize="}
        kwargs["quantize"] = quantize
    t0 = time.perf_counter()
    llm = LLM(path, device="cpu", dtype=dtype, max_batch=1, **kwargs)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    runs = []
    for _ in range(args.runs + 1):  # the first run warms up
        request = llm.engine.add(prompt, params)
        while not request.finished:
            llm.engine.step()
        n = len(request.output_ids)
        runs.append({"tokens": list(request.output_ids),
                     "first_token_s": request.first_token_time - request.arrival_time,
                     "decode_tok_s": (n - 1) / (request.finish_time - request.first_token_time)})
    return summarize(runs[1:], load_s)


def run_peer(path: Path, prompt: list[int], args) -> dict:
    worker = Path(__file__).with_name("llama_cpp_worker.py")
    request = {"task": "generate", "model": str(path), "threads": args.threads,
               "prompts": [prompt] * (args.runs + 1), "new_tokens": args.new_tokens}
    out = subprocess.run([args.peer_python, str(worker)], input=json.dumps(request), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"llama.cpp worker failed:\n{out.stderr[-2000:]}")
    peer = json.loads(out.stdout)
    result = summarize(peer["runs"][1:], peer["load_s"])
    result["version"] = peer["version"]
    return result


def summarize(runs: list[dict], load_s: float) -> dict:
    return {
        "load_s": load_s,
        "first_token_s": statistics.median(r["first_token_s"] for r in runs),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
        "tokens": runs[0]["tokens"],
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def print_table(rows: dict, peer: dict | None, args) -> None:
    print(f"\n{platform.processor() or platform.machine()} | {args.threads} threads | torch {torch.__version__} | "
          f"{args.new_tokens} new greedy tokens | median of {args.runs} | load average {args.load_before} before, "
          f"{os.getloadavg()[0]:.1f} after (other jobs on the machine skew both engines)")
    print("| engine | load s | first token s | decode tok/s | decode vs llama.cpp | same tokens as llama.cpp |")
    print("|---|---|---|---|---|---|")
    if peer:
        print(f"| llama.cpp (llama-cpp-python {peer['version']}) | {peer['load_s']:.2f} | {peer['first_token_s']:.3f} | "
              f"{peer['decode_tok_s']:.1f} | 1.00x | - |")
    for name, r in rows.items():
        if "skipped" in r:
            print(f"| ours {name} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = f"{r['decode_tok_s'] / peer['decode_tok_s']:.2f}x" if peer else "-"
        same = f"{common_prefix(r['tokens'], peer['tokens'])}/{len(peer['tokens'])} prefix" if peer else "-"
        print(f"| ours {name} | {r['load_s']:.2f} | {r['first_token_s']:.3f} | {r['decode_tok_s']:.1f} | {ratio} | {same} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the bundled model)")
    p.add_argument("--peer-python", default=None, help="python of the venv with llama-cpp-python (omit: ours only)")
    p.add_argument("--ours", default="none:float32", help="QUANTIZE:DTYPE pairs, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from mistral7b import Tokenizer
    from mistral7b.default_model import default_model_path

    torch.set_num_threads(args.threads)
    args.load_before = f"{os.getloadavg()[0]:.1f}"
    path = args.model or default_model_path()
    prompt = Tokenizer.from_source(path).encode(PROMPT, bos=True)
    peer = run_peer(path, prompt, args) if args.peer_python else None
    rows = {}
    for pair in args.ours.split(","):
        quantize, _, dtype = pair.partition(":")
        rows[pair] = run_ours(path, quantize, dtype or "float32", prompt, args)
    print_table(rows, peer, args)
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": str(path), "threads": args.threads,
                                         "torch": torch.__version__, "load_average_before": args.load_before,
                                         "load_average_after": os.getloadavg()[0], "llama_cpp": peer, "ours": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
