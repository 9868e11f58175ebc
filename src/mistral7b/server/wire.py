"""The messages between the HTTP process and the engine process: JSON objects, one per
`Connection.send_bytes` frame (length-prefixed by `multiprocessing.connection`), never pickle.

HTTP -> engine: `add` (id, prompt ids, sampling params without stop strings, the LoRA adapter's name
or none), `abort` (ids), `load_lora` (name, path) and `unload_lora` (name), each with a call number,
`stop`.
Engine -> HTTP: `ready` (the limits the HTTP side validates against), `step` (every output of one
engine step in one message, with the engine's counters), `failed` (a step raised: these requests
were dropped), `lora` (a load's or unload's answer: its call number, the error or none, and the
adapters now loaded), `fatal` (the engine could not start).

JSON, not msgpack or msgspec: no new dependency (nor a wheel to ship to the GPU box). Its cost is
measured by benchmarks/serve_wire.py: a step of 64 requests x 8 tokens is a 7 KB frame, about 2x
pickle's time to encode and decode, and with top-5 logprobs 90 KB and up to ~9x (floats are slow in
JSON); if the GPU run shows it on the step's critical path, msgspec is the drop-in to take. Python's
json writes floats exactly (repr) and allows -Infinity, which a masked token's logprob can be.
"""

from __future__ import annotations

import dataclasses
import json

from ..engine.request import TokenLogprob
from ..sampling import SamplingParams

_encoder = json.JSONEncoder(separators=(",", ":"))
_decoder = json.JSONDecoder()


def encode(message: dict) -> bytes:
    return _encoder.encode(message).encode()


def decode(frame: bytes) -> dict:
    return _decoder.decode(frame.decode())


# -- HTTP -> engine ---------------------------------------------------------------------------------


def add(request_id: str, prompt_ids: list[int], params: SamplingParams, lora: str | None = None) -> dict:
    """Stop strings stay behind: the HTTP process applies them and aborts the request when one matches.
    `lora`: the name of a loaded adapter to run the request with (the engine process looks it up)."""
    fields = dataclasses.asdict(params)
    fields["stop"] = []
    if params.logit_bias is not None:  # JSON object keys are strings: send pairs
        fields["logit_bias"] = list(params.logit_bias.items())
    return {"op": "add", "id": request_id, "prompt": prompt_ids, "params": fields, "lora": lora}


def params_of(fields: dict) -> SamplingParams:
    if fields.get("logit_bias") is not None:
        fields = {**fields, "logit_bias": {int(k): v for k, v in fields["logit_bias"]}}
    return SamplingParams(**fields)


def abort(request_ids: list[str]) -> dict:
    return {"op": "abort", "ids": request_ids}


STOP = {"op": "stop"}  # the HTTP process is closing: exit


# -- engine -> HTTP ---------------------------------------------------------------------------------


def output(request, tokens: list[int], finish_reason: str | None, logprobs: list | None, first: bool,
           accepting: list) -> list:
    """One request's part of a step: [id, tokens, finish_reason, logprobs, prompt_logprobs, accepting].
    `accepting` (constrained requests; one per token, as a speculative step emits several) says whether
    the grammar could end after that token: a stop string may end the value only there
    (output.TextStream.push)."""
    if logprobs is not None:
        logprobs = [_logprob(e) for e in logprobs]
    prompt = None
    if first and request.prompt_logprobs is not None:
        prompt = [None if e is None else _logprob(e) for e in request.prompt_logprobs]
    accepting = None if request._constraint is None else [bool(a) for a in accepting]
    return [request.id, tokens, finish_reason, logprobs, prompt, accepting]


def _logprob(e: TokenLogprob) -> list:
    return [e.token_id, e.logprob, e.top]


def logprob_of(entry) -> TokenLogprob:
    token_id, logprob, top = entry
    return TokenLogprob(token_id, logprob, None if top is None else [tuple(t) for t in top])
