"""llama.cpp (llama-cpp-python) as a peer: greedy decode timing and per-token NLL over given windows.

Runs under the peer venv's python (llama_cpp and numpy only: no torch, no mistral7b), so the callers
(`cpu_peer.py`, `quality.py`) pass token ids that our tokenizer made and both sides read the same tokens.
One JSON request on stdin, one JSON result on stdout:

    {"task": "generate", "model": PATH, "threads": 2, "prompts": [[ids...], ...], "new_tokens": 128,
     "warmup_tokens": 16}
    {"task": "perplexity", "model": PATH, "threads": 2, "ids": [...], "windows": [[start, end, score_from], ...]}

`generate` (the protocol `ours_worker.py` shares) reports, besides each run, the worker's start and
each run's first token on time.monotonic() (one clock for all processes on Linux, so the caller can
measure from its spawn), and the process's peak RSS.

llama-cpp-python 0.3.36's AMX weight repack ("extra buffer types") segfaults on the 2-core AVX-512/AMX
machine, so the model loads with `use_extra_bufts = False` (plain CPU buffers: llama.cpp's AVX-512
kernels, no repack), and prompt batches use as many threads as decode (`n_threads_batch = n_threads`).
"""

from __future__ import annotations

import json
import sys
import time

STARTED_AT = time.monotonic()

import numpy as np  # noqa: E402 - after the start time

NO_EXTRA_BUFTS = "use_extra_bufts = False (no AMX repack), n_threads_batch = n_threads"


def without_extra_buffers(llama_cpp) -> None:
    """Makes every model load with use_extra_bufts = False: Llama() reads llama_model_default_params()."""
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params
    if getattr(defaults, "no_extra_bufts", False):
        return

    def patched():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    patched.no_extra_bufts = True
    low.llama_model_default_params = patched


def open_model(request: dict, n_ctx: int, logits_all: bool):
    import llama_cpp

    without_extra_buffers(llama_cpp)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=request["model"], n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=request["threads"],
        n_threads_batch=request["threads"], logits_all=logits_all, verbose=False, seed=0,
    )
    return llm, time.perf_counter() - t0, llama_cpp.__version__


def generate(request: dict) -> dict:
    """Greedy tokens (top_k=1); decode tok/s = (n - 1) / (last token time - first token time).
    With `warmup_tokens`, one untimed generation of that many tokens on the first prompt goes first."""
    n_new = request["new_tokens"]
    warmup = request.get("warmup_tokens", 0)
    longest = max(len(p) for p in request["prompts"])
    llm, load_s, version = open_model(request, longest + max(n_new, warmup) + 8, logits_all=False)
    first = one_run(llm, request["prompts"][0], warmup) if warmup else None
    runs = [one_run(llm, prompt, n_new) for prompt in request["prompts"]]
    return {"version": version, "load_s": load_s, "runs": runs, "started_at": STARTED_AT,
            "first_token_at": (first or runs[0])["first_token_at"],
            "peak_rss_bytes": peak_rss_bytes(), "settings": NO_EXTRA_BUFTS}


def one_run(llm, prompt: list[int], n_new: int) -> dict:
    tokens, times = [], []
    start = time.perf_counter()
    first_at = None
    llm.reset()  # else generate() reuses the cached prefix of the previous run
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        first_at = first_at or time.monotonic()
        tokens.append(int(token))
        if len(tokens) == n_new:
            break
    return {"tokens": tokens, "first_token_s": times[0] - start, "total_s": times[-1] - start,
            "first_token_at": first_at, "decode_tok_s": (len(tokens) - 1) / max(times[-1] - times[0], 1e-9)}




def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: since its exec; getrusage's ru_maxrss would carry over the
    parent's peak across fork + exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


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
