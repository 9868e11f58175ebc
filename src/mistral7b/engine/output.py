"""The output processor: tokens in, final text out, with stop strings and hold-back.

Text that could still grow into a stop string is held back until the next tokens settle it, so a
stream never shows text that a stop string later removes.
"""

from __future__ import annotations

from .request import Delta, Request


class OutputProcessor:
    """Turns each token a request takes into a Delta of final text. It writes only the request's
    `TextStream`; the scheduler appends the token first and applies the finish reason after."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.default_stop_ids = frozenset(getattr(tokenizer, "stop_token_ids", None) or ())
        # False in an engine process: the HTTP process detokenises and applies stop strings.
        self.detokenize = True

    def prepare(self, request: Request, constraint=None) -> None:
        """Give a new request its stop tokens, its text stream (with a streaming decoder) and its grammar."""
        params = request.params
        eos = frozenset() if params.ignore_eos else self.default_stop_ids
        decoder = self.tokenizer.decoder() if self.tokenizer is not None and self.detokenize else None
        request.prepare(frozenset(params.stop_token_ids) | eos, TextStream(decoder, params.stop), constraint)

    @staticmethod
    def delta(request: Request, token: int, reason: str | None, accepting: bool | None) -> Delta:
        """The Delta of `token`, just appended to `request` with the token-level finish `reason` (None: it
        goes on): its final text, and "stop" instead if a stop string ends the request there. `accepting`
        (constrained requests): whether the grammar could end here, where alone a stop string may end it."""
        stop_token = token in request._stop_ids
        text, stopped = request._stream.push(None if stop_token else token, reason is not None, accepting)
        return Delta(request, text, [token], "stop" if stopped else reason, accepting)


class TextStream:
    """One request's text as its tokens arrive: decoded, cut at a stop string, held back where it could grow into one."""

    def __init__(self, decoder=None, stops: list[str] | None = None):
        self.decoder, self.stops = decoder, stops
        self.decoded = ""  # all text decoded so far, including what is held back
        self.scanned = 0  # characters of `decoded` already searched for stop strings
        self.held = 0  # trailing characters of those that could still grow into a stop string
        self.text = ""  # final text: stop strings removed, nothing held back

    def push(self, token: int | None, finished: bool, accepting: bool | None) -> tuple[str, bool]:
        """Decode `token` (None: a stop token, which has no text); (the text that became final, whether a
        stop string ends the request). A constrained value (`accepting` not None) is never cut: a stop
        string ends it, text whole, once the value is complete, and is ignored before."""
        if self.decoder is not None and token is not None:
            self.decoded += self.decoder.push(token)
        if finished and self.decoder is not None:
            self.decoded += self.decoder.flush()
        emitted, final, stopped = len(self.text), self.decoded, False
        if self.stops:
            cut, self.held = scan_stops(final, self.stops, self.scanned, self.held)
            self.scanned = len(final)
            if cut is not None and accepting is not None:
                cut, stopped = None, accepting
            if cut is not None:
                final, stopped = final[:cut], True
            elif not (finished or stopped):
                final = final[: len(final) - self.held]
        if len(final) > emitted:
            self.text = final
        return final[emitted:], stopped


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
