"""Soak benchmark of `mistral7b serve` (issue 26): hours of mixed load, watching memory and latency drift.

Starts the server itself (a subprocess on a free port; the default model unless `--model`; the engine
in its own process unless `--engine-thread`), then `--concurrency` clients send a mix of requests for
`--minutes`: chat and completions, streamed and not; streams dropped mid-way; `response_format`
json_schema (the output checked with jsonschema); tool calls (`tools` + `tool_choice`, arguments
checked); prompts sharing a long prefix (the prefix cache); requests cut by a client timeout; and
deliberately bad requests (400). Every `--interval` seconds it prints and records the RSS of the server
and of the engine process, requests done, errors by kind (HTTP status or exception type) and p50/p99
latency of that interval. At the end: a table and the issue's targets (no 5xx, RSS drift < 5% from the
first interval after `--warmup` to the last, p99 drift < 10% from the first third of the time after
warm-up to the last third, all their requests pooled), and no request left running in the
engine once the load stops (dropped clients must free their rows); `--json PATH` writes it all; the exit
status is 1 when a target is missed. Not in CI: the default is 30 minutes.

    python benchmarks/soak.py --minutes 30 --concurrency 4 --json soak.json
    python benchmarks/soak.py --minutes 5 --engine-thread --torch-threads 1   # a shared 2-core box
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
from serve_load import percentile

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"], "properties": {
    "city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}}]
# About 400 tokens every "prefix" request starts with, so later ones hit the prefix cache.
LONG_PREFIX = "You are a careful assistant for a travel agency. " + " ".join(
    f"Rule {i}: answer briefly, name the city, and never invent prices or dates." for i in range(30))
MODEL = "soak"  # the server is started with --model-name soak
TOPICS = ["Rome", "the sea", "a cat", "coffee", "winter", "a robot", "Paris", "a garden", "music", "trains"]
# Kinds of request and their share of the load; "asked" outcomes (drops, timeouts, 400s) are not errors.
MIX = {"chat": 3, "chat_stream": 3, "completion": 2, "completion_stream": 2, "disconnect": 1, "json_schema": 2,
       "tools": 2, "prefix": 3, "timeout": 1, "bad": 1}


class Failed(Exception):
    """A response that came back but is wrong (bad JSON, a schema it breaks); its message is the kind."""


async def _post(client, path: str, body: dict, **options) -> httpx.Response:
    return await client.post(path, json={"model": MODEL, **body}, **options)


def _check(response: httpx.Response) -> dict:
    if response.status_code != 200:
        raise Failed(f"HTTP {response.status_code}")
    return response.json()


async def _stream(client, path: str, body: dict, stop_after: int | None = None) -> str:
    """Reads a stream to [DONE] (or drops the connection after `stop_after` events); its text."""
    text, events = [], 0
    async with client.stream("POST", path, json={"model": MODEL, **body, "stream": True}) as r:
        if r.status_code != 200:
            raise Failed(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise Failed("stream error event")
            for choice in event["choices"]:
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            events += 1
            if stop_after is not None and events >= stop_after:
                return "".join(text)  # leaving the block closes the connection mid-stream
    return "".join(text)


def _chat(prompt: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": random.randint(8, 32),
            "temperature": random.choice([0, 0.7, 1.0]), "seed": random.randrange(1 << 30), **extra}


def _prompt() -> str:
    return f"Write one sentence about {random.choice(TOPICS)}."


async def run_one(client: httpx.AsyncClient, kind: str) -> str:
    """Sends one request of `kind`: "ok", "asked" (an outcome the request asked for), or raises."""
    if kind == "chat":
        _check(await _post(client, "/v1/chat/completions", _chat(_prompt())))
    elif kind == "chat_stream":
        await _stream(client, "/v1/chat/completions", _chat(_prompt()))
    elif kind == "completion":
        _check(await _post(client, "/v1/completions", {"prompt": _prompt(), "max_tokens": 16}))
    elif kind == "completion_stream":
        await _stream(client, "/v1/completions", {"prompt": _prompt(), "max_tokens": 24, "temperature": 0.8})
    elif kind == "disconnect":
        await _stream(client, "/v1/completions", {"prompt": _prompt(), "max_tokens": 200}, stop_after=2)
        return "asked"
    elif kind == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        choice = _check(await _post(client, "/v1/chat/completions", _chat(
            "A person as JSON.", response_format=fmt, max_tokens=60)))["choices"][0]
        _valid(choice["message"]["content"], PERSON, choice["finish_reason"])
    elif kind == "tools":
        tool_choice = random.choice(["required", {"type": "function", "function": {"name": "get_weather"}}])
        choice = _check(await _post(client, "/v1/chat/completions", _chat(
            "What is the weather in Rome for 3 days?", tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
            max_tokens=60)))["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        if choice["finish_reason"] != "tool_calls" or not calls:
            raise Failed("no tool call")
        for call in calls:
            _valid(call["function"]["arguments"], WEATHER, "stop")
    elif kind == "prefix":
        body = {"prompt": f"{LONG_PREFIX}\nQuestion: what about {random.choice(TOPICS)}?\nAnswer:", "max_tokens": 8}
        _check(await _post(client, "/v1/completions", body))
    elif kind == "timeout":
        try:  # more tokens than the client waits for: the server must drop it when the connection goes
            _check(await _post(client, "/v1/completions", {"prompt": _prompt(), "max_tokens": 400, "ignore_eos": True},
                               timeout=0.5))
        except httpx.TimeoutException:
            return "asked"
    elif kind == "bad":
        r = await _post(client, "/v1/chat/completions", _chat("hi", temperature=-1))
        if r.status_code != 400:
            raise Failed(f"HTTP {r.status_code} for a bad request")
        return "asked"
    return "ok"


def _valid(text: str, schema: dict, finish_reason: str) -> None:
    if finish_reason != "stop":  # cut by max_tokens: not a whole value to check
        return
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        raise Failed("output breaks its schema") from None


async def client_loop(client, records: list, deadline: float) -> None:
    kinds, weights = list(MIX), list(MIX.values())
    while time.monotonic() < deadline:
        kind = random.choices(kinds, weights)[0]
        start = time.monotonic()
        try:
            outcome = await run_one(client, kind)
        except Failed as e:
            outcome = str(e)
        except Exception as e:  # noqa: BLE001 - any other failure is an error of its own kind
            outcome = type(e).__name__
        records.append((time.monotonic(), kind, outcome, time.monotonic() - start))


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def engine_pid(server_pid: int) -> int | None:
    """The engine process: the server's largest child (the others, such as a resource tracker, are small)."""
    try:
        import psutil

        children = [c.pid for c in psutil.Process(server_pid).children(recursive=True)]
    except ImportError:
        children = [int(p) for p in _proc_children(server_pid)]
    except Exception:  # the server is gone
        return None
    sized = [(rss_mib(pid) or 0, pid) for pid in children]
    return max(sized)[1] if sized else None


