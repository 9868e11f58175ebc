"""What one engine step's message costs on the engine-process channel (server/wire.py): encode +
decode of a step's outputs as JSON (what the channel sends), beside pickle (what it does not send,
as a yardstick), for a batch of requests with several tokens each, with and without logprobs.

    python benchmarks/serve_wire.py                       # 64 requests x 8 tokens
    python benchmarks/serve_wire.py --requests 256 --tokens 1
"""

from __future__ import annotations

import argparse
import pickle
import random
import timeit

from mistral7b.server import wire


def step_message(requests: int, tokens: int, top: int, rng: random.Random) -> dict:
    outputs = []
    for i in range(requests):
        ids = [rng.randrange(32000) for _ in range(tokens)]
        logprobs = None
        if top:
            logprobs = [[t, -rng.random() * 5, [[rng.randrange(32000), -rng.random() * 5] for _ in range(top)]]
                        for t in ids]
        outputs.append([f"cmpl-{rng.getrandbits(128):032x}-0", ids, None, logprobs, None, None])
    return {"op": "step", "out": outputs, "stats": {"steps": 12345, "aborted": 3, "prefix": None}}


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8, help="tokens per request in the step (decode_steps)")
    ap.add_argument("--number", type=int, default=200)
    args = ap.parse_args(argv)
    rng = random.Random(0)
    print(f"one step: {args.requests} requests x {args.tokens} tokens")
    print(f"{'logprobs':<10} {'bytes json':>10} {'json us':>9} {'bytes pickle':>12} {'pickle us':>10} {'json/pickle':>11}")
    for top in (0, 5):
        message = step_message(args.requests, args.tokens, top, rng)
        frame, pickled = wire.encode(message), pickle.dumps(message)
        assert wire.decode(frame) == message
        json_us = per_call_us(lambda: wire.decode(wire.encode(message)), args.number)
        pickle_us = per_call_us(lambda: pickle.loads(pickle.dumps(message)), args.number)
        label = f"top {top}" if top else "none"
        print(f"{label:<10} {len(frame):>10} {json_us:>9.1f} {len(pickled):>12} {pickle_us:>10.1f} "
              f"{json_us / pickle_us:>11.2f}")


if __name__ == "__main__":
    main()
