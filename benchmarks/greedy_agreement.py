"""Is a greedy disagreement a bug or rounding? gpu_check's check 1 at a small width, on any device.

The engine (batched chunked prefill, multi-step pipelined decode) generates greedily; the eager decode
path is then fed the same tokens one at a time and its argmax compared at every step. In float32 the
two must agree exactly: any disagreement is a bug. In bfloat16 a few near-tied steps flip, since the
engine's prefill chunks differ from the reference's one pass.

    python benchmarks/greedy_agreement.py --dtype float32     # expect 1000/1000
    python benchmarks/greedy_agreement.py --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

from gpu_check import random_model, teacher_forced_flips
from mistral7b.config import ModelConfig
from mistral7b.engine import Engine
from mistral7b.sampling import SamplingParams


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=250)
    args = p.parse_args()
    torch.manual_seed(0)
    w = args.window
    config = ModelConfig(dim=512, n_layers=4, head_dim=64, hidden_dim=1024, n_heads=8, n_kv_heads=2, vocab_size=1000,
                         sliding_window=w, max_seq_len=8 * w)
    model = random_model(config, args.device, getattr(torch, args.dtype))
    lengths = [17, 130, 40 + 700 * w // 4096, 5000 * w // 4096]  # gpu_check's 17/130/700/5000 at W=4096
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in lengths]
    engine = Engine(model, None, max_batch=4, decode_steps=8, pipeline=True)
    requests = [engine.add(q, SamplingParams(max_tokens=args.tokens, ignore_eos=True)) for q in prompts]
    while not all(r.finished for r in requests):
        engine.step()
    agree = total = 0
    for q, r, flips in zip(prompts, requests, teacher_forced_flips(model, prompts, requests, args.device)):
        print(f"prompt {len(q):5d}: {len(flips)} of {len(r.output_ids)} steps disagree {flips[:8]}")
        agree += len(r.output_ids) - len(flips)
        total += len(r.output_ids)
    print(f"{args.dtype} on {args.device}, W={w}: {agree}/{total} agree")
    return 0 if args.dtype != "float32" or agree == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
