"""llama.cpp (llama-cpp-python) as a peer: greedy decode timing and per-token NLL over given windows.

Runs under the peer venv's python (llama_cpp and numpy only: no torch, no mistral7b), so the callers
(`cpu_peer.py`, `quality.py`) pass token ids that our tokenizer made and both sides read the same tokens.
One JSON request on stdin, one JSON result on stdout:

    {"task": "generate", "model": PATH, "threads": 2, "prompts": [[ids...], ...], "new_tokens": 128}
    {"task": "perplexity", "model": PATH, "threads": 2, "ids": [...], "windows": [[start, end, score_from], ...]}
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def open_model(request: dict, n_ctx: int, logits_all: bool):
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=request["model"], n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=request["threads"],
        n_threads_batch=request["threads"], logits_all=logits_all, verbose=False, seed=0,
    )
    return llm, time.perf_counter() - t0, llama_cpp.__version__


def generate(request: dict) -> dict:
    """Greedy tokens (top_k=1); decode tok/s = (n - 1) / (last token time - first token time)."""
    n_new = request["new_tokens"]
    longest = max(len(p) for p in request["prompts"])
    llm, load_s, version = open_model(request, longest + n_new + 8, logits_all=False)
    runs = []
    for prompt in request["prompts"]:
        tokens, times = [], []
        start = time.perf_counter()
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == n_new:
                break
        runs.append({
            "tokens": tokens, "first_token_s": times[0] - start, "total_s": times[-1] - start,
            "decode_tok_s": (len(tokens) - 1) / (times[-1] - times[0]),
        })
    return {"version": version, "load_s": load_s, "runs": runs}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(request: dict) -> dict:
    """NLL of ids[score_from:end] in each window, read as a fresh sequence (the cache is reset)."""
    ids, windows = request["ids"], request["windows"]
    llm, load_s, version = open_model(request, max(end - start for start, end, _ in windows), logits_all=True)
    positions, nll, predictions = [], [], []
    started = time.perf_counter()
    for start, end, score_from in windows:
        llm.reset()
        llm.eval(ids[start:end])
        logits = np.array(llm.scores[: end - start])  # row i predicts token start + i + 1
        targets = np.arange(score_from, end)
        rows = targets - start - 1
        lp = log_softmax(logits[rows])
        nll += (-lp[np.arange(len(rows)), np.array(ids)[targets]]).tolist()
        predictions += logits[rows].argmax(-1).tolist()
        positions += targets.tolist()
    seconds = time.perf_counter() - started
    return {"version": version, "load_s": load_s, "seconds": seconds, "positions": positions, "nll": nll,
            "predictions": predictions, "nll_sum": float(np.sum(nll)), "n_tokens": len(nll)}


def main() -> int:
    request = json.load(sys.stdin)
    task = {"generate": generate, "perplexity": perplexity}[request["task"]]
    json.dump(task(request), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
