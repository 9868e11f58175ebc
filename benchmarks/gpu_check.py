"""GPU correctness checks (CI has no GPU): run on the device machine before trusting a benchmark.

1. Greedy tokens of the compiled engine agree with the eager bf16 decode path (teacher-forced) on >= 99% of 1000 tokens.
2. Compiled bf16 decode logits against an fp32 eager reference: relative error below 1e-2.
3. FlexAttention's block-sparse windowed prefill equals the dense masked reference, rolling slot order included.
4. Poisoned cache: after a prefill every slot that must be written is finite and holds the right position.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mistral7b.attention import _block_mask, _compiled_flex, sdpa_attention
from mistral7b.config import preset
from mistral7b.engine import Engine
from mistral7b.loading import Checkpoint, assemble, canonical_names
from mistral7b.sampling import SamplingParams


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_model(config, device, dtype, seed=0):
    """Random weights; the output head is scaled up so greedy choices are not coin flips."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "tok_embeddings": (config.vocab_size, config.dim), "output": (config.vocab_size, config.dim),
        "wq": (config.n_heads * config.head_dim, config.dim), "wk": (config.n_kv_heads * config.head_dim, config.dim),
        "wv": (config.n_kv_heads * config.head_dim, config.dim), "wo": (config.dim, config.n_heads * config.head_dim),
        "w1": (config.hidden_dim, config.dim), "w3": (config.hidden_dim, config.dim), "w2": (config.dim, config.hidden_dim),
    }

    def tensors():
        for name in canonical_names(config):
            key = name.split(".")[-2]
            if key.endswith("norm"):
                yield name, 1 + 0.1 * torch.randn(config.dim, generator=g)
            else:
                std = 1.0 if key in ("tok_embeddings", "output") else shapes[key][1] ** -0.5
                yield name, torch.randn(shapes[key], generator=g) * std

    return assemble(Checkpoint(__import__("pathlib").Path("random"), config, tensors(), 0), device, dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4, help="layers of the 7B shape to build (speed)")
    args = parser.parse_args()
    device = "cuda"
    config = preset("mistral-7b-v0.1").with_(n_layers=args.layers)
    failures = []

    def check(name, ok, detail):
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    ref_model = random_model(config, device, torch.float32)
    model = random_model(config, device, torch.bfloat16)

    engine = Engine(model, None, max_batch=4, compile=True)
    # 1. greedy agreement, teacher-forced: 4 prompts x 250 tokens from the compiled engine.
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in (17, 130, 700, 5000)]
    requests = [engine.add(p, SamplingParams(max_tokens=250, ignore_eos=True)) for p in prompts]
    while not all(r.finished for r in requests):
        engine.step()
    # Teacher-forced: the eager decode path is fed the compiled engine's tokens one at a time.
    eager = Engine(model, None, max_batch=1)
    agree = total = 0
    with torch.no_grad():
        for p, r in zip(prompts, requests):
            eager.cache.reset()
            logits = model(torch.tensor([p], device=device), torch.arange(len(p), device=device)[None],
                           eager.cache, rows=slice(0, 1), kv_len=len(p), last_only=True)[0, -1]
            predicted = [int(logits.argmax())]
            for j, token in enumerate(r.output_ids[:-1]):
                pos = len(p) + j
                logits = model(torch.tensor([[token]], device=device), torch.tensor([[pos]], device=device),
                               eager.cache, rows=slice(0, 1), kv_len=pos + 1)[0, -1]
                predicted.append(int(logits.argmax()))
            agree += sum(a == b for a, b in zip(predicted, r.output_ids))
            total += len(r.output_ids)
    check("compiled greedy == eager argmax", agree / total >= 0.99, f"{agree}/{total} = {agree / total:.4f}")

    # 2. compiled bf16 decode logits vs fp32 eager: prefill row 0 eagerly, then one compiled decode step.
    seq = torch.randint(0, config.vocab_size, (301,)).tolist()
    engine.cache.reset()
    with torch.no_grad():
        ref = ref_model(torch.tensor([seq], device=device))[0, -1]
        model(torch.tensor([seq[:-1]], device=device), torch.arange(len(seq) - 1, device=device)[None],
              engine.cache, rows=slice(0, 1), kv_len=len(seq) - 1)
        tokens = torch.tensor([[seq[-1]]], device=device)
        positions = torch.tensor([[len(seq) - 1]], device=device)
        got = engine._decode_fn(tokens, positions, engine._kv_len(len(seq)))[0, -1]
    err = rel(got, ref)
    check("compiled bf16 decode vs fp32 eager", err < 1e-2, f"relative error {err:.2e}")

    # 3. flex block-sparse window == dense masked reference, with a rolling buffer's slot order.
    torch.manual_seed(1)
    for t_q, n_cached, window in ((4096, 4096, 4096), (6000, 0, 2048), (3000, 1000, 1024)):
        h, kv, hd = config.n_heads, config.n_kv_heads, config.head_dim
        q = torch.randn(1, h, t_q, hd, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, kv, n_cached + t_q, hd, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        start = 5 * window + 17
        cached = torch.arange(start - n_cached, start, device=device)
        cached = cached[torch.randperm(n_cached, device=device)]  # slot order of a rolling buffer
        q_pos = torch.arange(start, start + t_q, device=device)[None]
        k_pos = torch.cat([cached, q_pos[0]])[None]
        out = _compiled_flex()(q, k, v, block_mask=_block_mask(q_pos, k_pos, window), enable_gqa=True)
        dense = sdpa_attention(q.float(), k.float(), v.float(), q_pos, k_pos, window)
        err = rel(out, dense)
        check(f"flex window == dense (T={t_q}, cached={n_cached}, W={window})", err < 1e-2, f"relative error {err:.2e}")

    # 4. poisoned cache: every slot the prefill must write is written.
    poison = Engine(model, None, max_batch=2)
    for layer in poison.cache.layers:
        layer.k.fill_(float("nan"))
        layer.v.fill_(float("nan"))
    n = 4096 + 1234
    r = poison.add(torch.randint(0, config.vocab_size, (n,)).tolist(), SamplingParams(max_tokens=1, ignore_eos=True))
    while not r.finished:
        poison.step()
    expected = torch.arange(n - 4096, n, device=device)
    ok = all(
        torch.isfinite(layer.k[0]).all().item() and torch.isfinite(layer.v[0]).all().item()
        and torch.equal(layer.pos[0].sort().values, expected)
        for layer in poison.cache.layers
    )
    check("poisoned cache fully written with positions n-W..n-1", ok, f"{len(poison.cache.layers)} layers")

    print(f"\n{len(failures)} failed" if failures else "\nall GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
