"""Load benchmark for the HTTP server: N concurrent streaming /v1/completions requests.

The server runs in this process (uvicorn in a thread, on 127.0.0.1) over either a real checkpoint
(`--model SOURCE`) or a preset with random weights (`--preset mistral-7b-v0.1`, no checkpoint needed;
prompts are random token ids either way). Every request asks for exactly `--max-tokens` tokens
(`ignore_eos`, greedy) from client processes released together (`--client-processes`). Prints output
tok/s, TTFT p50/p99, TPOT p50/p99 (per request: (latency - TTFT) / (output tokens - 1), as vLLM's
benchmark_serving) and ITL p50/p99 per token (each gap between streamed events spread over the tokens
the event delivered) and per event (vLLM's ITL); `--json PATH` writes them. See `per_token`.

    python benchmarks/serve_load.py --preset mistral-7b-v0.1 --json serve.json          # GPU defaults
    python benchmarks/serve_load.py --preset tiny --concurrency 4 --prompt-len 16 --max-tokens 8   # CPU sanity
    python benchmarks/serve_load.py --preset tiny -c 4 --prompt-len 16 --max-tokens 32 --engine-process --decode-steps 8

`--engine-process` runs the engine in its own process, as `mistral7b serve` does by default (the
server's EngineProcessClient; the engine process builds the same random weights from the same seed); without
it the engine is a thread of the server's process (`serve --engine-in-process`).

ITL note: on CUDA the engine decodes several steps per host sync (`decode_steps`), so tokens arrive
in bursts: with the engine in this process one event per token, several events at once (ITL p50 near
zero); with `--engine-process` one event per step's tokens. TPOT is the steadier per-token figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import time

import httpx
import torch

from mistral7b.config import ModelConfig, preset
from mistral7b.engine import Engine
from mistral7b.model import Transformer
from mistral7b.server import EngineDriver, ServerThread, build_app

# A few-layer model of Mistral's shape family for CPU smoke runs (`--preset tiny`).
TINY = ModelConfig(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=1024,
                   sliding_window=None, max_seq_len=4096, name="tiny")


class RandomLLM:
    """What `EngineDriver` needs from an `LLM`, for a random-weight model without a tokenizer."""

    def __init__(self, model: Transformer, engine: Engine, name: str):
        self.model, self.engine, self.tokenizer, self.source = model, engine, None, name

    @property
    def config(self):
        return self.model.config

    def encode_prompt(self, prompt):
        if isinstance(prompt, str) or not all(isinstance(t, int) for t in prompt):
            raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
        return list(prompt)

    def chat_prompt(self, messages, safe_prompt=False):
        raise ValueError("this model has no tokenizer, so it has no chat format")

    def close(self) -> None:
        """What the engine process calls on its way out (LLM.close): drop the engine and the weights."""
        self.engine = self.model = None


def random_llm(config: ModelConfig, device, dtype, max_batch: int, max_seq_len: int | None = None,
               compile: bool = False, seed: int = 0, decode_steps: int | None = None) -> RandomLLM:
    """Transformer(config) built straight on the device, weights N(0, 0.02), norms 1."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                torch.nn.init.normal_(p, std=0.02)
    model.eval()
    engine = Engine(model, None, max_batch=max_batch, max_seq_len=max_seq_len, compile=compile,
                    decode_steps=decode_steps)
    return RandomLLM(model, engine, config.name)


def preset_llm(name: str, device: str, dtype: str, max_batch: int, max_seq_len: int | None, compile: bool,
               seed: int, decode_steps: int | None = None) -> RandomLLM:
    """`random_llm` from JSON-friendly arguments: the engine process's factory (EngineLoad.factory)."""
    config = TINY if name == "tiny" else preset(name)
    return random_llm(config, torch.device(device), getattr(torch, dtype), max_batch, max_seq_len, compile, seed,
                      decode_steps)


