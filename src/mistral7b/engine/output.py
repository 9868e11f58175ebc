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
        # False in an engine process: the HTTP process detokenises and applies stop strings (emit_text).
        self.detokenize = True

    def prepare(self, request: Request) -> None:
        """Set up a new request's stop tokens, logprob list and streaming decoder."""
        eos = frozenset() if request.params.ignore_eos else self.default_stop_ids
        request._stop_ids = frozenset(request.params.stop_token_ids) | eos
        if request.params.logprobs is not None:
            request.logprobs = []
        if self.tokenizer is not None and self.detokenize:
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
    finish_token(request, token)
    delta = emit_text(request, token)
    if request._constraint is not None:
        delta.accepting = request._constraint.is_accepting()
    return delta


def finish_token(request: Request, token: int) -> None:
    """The token-level rules (what an engine process applies): append it; stop token, max_tokens, grammar."""
    request.output_ids.append(token)
    if token in request._stop_ids:
        request.finish_reason = "stop"
    elif len(request.output_ids) >= request.params.max_tokens:
        request.finish_reason = "length"
    if request._constraint is not None:
        settle(request, token)


def emit_text(request: Request, token: int) -> Delta:
    """The text rules, after `finish_token` (the HTTP process applies them to the engine process's tokens):
    decode `token`, cut at a stop string or hold back what could grow into one; the Delta of final text."""
    params = request.params
    if request._decoder is not None and token not in request._stop_ids:
        request._decoded += request._decoder.push(token)
    if request.finished and request._decoder is not None:
        request._decoded += request._decoder.flush()
    emitted = len(request.text)
    final = request._decoded
    if params.stop:
        cut, hold = scan_stops(final, params.stop, request._stop_scanned, request._stop_held)
        request._stop_scanned, request._stop_held = len(final), hold
        cut = stop_string_cut(request, cut)
        if cut is not None:
            final = final[:cut]
            request.finish_reason = "stop"
        elif not request.finished:
            final = final[: len(final) - hold]
    new_text = final[emitted:]
    request.text = final if len(final) > emitted else request.text
    if request.finished:
        request.finish_time = time.monotonic()
    return Delta(request, new_text, [token], request.finish_reason)


def scan_stops(text: str, stops: list[str], scanned: int, held: int) -> tuple[int | None, int]:
    """(where the first stop string begins in `text`, or None; how many trailing characters could still
    grow into one), given that `text[:scanned]` had no stop string and its last `held` characters were the
    longest such start. Only the tail that the new text `text[scanned:]` can complete is searched: a stop
    string ending in it begins at most max(len(stop)) - 1 characters before it, and a held-back suffix
    can only be the old one extended by new text, so each token costs O(new text + stop length), never
    O(output)."""
    longest = max(len(s) for s in stops)
    start = max(0, scanned - longest + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    if hits:
        return min(hits), 0
    return None, held_back(text, stops, held + len(text) - scanned)


def held_back(text: str, stops: list[str], limit: int | None = None) -> int:
    """Length of the longest suffix of `text` (at most `limit` characters) that is a proper prefix of a
    stop string. Candidates are the positions of each stop's first character (found at C speed), so a
    long stop string costs little unless the text keeps almost matching it."""
    n, best = len(text), 0
    for s in stops:
        k_max = min(len(s) - 1, n if limit is None else min(limit, n))
        i = text.find(s[0], n - k_max) if k_max > best else -1
        while 0 <= i and n - i > best:
            if s.startswith(text[i:]):
                best = n - i
                break
            i = text.find(s[0], i + 1)
    return best
