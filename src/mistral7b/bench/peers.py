"""Peers for `mistral7b bench`: gpt-fast's own model.py and generate.py, from a folder the user fetched.

gpt-fast sets inductor flags globally when its generate.py is imported and its compiled decode keeps
CUDA-graph pools alive, so it runs in a child process (`python -m mistral7b.bench.peers`) that prints
one JSON line. Weights are random at gpt-fast's "Mistral-7B" shape, as ours are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEER_FILES = ("model.py", "generate.py", "quantize.py", "tokenizer.py")


def check_gpt_fast_dir(directory: Path) -> Path:
    directory = Path(directory).expanduser().resolve()
    missing = [f for f in PEER_FILES if not (directory / f).is_file()]
    if missing:
        raise ValueError(f"{directory}: not a gpt-fast folder (missing {', '.join(missing)})")
    return directory


def run_gpt_fast(directory: Path, weights: str, prompt_len: int, new_tokens: int, batch: int = 1,
                 runs: int = 3, timeout: float = 1200, group_size: int = 128) -> dict:
    """Run gpt-fast in a child process; returns its figures, or {"error": ...} if it failed.
    `group_size`: of int4 weights (gpt-fast's WeightOnlyInt4QuantHandler takes 32, 64, 128 or 256)."""
    directory = check_gpt_fast_dir(directory)
    cmd = [sys.executable, "-m", "mistral7b.bench.peers", str(directory), "--weights", weights,
           "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--batch", str(batch), "--runs", str(runs),
           "--group-size", str(group_size)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"error": f"gpt-fast {weights} timed out after {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"gpt-fast {weights} failed: {tail[0][:300]}"}
    return json.loads(lines[-1])


def _random_gpt_fast_model(gf_model, weights: str, device: str, group_size: int = 128):
    import torch

    with torch.device("meta"):
        model = gf_model.Transformer.from_name("Mistral-7B")
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    if weights == "int8":
        import quantize  # gpt-fast's

        handler = quantize.WeightOnlyInt8QuantHandler(model)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime()
        model.load_state_dict(state, assign=True)
        model = model.to(device)
    elif weights == "int4":
        import quantize  # gpt-fast's

        quantize.prepare_int4_weight_and_scales_and_zeros = _prepare_int4_for_current_torch(quantize)
        handler = quantize.WeightOnlyInt4QuantHandler(model, groupsize=group_size)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime()
        model.load_state_dict(state, assign=True)
        model = model.to(device)
    elif weights != "bf16":
        raise ValueError(f"gpt-fast peer weights must be bf16, int8 or int4, not {weights!r}")
    return model.eval()


def _prepare_int4_for_current_torch(quantize):
    """gpt-fast packs int32 [N, K] codes; torch >= 2.5's `_convert_weight_to_int4pack` takes uint8
    [N, K/2] with two codes a byte (high nibble first). Same quantization, the packing torch wants now."""
    import torch

    def prepare(weight_bf16, groupsize, inner_k_tiles):
        codes, scales_and_zeros = quantize.group_quantize_tensor(weight_bf16, n_bit=4, groupsize=groupsize)
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles), scales_and_zeros

    return prepare


def _child(args) -> dict:
    import torch

    sys.path.insert(0, str(args.directory))
    import generate as gf  # gpt-fast's generate.py
    import model as gf_model

    device = "cuda"
    model = _random_gpt_fast_model(gf_model, args.weights, device, args.group_size)
    gf.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, 32000, (args.prompt_len,), device=device, dtype=torch.int)

    def generate(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gf.generate(model, prompt, n, batch_size=args.batch, draft_model=None, speculate_k=0,
                    interactive=False, callback=lambda x: x, temperature=0.8, top_k=200)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    compile_s = generate(args.new_tokens)
    totals, firsts = [], []
    for _ in range(args.runs):
        totals.append(generate(args.new_tokens))
        # cache set-up, prefill, first token and one decode step (gpt-fast's generate needs >= 2)
        firsts.append(generate(2))
    total, first = statistics.median(totals), statistics.median(firsts)
    return {
        "peer": "gpt-fast", "weights": args.weights if args.weights != "int4" else f"int4 g{args.group_size}",
        "batch": args.batch, "compile_s": compile_s,
        "tok_s_with_prefill": args.batch * args.new_tokens / total,
        "tok_s_decode_only": args.batch * (args.new_tokens - 2) / max(total - first, 1e-9),
        "weights_gib": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("directory", type=Path)
    p.add_argument("--weights", default="bf16", choices=["bf16", "int8", "int4"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256), help="int4 groups")
    args = p.parse_args(argv)
    args.directory = check_gpt_fast_dir(args.directory)
    print(json.dumps(_child(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
