"""Where an HTTP load's time goes, against the same load through the engine alone.

Runs `serve_load`'s load (random-weight preset, streaming /v1/completions) under several set-ups of
the server and the load generator, and for each prints the load's figures plus a breakdown of the
engine thread's time: prefill forwards, decode launches, waits for the GPU's tokens, token
bookkeeping, dispatch to the event loop, and a timeline (ms after the first request was sent) of the
first and last request reaching the engine, the first and last engine step, and the last token read.

    python benchmarks/serve_breakdown.py --compile --repeat 2          # the 7B load on a GPU
    python benchmarks/serve_breakdown.py --preset tiny --prompt-len 64 --max-tokens 64   # CPU sanity

Set-ups: uvicorn's event loop and HTTP parser (asyncio + h11, or uvloop + httptools where installed),
the interpreter's GIL switch interval (5 ms default, 1 ms), and 1 or 8 client processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time

import torch
import uvicorn

import serve_load
from mistral7b.config import preset
from mistral7b.server import EngineDriver, ServerThread, build_app

SETUPS = {  # label: (uvicorn loop, uvicorn http, switch interval s, client processes)
    "h11": ("asyncio", "h11", 0.005, 8),
    "h11 one-client-process": ("asyncio", "h11", 0.005, 1),
    "h11 switch-1ms": ("asyncio", "h11", 0.001, 8),
    "uvloop+httptools": ("auto", "auto", 0.005, 8),
}


class Timings:
    """(start, duration) of every call to the wrapped methods, by name."""

    def __init__(self):
        self.calls: dict[str, list[tuple[float, float]]] = {}

    def wrap(self, obj, method: str, name: str) -> None:
        fn = getattr(obj, method)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.setdefault(name, []).append((t, time.perf_counter() - t))

        setattr(obj, method, timed)

    def summary(self, results: list[dict] | None = None) -> dict:
        out = {name: {"calls": len(v), "total_s": round(sum(d for _, d in v), 3)} for name, v in self.calls.items()}
        steps = sorted(self.calls.get("step", []))
        out["between_steps_s"] = round(sum(b[0] - sum(a) for a, b in zip(steps, steps[1:])), 3)
        if results and steps:
            t0 = min(r["start"] for r in results)
            submits = sorted(self.calls["submit"])
            ms = lambda x: round(1000 * (x - t0), 1)  # noqa: E731
            out["timeline_ms"] = {"first_submit": ms(submits[0][0]), "last_submit": ms(submits[-1][0]),
                                  "first_step": ms(steps[0][0]), "last_step_end": ms(sum(steps[-1])),
                                  "last_token": ms(max(r["times"][-1] for r in results))}
        self.calls.clear()
        return out


def instrument(engine, driver) -> Timings:
    timings = Timings()
    finish = engine._finish

    def finish_timed(group, deltas):  # the wait for the GPU, apart from the bookkeeping after it
        if group.ready is not None:
            t = time.perf_counter()
            group.ready.synchronize()
            timings.calls.setdefault("gpu_wait", []).append((t, time.perf_counter() - t))
        return finish(group, deltas)

    engine._finish = finish_timed
    for owner, method, name in ((engine, "step", "step"), (engine.runner, "launch", "decode_launch"),
                                (engine, "_prefill", "prefill"), (engine.output, "apply", "apply")):
        timings.wrap(owner, method, name)
    timings.wrap(driver, "_dispatch", "dispatch")
    timings.wrap(driver, "submit", "submit")
    return timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mistral-7b-v0.1")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", "-c", type=int, default=64)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated labels of " + repr(list(SETUPS)))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = serve_load.TINY if args.preset == "tiny" else preset(args.preset)
    llm = serve_load.random_llm(config, device, dtype, args.concurrency, None, args.compile, 0)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.concurrency)]
    t = time.perf_counter()
    driver = EngineDriver(llm).start()
    print(f"warm-up {time.perf_counter() - t:.1f} s on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f", torch {torch.__version__}", flush=True)
    timings = instrument(llm.engine, driver)
    rows, make_config = [], uvicorn.Config
    for _ in range(args.repeat):
        for label in args.setups.split(","):
            loop, http, switch, procs = SETUPS[label]
            uvicorn.Config = functools.partial(make_config, loop=loop, http=http)
            sys.setswitchinterval(switch)
            try:
                with ServerThread(build_app(driver, "m", max_queue=256), log_level="warning") as server:
                    serve_load.load_in_children(server.url, "m", prompts, 16, args.concurrency, procs)
                    timings.summary()
                    results, wall = serve_load.load_in_children(server.url, "m", prompts, args.max_tokens,
                                                                args.concurrency, procs)
            finally:
                uvicorn.Config = make_config
                sys.setswitchinterval(0.005)
            s = serve_load.summarize(results, wall, args.max_tokens)
            rows.append({"setup": label, **{k: s[k] for k in ("output_tok_s", "wall_s", "ttft_ms_p50", "ttft_ms_p99",
                                                               "tpot_ms_p50", "incomplete_requests")},
                         **timings.summary(results)})
            print(json.dumps(rows[-1]), flush=True)
        off = serve_load.offline_engine(llm.engine, prompts, args.max_tokens)
        rows.append({"setup": "engine alone", **off, **timings.summary()})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
