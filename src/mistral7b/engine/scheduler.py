"""Admission, cache rows, the prefill plan of each step, and every change to a request's state.

Each running sequence owns one row of the preallocated cache. Waiting requests take free rows in
arrival order; a finished or aborted request gives its row back at the start of the next step, never
in the middle of one. All of it is guarded by one lock, so requests can be added and aborted from any
thread while one thread steps the engine.

With a prefix cache, a request is looked up when its first prefill chunk is about to be planned (not
on admission), and held back while another request is computing a block of the prefix they share, so
a burst of requests with one system prompt computes it once (the recipe in `prefix_cache`'s docstring).

After each forward the scheduler updates the requests from its output (nano-vllm's `postprocess`,
vLLM's `update_from_output`): it appends the tokens, applies the stop rules, and asks the output
processor for each token's text, which may end the request at a stop string.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from .constraints import settle
from .prefix_cache import PrefixCache
from .request import Delta, Request, TokenLogprob


@dataclass
class PrefillChunk:
    """One prefill forward: `length` prompt tokens from offset `start` of each request, [B, length]."""

    requests: list[Request]
    start: int
    length: int


class Scheduler:
    def __init__(self, max_batch: int, chunk_size: int, prefill_budget: int, prefix: PrefixCache | None = None,
                 batch_invariant: bool = False, output=None):
        self.max_batch, self.chunk_size, self.prefill_budget = max_batch, chunk_size, prefill_budget
        self.output = output  # the OutputProcessor: each token of `update_from_output` to a Delta
        self.batch_invariant = batch_invariant
        self.prefix = prefix
        self.looked_up: set[Request] = set()  # requests already matched against the prefix cache
        self.waiting: deque[Request] = deque()
        self.rows: list[Request | None] = [None] * max_batch
        self.lock = threading.RLock()

    def add(self, request: Request, lora_slot: int = 0, lora_key: str | None = None) -> None:
        """Queue `request`, to run with the LoRA adapter in `lora_slot` (0: none), whose load key is `lora_key`."""
        with self.lock:
            request.lora_slot, request.lora_key = lora_slot, lora_key
            self.waiting.append(request)

    def abort(self, request: Request) -> None:
        """Drop a request wherever it is. A running request's row is freed at the start of the next step."""
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)
            if not request.finished:
                request.finish("abort")

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """Free finished rows, admit waiting requests into free rows; return (admitted, running)."""
        with self.lock:
            for request in self.rows:
                if request is not None and request.finished:
                    self.release(request)
            admitted = []
            for row in range(self.max_batch):
                if not self.waiting:
                    break
                if self.rows[row] is None:
                    request = self.waiting.popleft()
                    request.row = row
                    self.rows[row] = request
                    admitted.append(request)
            return admitted, [r for r in self.rows if r is not None]

    def release(self, request: Request) -> None:
        with self.lock:
            if request.row is not None:
                self.rows[request.row] = None
                request.row = None
            self.looked_up.discard(request)

    @staticmethod
    def prefilled(chunk: PrefillChunk) -> list[int]:
        """Count a prefill chunk as computed; the indices of its requests whose prompt is now complete."""
        for request in chunk.requests:
            request.n_prefilled += chunk.length
        return [i for i, request in enumerate(chunk.requests) if request.prefilled]

    def update_from_output(self, requests: list[Request], token_rows: list[list[int]], logprobs: list) -> list[Delta]:
        """Advance each request by its sampled tokens, step by step (`token_rows[step][i]` is request i's;
        `logprobs[step]` theirs, or None): append each, end the request on a stop token, max_tokens, its
        grammar or a stop string (dropping its later tokens); the deltas, in order."""
        logprobs = [None if lp is None else [t.tolist() for t in lp] for lp in logprobs]
        now, deltas = time.monotonic(), []
        for step_tokens, lp in zip(token_rows, logprobs):
            for i, (request, token) in enumerate(zip(requests, step_tokens)):
                if request.finished:
                    continue
                request.append_token(token, _logprob(lp, i, token, request.params.logprobs), now)
                reason = stop_reason(request, token)
                accepting = None if request._constraint is None else request._constraint.is_accepting()
                deltas.append(self.output.delta(request, token, reason, accepting))
                if deltas[-1].finished:
                    request.finish(deltas[-1].finish_reason)
        return deltas

    def plan_prefill(self, pending: list[Request]) -> list[PrefillChunk]:
        """Up to `prefill_budget` prompt tokens, oldest request first, each request at most one chunk.
        Requests at the same offset share one forward ([B, n] tokens), so a burst of new prompts costs
        a few large forwards rather than one small forward each. Batch-invariant: a chunk ends where the
        request alone would end it, and requests share a forward only when their chunks are equal (a
        chunk boundary changes the attention kernel, and with it a greedy answer: issue 26)."""
        if self.prefix is not None:
            pending = self._look_up(pending)
        budget, plan = self.prefill_budget, []
        while pending and budget > 0:
            start = pending[0].n_prefilled
            cap = self.prefill_budget if self.batch_invariant else budget  # a fixed cap, or what is left
            n = self.chunk_length(pending[0], cap)
            if n > budget:
                break  # batch-invariant: the oldest request's next chunk waits for a step with room
            if self.batch_invariant:
                group = [r for r in pending if r.n_prefilled == start and self.chunk_length(r, cap) == n]
            else:
                group = [r for r in pending if r.n_prefilled == start and len(r.prompt_ids) - start >= n]
            group = group[: max(1, budget // n)]
            if self.prefix is not None:
                for request in group:
                    if request not in self.looked_up:  # a miss: count it (row empty)
                        self.prefix.load(request.row, request.prompt_ids, request.lora_key)
                        self.looked_up.add(request)
            plan.append(PrefillChunk(group, start, n))
            budget -= n * len(group)
            pending = [r for r in pending if r not in group]
        return plan

    def chunk_length(self, request: Request, budget: int) -> int:
        """The next prefill chunk of `request`: at most `chunk_size` and `budget` tokens."""
        start = request.n_prefilled
        n = min(self.chunk_size, budget, len(request.prompt_ids) - start)
        if self.prefix is not None:  # the oldest incomplete block must still be in the row to store it
            n = min(n, self.prefix.max_chunk(start))
            if self.batch_invariant:  # end at each block, where a prefix hit may start the next chunk
                n = min(n, self.prefix.block_size - start % self.prefix.block_size)
        return n

    def _look_up(self, pending: list[Request]) -> list[Request]:
        """Restore cached prefixes into the rows of requests about to start; return those that may be
        planned now, without the ones held back until another request has stored a block they share."""
        prefix, ready = self.prefix, []
        busy = [(r.prompt_ids, r.n_prefilled, r.lora_key) for r in pending if r in self.looked_up]
        for request in pending:
            if request in self.looked_up:
                ready.append(request)
                continue
            if prefix.waits_for(request.prompt_ids, busy, request.lora_key):
                continue
            # Prompt log-probabilities need every prompt position's logits: such a request computes its prompt.
            if request.params.prompt_logprobs is None and prefix.peek(request.prompt_ids, request.lora_key) > 0:
                request.n_prefilled = prefix.load(request.row, request.prompt_ids, request.lora_key)
                self.looked_up.add(request)
            # About to compute its first uncached block: later requests sharing it wait for it.
            busy.append((request.prompt_ids, request.n_prefilled, request.lora_key))
            ready.append(request)
        return ready

    @property
    def n_running(self) -> int:
        return sum(r is not None and not r.finished for r in self.rows)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        """True while anything is queued, running, or holds a row that the next step must free."""
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def prefilling(self) -> bool:
        """True while a request waits for a row or has prompt tokens left to prefill."""
        return bool(self.waiting) or any(not r.prefilled for r in self.rows if r is not None)


def stop_reason(request: Request, token: int) -> str | None:
    """The token-level rules (what an engine process applies) for `token`, just appended: a stop token,
    max_tokens, the grammar; the finish reason, or None."""
    reason = None
    if token in request._stop_ids:
        reason = "stop"
    elif len(request.output_ids) >= request.params.max_tokens:
        reason = "length"
    if request._constraint is not None:
        reason = settle(request._constraint, token, request._stop_ids, reason)
    return reason


def _logprob(step: list | None, i: int, token: int, n: int | None) -> TokenLogprob | None:
    """Row i's entry of one step's (chosen, top values, top ids) lists, when its request asked for `n`."""
    if step is None or n is None:
        return None
    return TokenLogprob(token, step[0][i], list(zip(step[2][i][:n], step[1][i][:n])))