def _proc_children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def interval_row(index: int, records: list, server_pid: int, engine: int | None) -> dict:
    """What one interval saw: RSS now, requests finished in it, errors by kind, latency of the good ones."""
    errors = collections.Counter(o for _, _, o, _ in records if o not in ("ok", "asked"))
    ok = [(k, s) for _, k, o, s in records if o == "ok"]
    latencies = [s for _, s in ok]
    return {"interval": index, "rss_server_mib": rss_mib(server_pid), "rss_engine_mib": rss_mib(engine) if engine else None,
            "done": sum(o == "ok" for _, _, o, _ in records), "asked": sum(o == "asked" for _, _, o, _ in records),
            "errors": dict(errors), "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "by_kind": {kind: {"n": sum(k == kind for k, _ in ok), "p50_s": percentile([s for k, s in ok if k == kind], 50)}
                        for kind in sorted({k for k, _ in ok})}}


def _fmt(v, spec=".1f"):
    return "-" if v is None or v != v else format(v, spec)


def print_row(row: dict) -> None:
    errors = ",".join(f"{k}:{n}" for k, n in row["errors"].items()) or "0"
    print(f"{row['interval']:>4} {_fmt(row['rss_server_mib']):>10} {_fmt(row['rss_engine_mib']):>10} "
          f"{row['done']:>6} {row['asked']:>6} {_fmt(row['p50_s'], '.2f'):>7} {_fmt(row['p99_s'], '.2f'):>7}  {errors}",
          flush=True)