def engine_process_client(args, device, dtype):
    """An EngineProcessClient whose engine process loads --model, or builds --preset's random weights; ready."""
    from mistral7b.server.engine_client import EngineProcessClient
    from mistral7b.server.engine_process import EngineLoad

    dtype_name = str(dtype).replace("torch.", "")
    if args.model:
        engine = {"max_batch": args.max_batch, "max_seq_len": args.max_seq_len, "compile": args.compile}
        load = EngineLoad(source=args.model, device=str(device), dtype=dtype_name, engine=engine)
    else:
        load = EngineLoad(factory="serve_load:preset_llm", factory_args=dict(
            name=args.preset, device=str(device), dtype=dtype_name, max_batch=args.max_batch,
            max_seq_len=args.max_seq_len, compile=args.compile, seed=args.seed, decode_steps=args.decode_steps))
    return EngineProcessClient.launch(load, name=args.model or args.preset).warm_up()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request: the arrival time of each event that carries a choice, the final usage, and
    the time of [DONE]. An event may carry several tokens (a multi-step decode delivers them together)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage, finish, done = [], None, None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                times.append(time.perf_counter())
                finish = choice["finish_reason"] or finish
    end = time.perf_counter()
    return {"start": start, "times": times, "usage": usage, "finish": finish, "done": done or end, "end": end}


