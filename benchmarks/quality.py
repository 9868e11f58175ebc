"""Quality of the weight formats: perplexity on the shipped text and greedy agreement with the dequantized model.

For the default model (SmolLM2-135M-Instruct Q4_1 GGUF) on `tests/data/licenses.txt` (27,473 tokens),
windows of `--context` tokens every `--stride` (default: disjoint chunks of 512), each variant against
the reference, the GGUF dequantized to `--reference-dtype` (today's load path):

* `gguf`: the GGUF's own blocks run quantized (no flag); `int8`: int8 per channel of the dequantized
  weights; `int4`: int4 in groups of 128 (a ceiling: each matrix whose width 128 does not divide takes
  the largest size that does, so SmolLM2's 576-wide matrices run g64 and its 1536-wide w2 g128);
  `int4-gN` asks for groups of N; a `-nohead` suffix (`int4-nohead`, `int4-g64-nohead`) keeps the
  output head in the activation dtype. These need `mistral7b.quant` and are skipped without it.
* `llama.cpp` (with `--peer-python`, the python of a venv holding llama-cpp-python): the same windows
  of the same token ids, scored by llama.cpp (which also quantizes activations).

Per variant: perplexity and its change against the reference; teacher-forced greedy agreement (the
argmax at every scored position equals the reference's); free-running greedy agreement on a few chat
prompts (tokens equal to the reference's, and the length of the common prefix).

    python benchmarks/quality.py                          # CPU, fp32, every variant this build has
    python benchmarks/quality.py --peer-python .peer-venv/bin/python --json quality.json
    python benchmarks/quality.py --device cuda --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import time
from pathlib import Path

import torch

from mistral7b import ModelLoadError, Tokenizer
from mistral7b.default_model import default_model_path
from mistral7b.engine import Engine
from mistral7b.evaluate import perplexity, strided_windows
from mistral7b.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one paragraph what a software license is.",
    "List three uses of copper.",
]
VARIANTS = ("gguf", "int8", "int4")


def has_quant() -> bool:
    return importlib.util.find_spec("mistral7b.quant") is not None


def load(variant: str, path: Path, device: str, dtype: torch.dtype):
    """The model of one variant; "dequantized" works on every build (the GGUF expanded to `dtype`)."""
    from mistral7b.loading import load_model

    if variant == "dequantized":
        if has_quant():
            return load_model(path, device, dtype, quantize="none")
        return load_model(path, device, dtype)  # before mistral7b.quant, every GGUF loads dequantized
    if variant == "gguf":
        return load_model(path, device, dtype)
    from mistral7b.quant import resolve

    spec = variant.removesuffix("-nohead")
    method, _, group = spec.partition("-g")
    return load_model(path, device, dtype,
                      quantize=resolve(method, int(group) if group else None, quantize_head=spec == variant))


def greedy(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    engine = Engine(model, tokenizer, max_batch=len(prompts))
    params = SamplingParams(max_tokens=new_tokens)  # answers end at EOS, as a user would see them
    requests = [engine.add(p, params) for p in prompts]
    while not all(r.finished for r in requests):
        engine.step()
    return [list(r.output_ids) for r in requests]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare(name: str, result: dict, reference: dict) -> dict:
    """Add the changes against the reference to a variant's figures."""
    result["variant"] = name
    result["ppl_change"] = result["ppl"] / reference["ppl"] - 1
    result["teacher_forced_agreement"] = float((result.pop("predictions") == reference["predictions"]).double().mean())
    if "greedy" in result:
        pairs = list(zip(result["greedy"], reference["greedy"]))
        result["greedy_equal_tokens"] = sum(sum(x == y for x, y in zip(a, b)) for a, b in pairs)  # position by position
        result["greedy_tokens"] = sum(len(b) for _, b in pairs)
        result["greedy_common_prefix"] = [common_prefix(a, b) for a, b in pairs]
    return result


def score(model, ids, args) -> dict:
    r = perplexity(model, ids, context=args.context, stride=args.stride, batch_size=args.batch_size, keep_tokens=True)
    return {"ppl": r.ppl, "n_tokens": r.n_tokens, "seconds": r.seconds, "predictions": r.predictions}


