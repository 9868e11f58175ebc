"""What limits n-gram speculation on the shipped prompts (issue 22), without timing a speculative run.

Greedy speculative output equals plain greedy output, and a greedy verify accepts exactly the draft's
prefix that agrees with it, so replaying plain greedy's outputs through `ngram_lookup` gives the engine's
acceptance step by step. Per prompt kind it prints, by the longest n-gram that matched, how many steps
there were, the tokens a verify accepts and the chance the first draft token is right; then the speed-up
that verify costs (in decode steps, from verify_cost.py) give for k = 4 from n >= 2 (the default), and for
the best draft length chosen per match length.

    python3 benchmarks/ngram_replay.py --threads 2 [--costs 1.23,1.46,1.55,1.66,1.82,1.98,2.24,2.49]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from mistral7b import LLM, SamplingParams
from mistral7b.engine.proposers import ngram_lookup
from spec_bench import load_prompts

MAX_N, MAX_K = 4, 8
# Verify cost of k + 1 tokens in decode steps, k = 1..8: default model, 2-core AVX2, thirteenth session (k = 5
# and 7 interpolated).
COSTS = "1.23,1.46,1.55,1.66,1.82,1.98,2.24,2.49"


def longest_match(seq: np.ndarray) -> int:
    """The longest n <= MAX_N whose last n tokens occurred before with a token after them (0: none)."""
    for n in range(min(MAX_N, len(seq) - 1), 0, -1):
        if ngram_lookup(seq, 1, n, n):
            return n
    return 0


def replay(prompt: list[int], output: list[int]) -> list[tuple[int, int]]:
    """(longest match, tokens of an 8-token draft that agree with the output) at each decode position."""
    steps = []
    for i in range(1, len(output)):  # the first output token comes from the prefill
        seq = np.asarray(prompt + output[:i])
        draft = ngram_lookup(seq, MAX_K, MAX_N, 1)
        agree = next((j for j, t in enumerate(draft) if i + j >= len(output) or t != output[i + j]), len(draft))
        steps.append((longest_match(seq) if draft else 0, agree))
    return steps


def speedup(sequences: list[list[tuple[int, int]]], k_of_n: tuple[int, ...], cost: list[float]) -> float:
    """Tokens over decode-step costs when a match of length n drafts k_of_n[n] tokens."""
    tokens = spent = 0.0
    for steps in sequences:
        i = 0
        while i < len(steps):
            n, agree = steps[i]
            k = k_of_n[n]
            accepted = min(agree, k)
            tokens, spent, i = tokens + accepted + 1, spent + cost[k], i + accepted + 1
    return tokens / spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--costs", default=COSTS, help="verify of k + 1 tokens in decode steps, k = 1..8")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cost = [1.0] + [float(c) for c in args.costs.split(",")]
    if len(cost) != MAX_K + 1:
        raise SystemExit(f"--costs: {MAX_K} values, for k = 1..{MAX_K}")
    llm = LLM(args.model, max_batch=1)
    by_kind: dict[str, list] = {}
    for kind, ids in load_prompts(llm, None):
        output = llm.generate([ids], SamplingParams(max_tokens=args.max_tokens))[0].token_ids
        by_kind.setdefault(kind, []).append(replay(ids, list(output)))
    for kind, sequences in sorted(by_kind.items()):
        print(f"\n{kind}: {len(sequences)} prompts\n| longest match n | steps | accepted a verify (k = 4) | P(first right) |")
        print("|---|---|---|---|")
        for n in range(MAX_N + 1):
            agree = [a for steps in sequences for m, a in steps if m == n]
            if agree:
                print(f"| {n or 'none'} | {len(agree)} | {np.mean(np.minimum(agree, 4)):.2f} | "
                      f"{np.mean([a > 0 for a in agree]):.2f} |")
        default = speedup(sequences, (0, 0, 4, 4, 4), cost)
        choices = itertools.product(range(MAX_K + 1), repeat=MAX_N)
        best = max(((speedup(sequences, (0, *ks), cost), ks) for ks in choices), key=lambda r: r[0])
        print(f"speed-up at these verify costs: k = 4 from n >= 2 {default:.3f}x; best per match length "
              f"{best[0]:.3f}x with k = {dict(zip(range(1, MAX_N + 1), best[1]))}")


if __name__ == "__main__":
    main()
