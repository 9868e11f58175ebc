"""Structured outputs: grammar-constrained decoding with llguidance.

A request with `json_schema`, `regex`, `grammar` (Lark or GBNF) or `choice` gets a `Constraint`: an
llguidance matcher that, before every step, writes the set of tokens the grammar allows as one row
of a shared int32 bitmask [rows, ceil(vocab / 32)], and after it consumes the token chosen. The
bitmask goes to the device and the batched sampler (`sampling.sample(..., bitmask=...)`) sets the
forbidden logits to -inf before greedy/top-k/top-p, so constrained and free rows share one batch
(a free row's bitmask row is all ones).

Why llguidance, not xgrammar (benchmarks/structured_bench.py --compare-xgrammar, 2-core CPU shared
with other jobs, a nested 6-field record schema, vocab 49152): a new schema costs llguidance ~26 ms
to a usable matcher (its lexer is built lazily while masks are computed) against xgrammar's 240 ms
up-front compile, and a cached one 0.5 ms; that is the time to first token of a new schema. Per
step, filling 8 rows takes llguidance ~0.6 ms (xgrammar 0.08 ms, from its precomputed masks); both
are far under a 7B batch-8 decode step (4 ms on an H200) and are hidden behind it (see below).
llguidance also has no dependencies (xgrammar pulls in transformers, triton, pydantic and
apache-tvm-ffi). Both write the same bitmask layout, so the engine does not depend on the pick.

End of a constrained request. EOS (and the model's end-of-turn tokens) are in the mask only where
the grammar accepts, so a request ends with "stop" only on a complete value; when the grammar can go
no further (`is_stopped`) only EOS is allowed. If `max_tokens` cuts it first, the finish reason is
"length" and `is_accepting()` is False: the text is an unfinished value.

How the engine drives it (one decode step t, after the forward for step t was queued on the GPU):

    constraints = [Constraint.from_params(r.params, info) for r in requests]   # at admission
    bitmask = allocate_bitmask(max_batch, vocab_size)                          # pinned, once
    # step t: tokens of step t-1 were consumed already; compute masks while the GPU runs forward t
    fill_bitmask(bitmask, [(c, i) for i, c in enumerate(constraints) if c is not None])
    device_mask = bitmask[:n].to(device, non_blocking=True)
    tokens = sample(logits, sampler, rows, index, greedy, bitmask=device_mask)
    # then, with the tokens on the host: consume_tokens([(c, token), ...]); a False (rejected
    # token) or c.is_stopped() ends that request; the next forward can be queued before this.

Rows whose constraint is None keep all bits set. Multi-step decode on the device (several steps
without a host round trip) cannot run constrained rows: their next mask needs the token just chosen.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

# JSON is written compactly with json.dumps' separators: free whitespace lets a small model pad
# forever. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """A schema, regex, grammar or choice list that cannot be compiled; the message names the problem."""


# ---- grammars ---------------------------------------------------------------------------------


def json_schema_grammar(schema) -> str:
    """The llguidance grammar of a JSON schema (a dict, or its JSON text)."""
    from llguidance import LLMatcher

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise StructuredOutputError(f"invalid json_schema: {e}") from None


def choice_grammar(choices) -> str:
    from llguidance import LLMatcher

    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise StructuredOutputError("choice must be a non-empty list of non-empty strings")
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def regex_grammar(pattern) -> str:
    from llguidance import LLMatcher

    if not isinstance(pattern, str) or not pattern:
        raise StructuredOutputError("regex must be a non-empty string")
    return LLMatcher.grammar_from_regex(pattern)


def lark_grammar(text) -> str:
    """A Lark grammar (llguidance's dialect) or a llama.cpp GBNF grammar."""
    import llguidance

    if not isinstance(text, str) or not text.strip():
        raise StructuredOutputError("grammar must be a non-empty Lark or GBNF grammar")
    try:
        return llguidance.grammar_from("grammar", text)
    except ValueError as e:
        raise StructuredOutputError(f"invalid grammar: {e}") from None


_BUILDERS = {"json_schema": json_schema_grammar, "regex": regex_grammar, "grammar": lark_grammar,
             "choice": choice_grammar}


def grammar_of(params) -> tuple[str, str] | None:
    """(kind, llguidance grammar text) of a SamplingParams' constraint, or None if it has none."""
    given = [kind for kind in _BUILDERS if getattr(params, kind, None) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise StructuredOutputError(f"give at most one of json_schema, regex, grammar, choice (got {', '.join(given)})")
    return given[0], _BUILDERS[given[0]](getattr(params, given[0]))


def check(kind: str, grammar: str) -> None:
    """Raise StructuredOutputError naming the problem if the grammar does not compile."""
    error = _grammar_error(grammar)
    if error:
        raise StructuredOutputError(f"invalid {kind}: {error.strip()}")


@functools.lru_cache(maxsize=256)
def _grammar_error(grammar: str) -> str:
    """"" or why the grammar does not compile (a pure function of the text, so memoized)."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(grammar)


def validate_params(params) -> None:
    """SamplingParams' hook: a constraint that is malformed or fails to compile raises here."""
    found = grammar_of(params)
    if found is not None:
        check(*found)


# ---- tokenizer --------------------------------------------------------------------------------


class _SentencePieceVocab:
    """llguidance's byte-level view of a SentencePiece model (llguidance.TokenizerWrapper's interface):
    token bytes with "▁" as a space and <0xXX> pieces as their byte; control tokens get llguidance's
    0xFF prefix, so grammars can name them (`<[TOOL_CALLS]>`) and text never matches them."""

    def __init__(self, sp):
        self._sp = sp
        self._dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")  # add_dummy_prefix is on
        self.bos_token_id, self.eos_token_id = sp.bos_id(), sp.eos_id()
        self.tokens, self.special_token_ids = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(b"\xff" + piece.encode())
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())

    def __call__(self, text: str) -> list[int]:
        """Ids of `text` without SentencePiece's dummy-prefix space (llguidance tokenizes fragments)."""
        if isinstance(text, bytes):
            raise TypeError("text, not bytes")  # TokenizerWrapper then passes str
        pieces = self._sp.encode(text, out_type=str)
        if pieces and pieces[0].startswith("\u2581") and self._dummy_prefix:
            rest = pieces[0][1:]
            pieces[0:1] = [] if not rest else [rest] if self._sp.piece_to_id(rest) != self._sp.unk_id() else [
                f"<0x{b:02X}>" for b in rest.encode()]
        return [self._sp.piece_to_id(p) for p in pieces]


def ll_tokenizer(tokenizer, vocab_size: int | None = None):
    """The llguidance tokenizer of one of our `Tokenizer`s (~0.3 s: its owner, a GrammarCache, keeps it).

    `vocab_size` is the model's (its logits' width): ids past the tokenizer's own are never allowed.
    EOS for the grammar is every stop token of the chat format (</s>, <|im_end|>...).
    """
    from llguidance import LLTokenizer, TokenizerWrapper

    eos = sorted(tokenizer.stop_token_ids) or None
    sp, hf = getattr(tokenizer, "_sp", None), getattr(tokenizer, "_hf", None)
    if sp is not None:
        return LLTokenizer(TokenizerWrapper(_SentencePieceVocab(sp)), n_vocab=vocab_size, eos_token=eos)
    if hf is not None:  # tokenizer.json, and GGUF vocabularies rebuilt as `tokenizers` models
        return LLTokenizer(hf.to_str(), n_vocab=vocab_size, eos_token=eos)
    raise StructuredOutputError(f"structured outputs need a SentencePiece or tokenizers backend ({tokenizer!r})")


# ---- compile cache and per-request matchers ---------------------------------------------------


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    compile_seconds: float = 0.0  # summed over misses


class GrammarCache:
    """One tokenizer's compiled grammars keyed by grammar text, least recently used dropped first, and
    the llguidance thread pool that fills their masks for large batches (made on first use, freed with
    the cache).

    A cached entry is a pristine matcher; each request gets a `deep_copy()` (microseconds), which
    shares the compiled grammar and the lexer states built so far, so a repeated schema skips
    compilation and starts with warm masks.
    """

    def __init__(self, ll_tok, max_size: int = 64):
        self.ll_tokenizer, self.max_size = ll_tok, max_size
        self._entries: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # the server validates on its loop while the engine thread admits
        self._executor = None
        self.stats = CacheStats()

    def executor(self, rows: int):
        """The thread pool for filling `rows` masks, or None where one thread is faster."""
        if rows < _PARALLEL_ROWS or (os.cpu_count() or 1) < 8:
            return None
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor(num_threads=max(2, min(8, (os.cpu_count() or 2) // 2)))
        return self._executor

    def matcher(self, kind: str, grammar: str):
        from llguidance import LLMatcher

        with self._lock:
            pristine = self._entries.get(grammar)
            if pristine is not None:
                self._entries.move_to_end(grammar)
                self.stats.hits += 1
                return pristine.deep_copy()
        start = time.perf_counter()
        pristine = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if pristine.is_error():
            raise StructuredOutputError(f"invalid {kind}: {pristine.get_error().strip()}")
        with self._lock:
            self.stats.misses += 1
            self.stats.compile_seconds += time.perf_counter() - start
            self._entries[grammar] = pristine
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
        return pristine.deep_copy()


class Constraint:
    """One request's grammar state: consume tokens, fill its bitmask row, say whether it may end."""

    def __init__(self, matcher, kind: str):
        self.matcher, self.kind = matcher, kind

    @classmethod
    def from_params(cls, params, ll_tok, cache: GrammarCache | None = None) -> "Constraint | None":
        """The constraint a SamplingParams asks for (None if it has none), compiled through the cache
        (without one: compiled afresh)."""
        found = grammar_of(params)
        if found is None:
            return None
        kind, grammar = found
        return cls((cache or GrammarCache(ll_tok, max_size=0)).matcher(kind, grammar), kind)

    def consume(self, token: int) -> bool:
        """Advance by the token chosen; False if the grammar rejects it (the matcher is then in error)."""
        return self.matcher.consume_token(int(token))

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the grammar allows from here, without consuming any."""
        return self.matcher.validate_tokens([int(t) for t in tokens])

    def rollback(self, n: int) -> None:
        """Undo the last `n` tokens consumed (a speculative draft's, once its masks are filled)."""
        if n and not self.matcher.rollback(n):
            raise RuntimeError(f"the grammar could not roll back {n} tokens: {self.error}")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits for the next step into `bitmask[row]` (a CPU int32 tensor)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, row)

    def is_accepting(self) -> bool:
        """The text so far is a complete value: ending here is valid."""
        return self.matcher.is_accepting()

    def is_stopped(self) -> bool:
        """Nothing but EOS can follow (the value is complete and cannot grow, or the matcher failed)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


# ---- batch helpers ----------------------------------------------------------------------------

_PARALLEL_ROWS = 8  # fewer rows: a thread pool's wake-ups cost more than the masks (0.6 vs 3 ms for 8 on 2 cores)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A host int32 bitmask [rows, ceil(vocab/32)], all tokens allowed; pinned when CUDA is there."""
    from llguidance.torch import allocate_token_bitmask

    return allocate_token_bitmask(rows, vocab_size)


def fill_bitmask(bitmask: torch.Tensor, constrained: list[tuple[Constraint, int]],
                 cache: GrammarCache | None = None) -> None:
    """Fill the rows of constrained requests (in `cache`'s threads for large batches on large hosts)
    and set every other row to all-allowed."""
    from llguidance.torch import fill_next_token_bitmask_par

    taken = {row for _, row in constrained}
    free = [row for row in range(bitmask.shape[0]) if row not in taken]
    if free:
        bitmask[free] = -1
    executor = cache.executor(len(constrained)) if cache is not None else None
    if executor is not None:
        fill_next_token_bitmask_par(executor, [(c.matcher, row) for c, row in constrained], bitmask)
    else:
        for constraint, row in constrained:
            constraint.fill(bitmask, row)


def consume_tokens(pairs: list[tuple[Constraint, int]]) -> list[bool]:
    """Advance several constraints by their tokens; False where the grammar rejected the token."""
    return [c.consume(t) for c, t in pairs]


def finish_reason(constraint: Constraint | None, reason: str | None) -> str | None:
    """The finish reason of a constrained request: ending is "stop" only on a complete value.

    A request that the grammar has completed (`is_stopped`) finishes now with "stop"; "length"
    stays "length" (unfinished value); a stop string met before the value is complete does not end it.
    """
    if constraint is None:
        return reason
    if reason is None and constraint.is_stopped() and constraint.is_accepting():
        return "stop"
    if reason == "stop" and not constraint.is_accepting():
        return None
    return reason