HEADER = f"{'min':>4} {'server MiB':>10} {'engine MiB':>10} {'done':>6} {'asked':>6} {'p50 s':>7} {'p99 s':>7}  errors"


async def soak(url: str, server_pid: int, engine: int | None, args) -> tuple[list[dict], list, float]:
    """Runs the clients until the deadline; a row per interval, every request's record, the start time."""
    deadline = time.monotonic() + args.minutes * 60
    records, rows = [], []
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        clients = [asyncio.create_task(client_loop(client, records, deadline)) for _ in range(args.concurrency)]
        print(HEADER, flush=True)
        start = time.monotonic()
        while time.monotonic() < deadline - 1:
            await asyncio.sleep(min(args.interval, max(deadline - time.monotonic(), 0)))
            edge = start + args.interval * len(rows)
            rows.append(interval_row(len(rows) + 1, [r for r in records if r[0] >= edge], server_pid, engine))
            print_row(rows[-1])
        await asyncio.gather(*clients)
    return rows, records, start


def settle(url: str, seconds: float = 30) -> dict:
    """The engine's gauges once the load stops (every dropped or timed-out request must have left it), and
    its abort and prefix-cache counters."""
    gauges = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        gauges = {name: float(line.split()[-1]) for line in text.splitlines() for name in
                  ("num_requests_running", "num_requests_waiting", "sequences_aborted_total",
                   "prefix_cache_queries_total", "prefix_cache_hits_total")
                  if line.startswith((f"mistral7b_{name} ", f"mistral7b:{name} "))}
        if gauges.get("num_requests_running") == 0 and gauges.get("num_requests_waiting") == 0:
            break
        time.sleep(1)
    return gauges


def drift(first, last) -> float | None:
    return None if not first or not last or first != first or last != last else (last - first) / first


def pooled_p99(records: list, begin: float, end: float) -> float:
    return percentile([s for t, _, o, s in records if o == "ok" and begin <= t < end], 99)


def targets(rows: list[dict], warmup: int, after: dict, records: list, start: float, interval: float) -> dict:
    """The issue's targets: RSS from the first interval after warm-up to the last; p99 latency of the first
    third of that time against the last third, every request in them pooled (one interval's p99 is its
    one or two slowest requests, and their kinds: -27% and +18.7% between 5-minute runs of the same
    code); and no request left in the engine once the load stops."""
    steady = rows[warmup:] or rows[-1:]
    first, last = steady[0], steady[-1]
    begin, end = start + interval * (first["interval"] - 1), start + interval * last["interval"]
    third = (end - begin) / 3
    early, late = pooled_p99(records, begin, begin + third), pooled_p99(records, end - third, end + interval)
    fives = sum(n for row in rows for kind, n in row["errors"].items() if kind.startswith("HTTP 5"))
    out = {"compared": [first["interval"], last["interval"]], "http_5xx": fives,
           "errors": sum(sum(row["errors"].values()) for row in rows),
           "rss_server_drift": drift(first["rss_server_mib"], last["rss_server_mib"]),
           "rss_engine_drift": drift(first["rss_engine_mib"], last["rss_engine_mib"]),
           "p99_first_third_s": early, "p99_last_third_s": late, "p99_drift": drift(early, late)}
    rss = [d for d in (out["rss_server_drift"], out["rss_engine_drift"]) if d is not None]
    out["pass"] = {"no_5xx": fives == 0, "rss_drift_under_5pct": all(d < 0.05 for d in rss),
                   "p99_drift_under_10pct": out["p99_drift"] is not None and out["p99_drift"] < 0.10,
                   "idle_after_load": after.get("num_requests_running") == 0 and after.get("num_requests_waiting") == 0}
    return out


