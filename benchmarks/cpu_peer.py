"""CPU decode against llama.cpp in the same run: same GGUF, same prompt token ids, same threads, greedy.

Each run is a fresh process, and runs alternate between the engines (ours, llama.cpp, ours, ...) for
`--rounds` rounds, so a change in the machine's load falls on both. Every process loads the model,
generates `--warmup-tokens` untimed, then `--new-tokens` timed. It reports decode tok/s ((n - 1) /
(last token time - first)), the timed run's time to first token, load time, process start (spawn) to
the first token it makes (the warm-up's), and its peak RSS (VmHWM). The table prints each run with the
load average before it; per engine min/median/max decode tok/s; ours / llama.cpp (medians); how many
greedy tokens agree (common prefix); and the machine's ceiling, memory copy bandwidth / weight bytes
read per token. "Other cores busy" is what the rest of the machine did during each run (all CPU time
less the run's own, per second of the run): above ~0.1 the run was not alone.

Shapes (`--shape`): `default` (the bundled model), `1b` (TinyLlama's shape: dim 2048, 22 layers) and
`7b` (Mistral-7B's: dim 4096, 32 layers, ~3.8 GB): Q4_0 GGUFs with random weights that
benchmarks/bench_gguf.py writes once into ~/.cache/mistral7b/bench/. Random weights make random text:
the agreement only says whether both engines compute the same greedy path.

The peer is llama-cpp-python 0.3.36 in its own venv (building it from source takes ~10 minutes on 2
cores; here it was built once into a wheel under the git-ignored .peer/):

    CMAKE_BUILD_PARALLEL_LEVEL=2 pip wheel --no-deps llama-cpp-python==0.3.36 -w .peer/cpu  # native build
    python3 -m venv .peer/venv && .peer/venv/bin/pip install .peer/cpu/llama_cpp_python-0.3.36-*.whl

(the wheel's dependencies, numpy, typing-extensions, diskcache and jinja2, come from the pip index).
`--peer-python` defaults to that venv's python.

Its AMX weight repack segfaults on the 2-core AVX-512/AMX machine, so llama_cpp_worker.py loads with
`use_extra_bufts = False` and `n_threads_batch = n_threads`; the table says so. Ours runs
benchmarks/ours_worker.py under this python with this checkout's src/ first on PYTHONPATH and the
environment passed through (MISTRAL7B_INT8_ACTIVATIONS picks the activation path; the table prints
which ran). The final measurement, on a quiet machine:

    for t in 1 2; do for s in default 1b 7b; do
      .venv/bin/python benchmarks/cpu_peer.py --shape $s --threads $t --json cpu_peer_${s}_${t}t.json
    done; done
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"  # this checkout's mistral7b, for this process and ours_worker.py
sys.path[:0] = [str(HERE), str(SRC)]
import bench_gguf  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
ENGINES = ("ours", "llama.cpp")
CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def cpu_summary() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "cpus": os.cpu_count()}


def copy_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Memory copy bandwidth in GB/s (bytes read + bytes written, STREAM's convention), best of `repeats`."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def worker_command(engine: str, args) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if engine == "ours":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
        return [sys.executable, str(HERE / "ours_worker.py")], env
    return [str(args.peer_python), str(HERE / "llama_cpp_worker.py")], env


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (/proc/stat: all but idle and iowait), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spawn(engine: str, round_: int, path: Path, prompt: list[int], args) -> dict:
    """One process of `engine`: its figures, with the load average just before the spawn and the cores
    that other processes kept busy while it ran (machine busy time less its own CPU time, per second)."""
    request = {"task": "generate", "model": str(path), "threads": args.threads, "dtype": args.dtype,
               "prompts": [prompt], "new_tokens": args.new_tokens, "warmup_tokens": args.warmup_tokens}
    if engine == "ours":
        request["batch"] = args.batch  # llama.cpp runs the prompts one after another: its b1 figure
        request["compile"] = args.compile  # compiled in the warm-up (untimed), as `serve --compile` before it listens
    command, env = worker_command(engine, args)
    load_before = os.getloadavg()
    busy, own = busy_cpu_seconds(), children_cpu_seconds()
    spawned = time.monotonic()
    out = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True, env=env)
    wall_s = time.monotonic() - spawned
    busy_after = busy_cpu_seconds()
    others = None if busy is None else max(0.0, (busy_after - busy) - (children_cpu_seconds() - own)) / wall_s
    if out.returncode:
        raise SystemExit(f"{engine} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    run = result["runs"][0]
    return {"engine": engine, "round": round_, "load_average_before": list(load_before), "other_cores_busy": others,
            "decode_tok_s": run["decode_tok_s"], "first_token_s": run["first_token_s"],
            "load_s": result["load_s"], "start_to_first_token_s": result["first_token_at"] - spawned,
            "start_to_import_s": result["started_at"] - spawned, "peak_rss_bytes": result["peak_rss_bytes"],
            "process_wall_s": wall_s, "tokens": run["tokens"], "version": result["version"],
            "settings": result["settings"]}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def summarize(runs: list[dict]) -> dict:
    """Per engine: decode tok/s min/median/max and the other figures' medians; then ours / llama.cpp and
    the greedy agreement of each round."""
    engines = {}
    for engine in ENGINES:
        mine = [r for r in runs if r["engine"] == engine]
        if not mine:
            continue
        decode = [r["decode_tok_s"] for r in mine]
        engines[engine] = {
            "decode_tok_s": {"min": min(decode), "median": statistics.median(decode), "max": max(decode)},
            **{k: statistics.median(r[k] for r in mine)
               for k in ("first_token_s", "load_s", "start_to_first_token_s", "peak_rss_bytes")},
            "same_tokens_every_round": all(r["tokens"] == mine[0]["tokens"] for r in mine),
            "version": mine[0]["version"], "settings": mine[0]["settings"],
        }
    summary = {"engines": engines}
    if len(engines) == 2:
        summary["ours_over_llama_cpp"] = (engines["ours"]["decode_tok_s"]["median"]
                                          / engines["llama.cpp"]["decode_tok_s"]["median"])
        rounds = sorted({r["round"] for r in runs})
        by = {(r["engine"], r["round"]): r["tokens"] for r in runs}
        summary["agreement"] = [common_prefix(by["ours", i], by["llama.cpp", i]) for i in rounds]
    return summary


def print_table(meta: dict, runs: list[dict], summary: dict) -> None:
    engines = summary["engines"]
    peer = engines.get("llama.cpp")
    cpu = meta["cpu"]
    print(f"\n{meta['date']} | {cpu['model']} ({cpu['cpus']} CPUs; {' '.join(cpu['flags'])}) | "
          f"{meta['threads']} threads | torch {meta['torch']}")
    print(f"model {meta['model']} ({meta['shape']}, {meta['file_bytes'] / 1e6:.0f} MB) | "
          f"prompt {meta['prompt_tokens']} tokens | {meta['new_tokens']} new greedy tokens | "
          f"{meta['rounds']} rounds alternating {', '.join(ENGINES)} | a process per run, "
          f"{meta['warmup_tokens']} warm-up tokens untimed")
    batch = meta.get("ours_batch", 1)
    rows = f"; batch {batch}: total tok/s of {batch} rows, llama.cpp one at a time" if batch > 1 else ""
    print(f"ours: {engines['ours']['settings'] if 'ours' in engines else '-'}{rows}")
    if peer:
        print(f"llama.cpp: llama-cpp-python {peer['version']}, {peer['settings']}")
    print(f"ceiling: memory copy {meta['copy_gb_s']:.1f} GB/s / {meta['weight_bytes_per_token'] / 1e6:.1f} MB of "
          f"weights per token = {meta['ceiling_tok_s']:.1f} tok/s")
    print("\n| round | engine | load avg before (1/5/15 min) | other cores busy during | decode tok/s | "
          "first token s | load s | start to first token s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        load = "/".join(f"{x:.2f}" for x in r["load_average_before"])
        others = "-" if r["other_cores_busy"] is None else f"{r['other_cores_busy']:.2f}"
        print(f"| {r['round']} | {r['engine']} | {load} | {others} | {r['decode_tok_s']:.1f} | "
              f"{r['first_token_s']:.3f} | {r['load_s']:.2f} | {r['start_to_first_token_s']:.2f} | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} |")
    print("\n| engine | decode tok/s min / median / max | of ceiling | first token s | load s | "
          "start to first token s | peak RSS MB | same tokens every round |")
    print("|---|---|---|---|---|---|---|---|")
    for name, e in engines.items():
        d = e["decode_tok_s"]
        print(f"| {name} | {d['min']:.1f} / {d['median']:.1f} / {d['max']:.1f} | "
              f"{d['median'] / meta['ceiling_tok_s']:.0%} | {e['first_token_s']:.3f} | {e['load_s']:.2f} | "
              f"{e['start_to_first_token_s']:.2f} | {e['peak_rss_bytes'] / 2**20:.0f} | "
              f"{e['same_tokens_every_round']} |")
    if "ours_over_llama_cpp" in summary:
        agree = ", ".join(f"{n}/{meta['new_tokens']}" for n in summary["agreement"])
        print(f"\nours / llama.cpp, median decode: {summary['ours_over_llama_cpp']:.2f}x | greedy tokens in common "
              f"(prefix) per round: {agree}")


def model_path(args) -> Path:
    if args.model:
        return args.model
    if args.shape == "default":
        from mistral7b.default_model import default_model_path

        return Path(default_model_path())
    return bench_gguf.ensure(args.shape)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("default", "1b", "7b"), default="default")
    p.add_argument("--model", type=Path, default=None, help="a GGUF file instead of --shape")
    p.add_argument("--peer-python", default=str(HERE.parent / ".peer" / "venv" / "bin" / "python"),
                   help="python of the venv with llama-cpp-python; 'none': ours only")
    p.add_argument("--dtype", default="float32", help="our LLM's dtype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16, help="untimed tokens each process generates first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=1,
                   help="ours decodes this many copies of the prompt together (total tok/s); llama.cpp one at a time")
    p.add_argument("--compile", action="store_true", help="ours with compile=True (Inductor on a CPU)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.peer_python != "none" and not Path(args.peer_python).is_file():
        raise SystemExit(f"no llama-cpp-python venv at {args.peer_python} (see --help), or --peer-python none")
    from mistral7b import Tokenizer

    path = model_path(args)
    prompt = Tokenizer.from_source(path).encode(PROMPT, bos=True)
    engines = ENGINES if args.peer_python != "none" else ENGINES[:1]
    copy_gb_s = copy_bandwidth(args.threads)
    per_token = bench_gguf.weight_bytes_per_token(path)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpu": cpu_summary(),
            "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "model": str(path), "ours_batch": args.batch,
            "shape": args.model and "--model" or args.shape, "file_bytes": path.stat().st_size,
            "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "warmup_tokens": args.warmup_tokens,
            "rounds": args.rounds, "dtype": args.dtype, "copy_gb_s": copy_gb_s, "weight_bytes_per_token": per_token,
            "ceiling_tok_s": copy_gb_s * 1e9 / per_token,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("MISTRAL7B_", "OMP_"))}}
    runs = []
    for round_ in range(1, args.rounds + 1):
        for engine in engines:
            runs.append(spawn(engine, round_, path, prompt, args))
            r = runs[-1]
            print(f"round {round_} {engine}: {r['decode_tok_s']:.1f} tok/s (load average before "
                  f"{r['load_average_before'][0]:.2f})", file=sys.stderr, flush=True)
    summary = summarize(runs)
    print_table(meta, runs, summary)
    if args.json:
        peer = summary["engines"].get("llama.cpp")
        meta["llama_cpp_python"] = peer and peer["version"]
        args.json.write_text(json.dumps({**meta, "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