def per_token(result: dict) -> tuple[float | None, list[float], bool]:
    """(TPOT, per-token ITLs, whether each event's token count is exact) of one request.

    Tokens come from the usage chunk, not from the events: an event carries one token with the engine in
    this process, and a whole engine step's tokens (8 on CUDA) with `--engine-process`. TPOT is vLLM
    benchmark_serving's (benchmarks/benchmark_serving.py, calculate_metrics): (latency - TTFT) /
    (output tokens - 1), latency taken at [DONE]. ITL: vLLM's list holds one gap per streamed chunk,
    whatever it carries (backend_request_func.py); here each gap is spread over the tokens its event
    delivered, one entry per token. The server does not say how many tokens an event holds (without
    logprobs), so unless there is one event per token, the first event counts 1 token (the prefill's)
    and the rest are split evenly over the later events: exact in total, estimated per event."""
    n, times = result["usage"]["completion_tokens"], result["times"]
    if n < 2 or not times:
        return None, [], True
    ttft = times[0] - result["start"]
    tpot = (result["done"] - result["start"] - ttft) / (n - 1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    if len(times) == n:
        return tpot, gaps, True
    per_event = (n - 1) / max(len(gaps), 1)  # equal weights, so one entry per event ranks as per token
    return tpot, [g / per_event for g in gaps], False


def load_in_children(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                     processes: int = 8):
    """Run the load from `processes` client processes, released together by a barrier, so the clients'
    own work (httpx, JSON parsing) neither shares the server's GIL nor serialises 64 requests behind
    one client event loop (as with any real load generator; one httpx process took ~200 ms to get its
    first request to the server). Returns (results, wall seconds from the first request sent to the
    last response read; perf_counter is system-wide, so the processes' clocks agree)."""
    ctx = multiprocessing.get_context("spawn")
    processes = max(1, min(processes, concurrency, len(prompts)))
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [ctx.Process(target=_client_process, daemon=True,
                           args=(url, model, prompts[i::processes], max_tokens,
                                 -(-concurrency // processes), barrier, results)) for i in range(processes)]
    for w in workers:
        w.start()
    barrier.wait(timeout=300)
    out = []
    for _ in workers:
        ok, value = results.get(timeout=3600)
        if not ok:
            raise RuntimeError(f"a client process failed: {value}")
        out.extend(value)
    for w in workers:
        w.join()
    wall = max(r["end"] for r in out) - min(r["start"] for r in out)
    return out, wall


def _client_process(url, model, prompts, max_tokens, concurrency, barrier, results):
    async def go():
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
            async def guarded(p):
                async with sem:
                    return await one_request(client, model, p, max_tokens)

            # Connected clients, as a serving load has them: connections open and httpx's lazy set-up
            # done (the first request of a fresh client took ~100 ms before reaching the server).
            await asyncio.gather(*(client.get("/health") for _ in range(concurrency)))
            barrier.wait()
            return await asyncio.gather(*(guarded(p) for p in prompts))

    try:
        results.put((True, asyncio.run(go())))
    except BaseException as e:  # the parent must hear about it rather than wait forever
        barrier.abort()
        results.put((False, f"{type(e).__name__}: {e}"))


def summarize(results: list[dict], wall: float, max_tokens: int) -> dict:
    generated = sum(r["usage"]["completion_tokens"] for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    measured = [per_token(r) for r in results]
    tpot = [m[0] for m in measured if m[0] is not None]
    itl = [x for m in measured for x in m[1]]
    itl_event = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]  # vLLM's ITL: per chunk
    bad = [r for r in results if r["usage"]["completion_tokens"] != max_tokens or r["finish"] != "length"]
    ms = lambda x: round(1000 * x, 2)  # noqa: E731
    return {
        "requests": len(results), "generated_tokens": generated, "wall_s": round(wall, 3),
        "output_tok_s": round(generated / wall, 2),
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(itl, 50)), "itl_ms_p99": ms(percentile(itl, 99)),
        "itl_tokens_per_event": "exact (one token per event)" if all(m[2] for m in measured) else
                                "estimated (first event 1 token, the rest split evenly)",
        "itl_event_ms_p50": ms(percentile(itl_event, 50)), "itl_event_ms_p99": ms(percentile(itl_event, 99)),
        "tokens_per_event": round(generated / max(1, sum(len(r["times"]) for r in results)), 2),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p99": ms(percentile(tpot, 99)),
        "ttft_ms_mean": ms(statistics.fmean(ttft)) if ttft else None,
        "incomplete_requests": len(bad),
    }


def offline_engine(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """The same load straight through the engine, no HTTP: what the server's layer costs."""
    from mistral7b.bench import run_requests, sync

    sync(engine.device)
    t = time.perf_counter()
    requests = run_requests(engine, prompts, max_tokens)
    sync(engine.device)
    wall = time.perf_counter() - t
    generated = sum(len(r.output_ids) for r in requests)
    return {"generated_tokens": generated, "wall_s": round(wall, 3), "output_tok_s": round(generated / wall, 2)}


def hf_continuous_batching(config: ModelConfig, device, prompts: list[list[int]], max_tokens: int) -> dict:
    """The peer: HF transformers' own continuous batching (`generate_batch`, paged cache) on the same
    prompts, greedy, EOS disabled so every request runs to max_tokens."""
    import transformers
    from transformers import GenerationConfig

    from mistral7b.bench import build_hf, sync

    hf = build_hf(config, device)
    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generate_batch(prompts[:2], generation_config=gen)  # warm-up
    sync(device)
    t = time.perf_counter()
    outputs = hf.generate_batch(prompts, generation_config=gen)
    sync(device)
    wall = time.perf_counter() - t
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return {"transformers": transformers.__version__, "attn": hf.config._attn_implementation,
            "generated_tokens": generated, "wall_s": round(wall, 3), "output_tok_s": round(generated / wall, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint source (path, GGUF, hub id) loaded through LLM")
    src.add_argument("--preset", help="random weights of a preset config (e.g. mistral-7b-v0.1), or 'tiny'")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=None, help="cache length per row (default: the config's)")
    ap.add_argument("--compile", action="store_true", help="compiled decode (CUDA graphs on GPU), preset only")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="preset only: decode steps back to back (default: the engine's, 8 on CUDA, 1 on CPU)")
    ap.add_argument("--concurrency", "-c", type=int, default=64)
    ap.add_argument("--requests", "-n", type=int, default=None, help="total requests (default: = concurrency)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--client-processes", type=int, default=8, help="client processes sharing the load")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up bursts (16 tokens each) before measuring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offline", action="store_true", help="also run the load straight through the engine")
    ap.add_argument("--hf-peer", action="store_true",
                    help="also run HF transformers' continuous batching (generate_batch) on the same load (CUDA)")
    ap.add_argument("--engine-process", action="store_true", help="the engine in its own process (serve's default)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.engine_process and (args.offline or args.hf_peer):
        ap.error("--offline and --hf-peer need the engine in this process: leave out --engine-process")

    from mistral7b.llm import LLM
    from mistral7b.utils import default_device, resolve_dtype

    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    llm = None  # in this process only
    if args.engine_process:
        client = engine_process_client(args, device, dtype)
        name = str(args.model or args.preset)
    elif args.model:
        llm = LLM(args.model, device=device, dtype=dtype, max_batch=args.max_batch, max_seq_len=args.max_seq_len)
        name = str(args.model)
    else:
        config = TINY if args.preset == "tiny" else preset(args.preset)
        llm = random_llm(config, device, dtype, args.max_batch, args.max_seq_len, args.compile, args.seed,
                         args.decode_steps)
        name = args.preset
    load_s = time.perf_counter() - t0
    if llm is not None:
        client = EngineDriver(llm)
        t = time.perf_counter()
        client.start()  # on the server's engine thread, which owns the CUDA graphs
        if llm.engine.compiled:
            print(f"engine warm-up (compile) {time.perf_counter() - t:.1f} s", flush=True)
    vocab = client.model_info.vocab_size
    rng = random.Random(args.seed)
    n = args.requests or args.concurrency
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(n)]

    with ServerThread(build_app(client, name, max_queue=max(256, n)), log_level="warning") as server:
        for _ in range(args.warmup):  # a burst like the load, shorter: the shapes it meets are seen once
            load_in_children(server.url, name, prompts[: args.concurrency], min(args.max_tokens, 16), args.concurrency,
                             args.client_processes)
        results, wall = load_in_children(server.url, name, prompts, args.max_tokens, args.concurrency,
                                         args.client_processes)
    client.close()

    summary = summarize(results, wall, args.max_tokens)
    extra_rows = []
    if args.offline:
        summary["offline"] = offline_engine(llm.engine, prompts, args.max_tokens)
        extra_rows.append(("engine alone, no HTTP (tok/s)", summary["offline"]["output_tok_s"]))
    if args.hf_peer:
        config = llm.config
        del llm
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            summary["hf_peer"] = hf_continuous_batching(config, device, prompts, args.max_tokens)
            hf_rate = summary["hf_peer"]["output_tok_s"]
            extra_rows.append((f"HF generate_batch, no HTTP (tok/s)", hf_rate))
            extra_rows.append(("ours over HTTP / HF", round(summary["output_tok_s"] / hf_rate, 2)))
        except Exception as e:  # a peer that cannot run is reported, not fatal
            summary["hf_peer"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            extra_rows.append(("HF generate_batch", summary["hf_peer"]["error"][:120]))
    meta = {"model": name, "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "dtype": str(dtype).replace("torch.", ""), "max_batch": args.max_batch, "concurrency": args.concurrency,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "compile": args.compile,
            "client_processes": args.client_processes, "engine_process": args.engine_process,
            "load_s": round(load_s, 1), "torch": torch.__version__}
    rows = [("output tok/s", summary["output_tok_s"]),
            ("TTFT p50 / p99 (ms)", f"{summary['ttft_ms_p50']} / {summary['ttft_ms_p99']}"),
            ("ITL  p50 / p99 (ms), per token", f"{summary['itl_ms_p50']} / {summary['itl_ms_p99']}"),
            ("ITL  p50 / p99 (ms), per event (vLLM's)", f"{summary['itl_event_ms_p50']} / {summary['itl_event_ms_p99']}"
                                                        f" ({summary['tokens_per_event']} tokens an event)"),
            ("TPOT p50 / p99 (ms), per token", f"{summary['tpot_ms_p50']} / {summary['tpot_ms_p99']}"),
            ("requests / tokens", f"{summary['requests']} / {summary['generated_tokens']}"),
            ("wall (s)", summary["wall_s"])] + extra_rows
    print(f"{name} on {meta['gpu'] or device} ({meta['dtype']}), {n} requests x {args.prompt_len} prompt + "
          f"{args.max_tokens} new tokens, concurrency {args.concurrency}, max_batch {args.max_batch}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if summary["incomplete_requests"]:
        print(f"WARNING: {summary['incomplete_requests']} requests did not produce {args.max_tokens} tokens",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **summary}, f, indent=2)
    return 1 if summary["incomplete_requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
