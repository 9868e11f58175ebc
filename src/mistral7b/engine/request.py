"""A request's state as it moves through the engine, and what one token adds to it."""

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
    text: str = ""  # final text: stop strings removed, nothing held back
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[TokenLogprob] | None = None
    # With params.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    row: int | None = None
    lora_slot: int = 0  # the LoRA adapter's slot in the model's bank (engine/adapters.py); 0: the base model
    n_prefilled: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    _decoder: object = None
    _constraint: object = None  # structured.Constraint of a json_schema/regex/grammar/choice request
    _stop_ids: frozenset = frozenset()
    _decoded: str = ""  # all text decoded so far, including what is held back
    _stop_scanned: int = 0  # characters of _decoded already searched for stop strings
    _stop_held: int = 0  # trailing characters of those that could still grow into a stop string

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
