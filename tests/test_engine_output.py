"""Stop strings in the output processor: the incremental tail search equals a naive search of the
whole text, token by token, and its work per token does not grow with the output."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mistral7b.engine.output import OutputProcessor, TextStream, scan_stops
from mistral7b.engine.request import Request
from mistral7b.engine.scheduler import Scheduler
from mistral7b.sampling import SamplingParams


def naive(text: str, stops: list[str]) -> tuple[int | None, int]:
    """Search the whole text; the held-back suffix by trying every length."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), 0
    hold = max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)
    return None, hold


texts = st.text(alphabet="abc", max_size=60)


@settings(max_examples=250, deadline=None)
@given(chunks=st.lists(st.text(alphabet="abc", max_size=5), max_size=25),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=8), min_size=1, max_size=4))
def test_scan_stops_equals_naive_search(chunks, stops):
    text, scanned, held = "", 0, 0
    for chunk in chunks:
        text += chunk
        got = scan_stops(text, stops, scanned, held)
        assert got == naive(text, stops), (text, stops)
        if got[0] is not None:
            break
        scanned, held = len(text), got[1]


def _request(params: SamplingParams, pieces: list[str]) -> Request:
    request = Request([1], params)
    request.prepare(frozenset(), TextStream(_Decoder(pieces), params.stop))
    return request


def advance(request: Request, token: int):
    """One token through the scheduler and the output processor, as the engine takes it."""
    (delta,) = Scheduler(1, 1, 1, output=OutputProcessor()).update_from_output([request], [[token]], [None])
    return delta


class _Decoder:
    """Token id i decodes to PIECES[i] (a stand-in for the tokenizer's streaming decoder)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, token):
        return self.pieces[token]

    def flush(self):
        return ""


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab", max_size=4), min_size=1, max_size=6),
       tokens=st.lists(st.integers(0, 5), min_size=1, max_size=30),
       stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=6), min_size=1, max_size=3))
def test_advance_text_is_the_naive_cut(pieces, tokens, stops):
    """Streamed text never shows a stop string, and the final text is cut where a naive search cuts."""
    tokens = [t % len(pieces) for t in tokens]
    request = _request(SamplingParams(max_tokens=len(tokens), stop=stops), pieces)
    streamed = ""
    for token in tokens:
        streamed += advance(request, token).text
        if request.finished:
            break
    full = "".join(pieces[t] for t in tokens[: len(request.output_ids)])
    cut, _ = naive(full, stops)
    assert request.text == streamed == (full if cut is None else full[:cut])
    assert (request.finish_reason == "stop") == (cut is not None)


class _CountingStr(str):
    """A stop string that counts how many of its prefixes (or characters) are taken."""

    taken = 0

    def __getitem__(self, key):
        _CountingStr.taken += 1
        return str.__getitem__(self, key)


def test_long_stop_string_costs_little_per_token():
    """A 5,000-character stop string that the text never starts: the old held-back loop built one
    prefix per possible length (5,000 per token); the tail search looks at its first character."""
    stop = _CountingStr("b" * 4999 + "c")
    request = _request(SamplingParams(max_tokens=10_000, stop=[stop]), ["a" * 7])
    for _ in range(200):
        advance(request, 0)
    assert request.text == "a" * 1400
    assert _CountingStr.taken <= 2 * 200, _CountingStr.taken
