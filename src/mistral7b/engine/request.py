"""A request's state as it moves through the engine, and what one token adds to it. Only Request's own
methods and the scheduler change a request; the output processor writes only its `TextStream`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..sampling import SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)  # a request equals only itself: membership tests (waiting queue, batches) by identity
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[TokenLogprob] | None = None
    # With params.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    row: int | None = None
    lora_slot: int = 0  # the LoRA adapter's slot in the model's bank (engine/adapters.py); 0: the base model
    lora_key: str | None = None  # that adapter's load key (engine/adapters.py), in its prefix-cache block keys
    n_prefilled: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    _constraint: object = None  # structured.Constraint of a json_schema/regex/grammar/choice request
    _stop_ids: frozenset = frozenset()
    _stream: object = None  # output.TextStream: the output processor's decoded text and stop-string scan

    def prepare(self, stop_ids: frozenset, stream, constraint=None) -> None:
        """Set what is fixed once the request is added: its stop tokens, its text stream, its grammar."""
        self._stop_ids, self._stream, self._constraint = stop_ids, stream, constraint
        if self.params.logprobs is not None:
            self.logprobs = []

    def append_token(self, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Append a token sampled at time `now` (and its log-probabilities, if the request asked for them)."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_ids.append(token)
        if logprob is not None and self.logprobs is not None:
            self.logprobs.append(logprob)

    def finish(self, reason: str) -> None:
        """End the request: "stop", "length" or "abort"."""
        self.finish_reason, self.finish_time = reason, time.monotonic()

    def add_prompt_logprobs(self, entries: list[TokenLogprob | None], first: bool) -> None:
        """Record prompt log-probabilities in prompt order; `first`: they begin at the first prompt token."""
        if first:
            self.prompt_logprobs = []
        self.prompt_logprobs.extend(entries)

    @property
    def text(self) -> str:
        """The final text: stop strings removed, nothing held back."""
        return "" if self._stream is None else self._stream.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.n_prefilled == len(self.prompt_ids)

    @property
    def position(self) -> int:
        """Position of the next token fed to the model."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of the prompt followed by the output, without joining the two lists (a
        long prompt's copy each draft step cost more than the step's own host work)."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]


@dataclass
class Delta:
    """What one token added to a request: new text (final), the token id, and the finish reason if this
    token ended the request. A multi-step decode yields several deltas per request; only the last of
    them carries the finish reason, even though the request itself has finished by the time any is read."""

    request: Request
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    # A constrained request's grammar could end after this token: a speculative step emits several
    # tokens, and the HTTP side of an engine process needs this per token for stop strings.
    accepting: bool | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