def print_summary(result: dict) -> None:
    t, verdict = result["targets"], {True: "ok", False: "MISSED"}
    pct = lambda d: "-" if d is None else f"{d:+.2%}"  # noqa: E731
    print(f"requests: {result['totals']}; after the load: {result['after_load']}")
    print(f"server exit {result['server_exit']}, tracebacks in its log {result['server_tracebacks']}; "
          f"drift from interval {t['compared'][0]} to {t['compared'][1]}:")
    print(f"  no 5xx            {t['http_5xx']:>8}  {verdict[t['pass']['no_5xx']]}")
    print(f"  RSS drift < 5%    {pct(t['rss_server_drift']):>8} server, {pct(t['rss_engine_drift'])} engine  "
          f"{verdict[t['pass']['rss_drift_under_5pct']]}")
    print(f"  p99 drift < 10%   {pct(t['p99_drift']):>8}  {verdict[t['pass']['p99_drift_under_10pct']]}  "
          f"(first third {t['p99_first_third_s']:.2f} s, last third {t['p99_last_third_s']:.2f} s)")
    print(f"  idle after load   {verdict[t['pass']['idle_after_load']]:>8}")


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mistral7b.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--log-level", "warning", "--model-name", MODEL]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--engine-in-process"] if args.engine_thread else []
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {})}
    log = open(args.server_log, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {args.server_log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.kill()
    raise SystemExit("the server did not become healthy in 10 minutes")


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)  # the drain path: exit 0 with no requests open
    try:
        return server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--concurrency", "-c", type=int, default=4, help="clients sending requests at once")
    ap.add_argument("--engine-thread", action="store_true", help="the engine on a thread of the server (serve --engine-in-process)")
    ap.add_argument("--model", help="checkpoint to serve (default: the bundled SmolLM2-135M GGUF)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the server (on a shared CPU, 1 keeps "
                    "torch's threads from spinning against other jobs)")
    ap.add_argument("--interval", type=float, default=60, help="seconds per recorded row")
    ap.add_argument("--warmup", type=int, default=1, help="intervals left out of the drift comparison")
    ap.add_argument("--request-timeout", type=float, default=300, help="client timeout of the other requests")
    ap.add_argument("--server-log", default="soak_server.log")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows, targets and settings here")
    args = ap.parse_args(argv)
    random.seed(args.seed)
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop the server on either, even when started in the background
        signal.signal(sig, signal.default_int_handler)
    server, url = start_server(args)
    engine = None if args.engine_thread else engine_pid(server.pid)
    print(f"server pid {server.pid} at {url}, engine {f'process pid {engine}' if engine else 'thread'}", flush=True)
    try:
        rows, records, start = asyncio.run(soak(url, server.pid, engine, args))
        after = settle(url)
    finally:
        exit_code = stop_server(server)
    totals = collections.Counter(o if o in ("ok", "asked") else "error: " + o for _, _, o, _ in records)
    result = {"settings": vars(args), "totals": dict(totals), "after_load": after, "rows": rows,
              "targets": targets(rows, args.warmup, after, records, start, args.interval), "server_exit": exit_code,
              "server_tracebacks": Path(args.server_log).read_text().count("Traceback")}
    print("\n" + HEADER)
    for row in rows:
        print_row(row)
    print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(result["targets"]["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