def run_variant(name, args, path, tokenizer, ids, prompts) -> dict:
    dtype = getattr(torch, args.reference_dtype if name == "dequantized" else args.dtype)
    t0 = time.perf_counter()
    model = load(name, path, args.device, dtype)
    load_s = time.perf_counter() - t0
    result = score(model, ids, args)
    result["greedy"] = greedy(model, tokenizer, prompts, args.new_tokens)
    result.update(load_s=load_s, dtype=str(dtype).removeprefix("torch."))
    if name != "dequantized":
        from mistral7b.quant import weight_format

        result["weights"] = weight_format(model)
    print(f"{name}: perplexity {result['ppl']:.4f} over {result['n_tokens']} tokens in {result['seconds']:.1f} s", flush=True)
    return result


def run_peer(args, path: Path, ids: torch.Tensor) -> dict:
    """llama.cpp's NLL on exactly our windows, in a subprocess under the peer venv."""
    windows = strided_windows(ids.numel(), args.context, args.stride or args.context)
    request = {"task": "perplexity", "model": str(path), "threads": args.threads, "ids": ids.tolist(),
               "windows": [[w.start, w.end, w.score_from] for w in windows]}
    worker = Path(__file__).with_name("llama_cpp_worker.py")
    out = subprocess.run([args.peer_python, str(worker)], input=json.dumps(request), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"llama.cpp worker failed:\n{out.stderr[-2000:]}")
    peer = json.loads(out.stdout)
    result = {"ppl": math.exp(peer["nll_sum"] / peer["n_tokens"]), "n_tokens": peer["n_tokens"],
              "seconds": peer["seconds"], "predictions": torch.tensor(peer["predictions"]),
              "dtype": f"llama-cpp-python {peer['version']}"}
    print(f"llama.cpp: perplexity {result['ppl']:.4f} over {result['n_tokens']} tokens in {result['seconds']:.1f} s",
          flush=True)
    return result


def print_table(rows: list[dict], reference: dict) -> None:
    print(f"\n| variant | activations | perplexity | change | teacher-forced argmax agreement | "
          f"free greedy equal tokens | common prefixes |\n|---|---|---|---|---|---|---|")
    print(f"| dequantized (reference) | {reference['dtype']} | {reference['ppl']:.4f} | - | - | - | - |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | - | failed: {r['error']} | | | | |")
            continue
        greedy_cell = f"{r['greedy_equal_tokens']}/{r['greedy_tokens']}" if "greedy_tokens" in r else "-"
        prefixes = ", ".join(map(str, r.get("greedy_common_prefix", []))) or "-"
        print(f"| {r['variant']} | {r['dtype']} | {r['ppl']:.4f} | {100 * r['ppl_change']:+.3f}% | "
              f"{100 * r['teacher_forced_agreement']:.2f}% | {greedy_cell} | {prefixes} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the bundled model)")
    p.add_argument("--text", type=Path, default=ROOT / "tests" / "data" / "licenses.txt")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="default: the context (disjoint chunks)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="of gguf, int8, int4 (groups of at most 128), int4-g32..., any with -nohead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="activations of the quantized variants")
    p.add_argument("--reference-dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32, help="free-running greedy tokens per prompt")
    p.add_argument("--peer-python", default=None, help="python of a venv with llama-cpp-python: score llama.cpp too")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    tokenizer = Tokenizer.from_source(path)
    ids = torch.tensor(tokenizer.encode(args.text.read_text(), bos=True))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in PROMPTS]
    reference = run_variant("dequantized", args, path, tokenizer, ids, prompts)
    variants = [v for v in args.variants.split(",") if v]
    if variants and not has_quant():
        print(f"mistral7b.quant is not in this build: skipping {', '.join(variants)}")
        variants = []
    rows = []
    for v in variants:
        try:
            rows.append(compare(v, run_variant(v, args, path, tokenizer, ids, prompts), reference))
        except (ValueError, ModelLoadError) as e:
            print(f"{v}: cannot run ({e})")
            rows.append({"variant": v, "error": str(e)})
    if args.peer_python:
        rows.append(compare("llama.cpp", run_peer(args, path, ids), reference))
    reference.pop("predictions")
    print_table(rows, reference)
    if args.json:
        record = {"date": time.strftime("%Y-%m-%d"), "model": str(path), "text": str(args.text),
                  "context": args.context, "stride": args.stride or args.context, "torch": torch.__version__,
                  "threads": args.threads, "device": args.device, "reference": reference, "variants": rows}
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
