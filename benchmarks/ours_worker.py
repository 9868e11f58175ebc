"""Our engine as one benchmark process: the `generate` protocol of `llama_cpp_worker.py`, for `cpu_peer.py`.

One JSON request on stdin, one JSON result on stdout:

    {"model": PATH, "threads": 2, "dtype": "float32", "prompts": [[ids...], ...], "new_tokens": 128,
     "warmup_tokens": 16, "compile": false}

`LLM(path, device="cpu", dtype=..., max_batch=1)` with the cache sized to the request (like llama.cpp's
n_ctx), greedy. The worker's start and the first token are on time.monotonic(), so the caller measures
process start to first token from its spawn; the result also holds the peak RSS, and which activation
path ran (`mistral7b.quant.cpu_kernels.available()`: int8 activations, or torch's float kernels) under
the environment the caller passed through (MISTRAL7B_INT8_ACTIVATIONS).
"""

from __future__ import annotations

import time

STARTED_AT = time.monotonic()

import json  # noqa: E402 - after the start time
import os  # noqa: E402
import sys  # noqa: E402

from llama_cpp_worker import peak_rss_bytes  # noqa: E402 - the same VmHWM reading for both engines


def one_run(llm, prompt: list[int], n_new: int) -> dict:
    """Greedy tokens through the engine's step loop; each token is timed as it appears."""
    from mistral7b import SamplingParams

    params = SamplingParams(max_tokens=n_new, ignore_eos=True, temperature=0.0)
    times, first_at = [], None
    start = time.perf_counter()
    request = llm.engine.add(prompt, params)
    while not request.finished:
        llm.engine.step()
        now = time.perf_counter()
        if request.output_ids and first_at is None:
            first_at = time.monotonic()
        times += [now] * (len(request.output_ids) - len(times))
    tokens = [int(t) for t in request.output_ids]
    return {"tokens": tokens, "first_token_s": times[0] - start, "total_s": times[-1] - start,
            "first_token_at": first_at, "decode_tok_s": (len(tokens) - 1) / max(times[-1] - times[0], 1e-9)}


def batch_run(llm, prompt: list[int], n_new: int, batch: int) -> dict:
    """`batch` copies of the prompt decoded together: total decode tok/s over the rows, from the step
    every row has its first token to the step the last finishes (the rows' greedy tokens are equal)."""
    from mistral7b import SamplingParams

    params = SamplingParams(max_tokens=n_new, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    requests = [llm.engine.add(prompt, params) for _ in range(batch)]
    first_at = first = None
    while not all(r.finished for r in requests):
        llm.engine.step()
        if first is None and all(r.output_ids for r in requests):
            first, first_at = time.perf_counter(), time.monotonic()
    end = time.perf_counter()
    tokens = [int(t) for t in requests[0].output_ids]
    decoded = sum(len(r.output_ids) - 1 for r in requests)
    return {"tokens": tokens, "first_token_s": first - start, "total_s": end - start, "first_token_at": first_at,
            "decode_tok_s": decoded / max(end - first, 1e-9)}


def activations() -> str:
    from mistral7b.quant import cpu_kernels

    switch = os.environ.get(cpu_kernels.ENV_SWITCH)
    mode = "int8 activations" if cpu_kernels.available() else "float activations (torch kernels)"
    return f"{mode}, {cpu_kernels.ENV_SWITCH}={switch if switch is not None else 'unset'}"


def generate(request: dict) -> dict:
    import torch

    from mistral7b import LLM

    torch.set_num_threads(request["threads"])
    n_new, warmup = request["new_tokens"], request.get("warmup_tokens", 0)
    longest = max(len(p) for p in request["prompts"])
    t0 = time.perf_counter()
    batch = request.get("batch", 1)
    llm = LLM(request["model"], device="cpu", dtype=request["dtype"], max_batch=batch,
              max_seq_len=longest + max(n_new, warmup) + 8, compile=request.get("compile", False))
    load_s = time.perf_counter() - t0
    first = one_run(llm, request["prompts"][0], warmup) if warmup else None
    if batch > 1:
        runs = [batch_run(llm, prompt, n_new, batch) for prompt in request["prompts"]]
    else:
        runs = [one_run(llm, prompt, n_new) for prompt in request["prompts"]]
    return {"version": torch.__version__, "load_s": load_s, "runs": runs, "started_at": STARTED_AT,
            "first_token_at": (first or runs[0])["first_token_at"],
            "peak_rss_bytes": peak_rss_bytes(),
            "settings": f"dtype {request['dtype']}, {activations()}, torch threads {torch.get_num_threads()}, "
                        f"compile {llm.engine.compiled}"}


def main() -> int:
    json.dump(generate(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
