"""Structured outputs in the engine: one grammar `Constraint` per constrained request (structured.py).

A request whose SamplingParams carry `json_schema`, `regex`, `grammar` or `choice` gets its Constraint
when it is added. Before each of its sampling steps (the first token after prefill, then every decode
step) the host fills its row of one shared bitmask [max_batch, ceil(vocab/32)], after the forward has
been queued on the device, so the masks are computed while the device runs the step; the sampler
applies the bitmask on the device. Unconstrained rows of the same batch get all-ones rows.

Speculative decoding (speculative.py) masks every verified position: `verify_bitmasks` feeds a row's
draft through its matcher to fill each position's mask, then rolls the matcher back.

Why constrained rows run one decode step at a time, never pipelined: the next mask needs the token
just chosen, on the host. While any constrained row decodes, the engine launches single steps and reads
their tokens at once; the unconstrained rows beside them lose multi-step decode for those steps only.

Ending: the grammar allows EOS only where the value is complete, so "stop" means a complete value; a
grammar that can go no further ends the request at once with "stop"; `max_tokens` cutting an
unfinished value gives "length"; a stop string never cuts a value: met inside an unfinished value it
is ignored, and once the value is complete it ends the request with the value whole (output.TextStream).
"""

from __future__ import annotations

import torch

from .. import structured
from .request import Request


class ConstraintManager:
    """Builds requests' constraints and fills the bitmask for a step (`settle` corrects their finish reasons)."""

    def __init__(self, tokenizer, vocab_size: int, max_batch: int, device: torch.device):
        self.tokenizer, self.vocab_size, self.max_batch, self.device = tokenizer, vocab_size, max_batch, device
        self._bitmask: torch.Tensor | None = None  # host int32 [max_batch, words], allocated on first use
        self._grammars: structured.GrammarCache | None = None  # compiled grammars and the mask threads

    def validate(self, params) -> None:
        if params.constrained and self.tokenizer is None:
            raise ValueError("structured outputs (json_schema, regex, grammar, choice) need a checkpoint with a tokenizer")

    def build(self, params) -> structured.Constraint | None:
        """The constraint of a request with `params`, or None if it has none (StructuredOutputError naming
        the problem if it does not compile)."""
        if not params.constrained:
            return None
        self.validate(params)
        if self._grammars is None:
            self._grammars = structured.GrammarCache(structured.ll_tokenizer(self.tokenizer, self.vocab_size))
        return structured.Constraint.from_params(params, self._grammars.ll_tokenizer, self._grammars)

    @staticmethod
    def any_constrained(requests: list[Request]) -> bool:
        return any(r._constraint is not None for r in requests)

    def bitmask(self, requests: list[Request]) -> torch.Tensor | None:
        """The device bitmask for one sampling step of `requests` (row i is requests[i]), or None when
        none of them is constrained. Call it after the step's forward is queued: it overlaps the device."""
        constrained = [(r._constraint, i) for i, r in enumerate(requests) if r._constraint is not None]
        if not constrained:
            return None
        if self._bitmask is None:
            self._bitmask = structured.allocate_bitmask(self.max_batch, self.vocab_size)
        rows = self._bitmask[: len(requests)]
        structured.fill_bitmask(rows, constrained, self._grammars)
        # Safe to reuse the pinned buffer next step: constrained steps are read (synchronised) at once.
        return rows.to(self.device, non_blocking=True)

    def verify_bitmasks(self, requests: list[Request], drafts: list[list[int]], width: int) -> torch.Tensor | None:
        """The device bitmasks [width, n, words] of a speculative verify, or None when no row is constrained.
        Position j of a constrained row is its grammar after its first j draft tokens: each verified position
        is masked as plain decoding would mask it there. Past the tokens the grammar allows (or a stop token)
        a row stays all-ones: verification rejects or ends the row before it gets there. Each matcher is
        rolled back to where it began, so the scheduler then consumes the accepted tokens and the
        target's own, exactly as in plain decoding: a rejected draft leaves no trace in the grammar."""
        constrained = [(r._constraint, i) for i, r in enumerate(requests) if r._constraint is not None]
        if not constrained:
            return None
        host = structured.allocate_bitmask(width * len(requests), self.vocab_size).view(width, len(requests), -1)
        for constraint, i in constrained:
            draft, stops = drafts[i], requests[i]._stop_ids
            usable = constraint.valid_prefix(draft)
            consumed = 0
            for j in range(width):
                constraint.fill(host[j], i)
                if j >= usable or draft[j] in stops:  # a stop token ends the row: it is never consumed
                    break
                constraint.consume(draft[j])
                consumed += 1
            constraint.rollback(consumed)
        return host.to(self.device)


def settle(constraint, token: int, stop_ids: frozenset, reason: str | None) -> str | None:
    """Advance a constrained request's grammar by `token` and correct the finish `reason` that the stop
    rules gave it (scheduler.stop_reason): "stop" only on a complete value."""
    if token not in stop_ids and not constraint.consume(token):
        # The sampler only picks allowed tokens, so this means the matcher failed: end as unfinished.
        return "length"
    reason = structured.finish_reason(constraint, reason)
    if reason == "length" and constraint.is_stopped() and constraint.is_accepting():
        reason = "stop"  # the last token allowed completed the value
    return reason
