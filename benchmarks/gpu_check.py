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


@torch.no_grad()
def teacher_forced_flips(model, prompts, requests, device) -> list[list[int]]:
    """Feed each request's generated tokens one at a time through the eager decode path (own cache,
    one pass over the prompt) and return, per request, the steps where its argmax differs."""
    reference = Engine(model, None, max_batch=1)
    flips = []
    for prompt, request in zip(prompts, requests):
        reference.cache.reset()
        n = len(prompt)
        tokens = torch.tensor([prompt + request.output_ids[:-1]], device=device)
        logits = model(tokens[:, :n], torch.arange(n, device=device)[None], reference.cache, rows=slice(0, 1),
                       kv_len=n, last_only=True)[0, -1]
        predicted = [int(logits.argmax())]
        for pos in range(n, tokens.shape[1]):
            logits = model(tokens[:, pos : pos + 1], torch.tensor([[pos]], device=device), reference.cache,
                           rows=slice(0, 1), kv_len=pos + 1)[0, -1]
            predicted.append(int(logits.argmax()))
        flips.append([i for i, (a, b) in enumerate(zip(predicted, request.output_ids)) if a != b])
    return flips


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
    total = sum(len(r.output_ids) for r in requests)
    agree = total - sum(map(len, teacher_forced_flips(model, prompts, requests, device)))
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
        got = engine.runner.decode_fn(tokens, positions, engine.runner.kv_len(len(seq)))[0, -1]
    err = rel(got, ref)
    check("compiled bf16 decode vs fp32 eager", err < 1e-2, f"relative error {err:.2e}")

    # 3. flex block-sparse window == dense masked reference, with a rolling buffer's slot order; the
    #    batched case puts each row at its own offset.
    torch.manual_seed(1)
    for t_q, n_cached, window, batch in ((4096, 4096, 4096, 1), (6000, 0, 2048, 1), (3000, 1000, 1024, 1),
                                         (1024, 1024, 1024, 3)):
        h, kv, hd = config.n_heads, config.n_kv_heads, config.head_dim
        q = torch.randn(batch, h, t_q, hd, device=device, dtype=torch.bfloat16)
        k = torch.randn(batch, kv, n_cached + t_q, hd, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q_pos, k_pos = [], []
        for b in range(batch):
            start = 5 * window + 17 + 300 * b
            cached = torch.arange(start - n_cached, start, device=device)
            cached = cached[torch.randperm(n_cached, device=device)]  # slot order of a rolling buffer
            q_pos.append(torch.arange(start, start + t_q, device=device))
            k_pos.append(torch.cat([cached, q_pos[-1]]))
        q_pos, k_pos = torch.stack(q_pos), torch.stack(k_pos)
        out = _compiled_flex()(q, k, v, block_mask=_block_mask(q_pos, k_pos, window), enable_gqa=True)
        dense = sdpa_attention(q.float(), k.float(), v.float(), q_pos, k_pos, window)
        err = rel(out, dense)
        check(f"flex window == dense (B={batch}, T={t_q}, cached={n_cached}, W={window})", err < 1e-2,
              f"relative error {err:.2e}")

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
