"""The output processor: tokens in, final text out, with stop tokens, stop strings and hold-back.

Text that could still grow into a stop string is held back until the next tokens settle it, so a
stream never shows text that a stop string later removes.
"""

from __future__ import annotations

import time

from .constraints import settle, stop_string_cut
from .request import Delta, Request, TokenLogprob


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.default_stop_ids = frozenset(getattr(tokenizer, "stop_token_ids", None) or ())

    def prepare(self, request: Request) -> None:
        """Set up a new request's stop tokens, logprob list and streaming decoder."""
        eos = frozenset() if request.params.ignore_eos else self.default_stop_ids
        request._stop_ids = frozenset(request.params.stop_token_ids) | eos
        if request.params.logprobs is not None:
            request.logprobs = []
        if self.tokenizer is not None:
            request._decoder = self.tokenizer.decoder()

    def apply(self, requests: list[Request], token_rows: list[list[int]], logprobs: list, deltas: list[Delta]) -> None:
        """Advance each request by its tokens, step by step (`token_rows[step][i]` is request i's)."""
        logprobs = [None if lp is None else [t.tolist() for t in lp] for lp in logprobs]
        now = time.monotonic()
        for step_tokens, lp in zip(token_rows, logprobs):
            for i, (request, token) in enumerate(zip(requests, step_tokens)):
                if request.finished:
                    continue
                if request.first_token_time is None:
                    request.first_token_time = now
                if lp is not None and request.logprobs is not None:
                    n = request.params.logprobs
                    top = list(zip(lp[2][i][:n], lp[1][i][:n]))
                    request.logprobs.append(TokenLogprob(token, lp[0][i], top))
                deltas.append(advance(request, token))


def advance(request: Request, token: int) -> Delta:
    """Append a token, apply stop rules, and return the text that became final."""
    params = request.params
    request.output_ids.append(token)
    is_stop_token = token in request._stop_ids
    if request._decoder is not None and not is_stop_token:
        request._decoded += request._decoder.push(token)
    if is_stop_token:
        request.finish_reason = "stop"
    elif len(request.output_ids) >= params.max_tokens:
        request.finish_reason = "length"
    if request._constraint is not None:
        settle(request, token)
    if request.finished and request._decoder is not None:
        request._decoded += request._decoder.flush()
    emitted = len(request.text)
    final = request._decoded
    if params.stop:
        cut = stop_string_cut(request, find_stop(final, params.stop, max(0, emitted - max(len(s) for s in params.stop))))
        if cut is not None:
            final = final[:cut]
            request.finish_reason = "stop"
        elif not request.finished:
            final = final[: len(final) - held_back(final, params.stop)]
    new_text = final[emitted:]
    request.text = final if len(final) > emitted else request.text
    if request.finished:
        request.finish_time = time.monotonic()
    return Delta(request, new_text, [token], request.finish_reason)


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the first stop string begins in `text[start:]`, or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
