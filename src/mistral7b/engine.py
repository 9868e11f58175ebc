"""The engine: continuous batching over a preallocated rolling-buffer cache.

Each running sequence owns one row of the cache. Every `step()` admits waiting requests into free
rows, pushes a bounded number of prompt tokens through chunked prefill (so a long prompt never stalls
the streams already running), then advances every decoding row by one token in a single forward.
Sequences join and leave the batch at every step. `LLM.generate` and the HTTP server both drive it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .model import Transformer
from .sampling import SamplerBatch, SamplingParams, sample, top_logprobs


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: str = ""
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # final text: stop strings removed, nothing held back
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[TokenLogprob] | None = None
    row: int | None = None
    n_prefilled: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    _decoder: object = None
    _decoded: str = ""  # all text decoded so far, including what is held back

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch: int = 8,
        chunk_size: int | None = None,
        prefill_budget: int | None = None,
        max_seq_len: int | None = None,
        decode_steps: int | None = None,
        compile: bool = False,
    ):
        config = model.config
        self.model, self.tokenizer, self.config = model, tokenizer, config
        windows = [w for w in config.layer_windows() if w is not None]
        self.chunk_size = chunk_size or (max(windows) if windows else 4096)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        self.prefill_budget = prefill_budget or self.chunk_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(config, max_batch, self.device, self.dtype, max_seq_len)
        self.max_batch = max_batch
        self.sampler = SamplerBatch(max_batch, config.vocab_size, self.device)
        self.waiting: deque[Request] = deque()
        self.rows: list[Request | None] = [None] * max_batch
        self.lock = threading.RLock()
        self._ids = itertools.count()
        self.default_stop_ids = set(getattr(tokenizer, "stop_token_ids", None) or ())
        self.decode_steps = decode_steps or (8 if self.device.type == "cuda" else 1)
        self.compiled = compile
        self._decode_fn = self._compile_decode() if compile else self._eager_decode

    def _compile_decode(self):
        """torch.compile with CUDA graphs over all `max_batch` rows. The cache buffers keep fixed
        addresses, so the recorded graphs update them in place; kv_len is bucketed by `_kv_len`."""
        for layer in self.cache.layers:
            for t in (layer.k, layer.v, layer.pos):
                torch._dynamo.mark_static_address(t)
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        # dynamic=None: after a second kv_len bucket is seen, kv_len becomes symbolic (one recompile),
        # and CUDA graphs are then recorded per bucket without compiling again.
        return torch.compile(self._eager_decode, mode=mode, fullgraph=True)

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.config.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size}), got {bad[:3]}")
        limit = self.cache.max_positions
        if limit is not None and len(prompt_ids) + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt_ids) + params.max_tokens} exceeds this model's context of {limit} tokens "
                "(it has no sliding window)"
            )

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        self.validate(prompt_ids, params)
        request = Request(list(prompt_ids), params, request_id or f"req-{next(self._ids)}")
        if params.logprobs is not None:
            request.logprobs = []
        if self.tokenizer is not None:
            request._decoder = self.tokenizer.decoder()
        with self.lock:
            self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Drop a request wherever it is. Safe from any thread: a running request's cache row is
        released at the start of the next step, never in the middle of one."""
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)
            if not request.finished:
                request.finish_reason = "abort"
                request.finish_time = time.monotonic()

    @property
    def n_running(self) -> int:
        return sum(r is not None and not r.finished for r in self.rows)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        """True while anything is queued, running, or holds a row that the next step must free."""
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # -- one iteration ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Delta]:
        with self.lock:
            for request in self.rows:
                if request is not None and request.finished:
                    self._release(request)
            self._admit()
            running = [r for r in self.rows if r is not None]
        deltas: list[Delta] = []
        decoding = [r for r in running if r.n_prefilled == len(r.prompt_ids) and not r.finished]
        budget = self.prefill_budget
        for request in running:
            if budget <= 0:
                break
            if request.n_prefilled < len(request.prompt_ids) and not request.finished:
                budget -= self._prefill_chunk(request, budget, deltas)
        if decoding:
            self._decode(decoding, deltas)
        with self.lock:
            for d in deltas:
                if d.request.finished and d.request.row is not None:
                    self._release(d.request)
        return deltas

    def _admit(self) -> None:
        for row in range(self.max_batch):
            if not self.waiting:
                return
            if self.rows[row] is None:
                request = self.waiting.popleft()
                request.row = row
                self.rows[row] = request
                self.cache.reset(slice(row, row + 1))
                self.sampler.assign(row, request.params, request.prompt_ids)

    def _release(self, request: Request) -> None:
        self.rows[request.row] = None
        request.row = None

    def _prefill_chunk(self, request: Request, budget: int, deltas: list[Delta]) -> int:
        start = request.n_prefilled
        n = min(self.chunk_size, budget, len(request.prompt_ids) - start)
        tokens = self._to_device(request.prompt_ids[start : start + n])[None]
        positions = torch.arange(start, start + n, device=self.device)[None]
        row = slice(request.row, request.row + 1)
        logits = self.model(tokens, positions, self.cache, rows=row, kv_len=start + n, last_only=True)
        request.n_prefilled += n
        if request.n_prefilled == len(request.prompt_ids):
            self._accept([request], logits[:, -1], deltas)
        return n

    def _decode(self, decoding: list[Request], deltas: list[Delta]) -> None:
        """Advance every decoding row. When nothing waits to be prefilled, several steps run back to
        back with the sampled tokens fed back on the device, and the host reads them once at the end;
        a sequence that stops early has its surplus tokens dropped."""
        width = self.max_batch if self.compiled else max(r.row for r in decoding) + 1
        tokens = [0] * width
        positions = [-1] * width  # idle rows ride along and write nothing
        for r in decoding:
            tokens[r.row], positions[r.row] = r.output_ids[-1], r.position
        idle = self.waiting or any(r.n_prefilled < len(r.prompt_ids) for r in self.rows if r is not None)
        steps = 1 if idle else min([self.decode_steps] + [r.params.max_tokens - len(r.output_ids) for r in decoding])
        kv_len = self._kv_len(max(positions) + steps)
        tokens_t = self._to_device(tokens)[:, None]
        positions_t = self._to_device(positions)[:, None]
        rows = [r.row for r in decoding]
        greedy = all(r.params.greedy for r in decoding)
        index = self._to_device(rows)
        chosen, logprobs = [], []
        for _ in range(steps):
            logits = self._decode_fn(tokens_t, positions_t, kv_len)[index, -1]
            step_tokens = sample(logits, self.sampler, rows, index, greedy)
            chosen.append(step_tokens)
            logprobs.append(self._logprobs(decoding, logits, step_tokens))
            tokens_t[index, 0] = step_tokens
            positions_t = torch.where(positions_t >= 0, positions_t + 1, positions_t)
        self._deliver(decoding, chosen, logprobs, deltas)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """Host ints to the device without a stream sync (pinned memory, non-blocking copy)."""
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _kv_len(self, needed: int) -> int:
        """Compiled graphs are recorded per kv_len, so round it up to a power of two."""
        if not self.compiled:
            return needed
        return min(1 << max(needed - 1, 255).bit_length(), max(layer.size for layer in self.cache.layers))

    def _eager_decode(self, tokens, positions, kv_len):
        return self.model(tokens, positions, self.cache, rows=slice(0, tokens.shape[0]), kv_len=kv_len)

    def _logprobs(self, requests, logits, tokens):
        want = [r.params.logprobs for r in requests if r.params.logprobs is not None]
        return top_logprobs(logits, tokens, max(want)) if want else None

    def _accept(self, requests: list[Request], logits: torch.Tensor, deltas: list[Delta]) -> None:
        rows = [r.row for r in requests]
        tokens = sample(logits, self.sampler, rows, self._to_device(rows), all(r.params.greedy for r in requests))
        self._deliver(requests, [tokens], [self._logprobs(requests, logits, tokens)], deltas)

    def _deliver(self, requests, chosen, logprobs, deltas) -> None:
        """Bring the sampled tokens to the host (the one sync) and advance each request."""
        token_rows = torch.stack(chosen).tolist()
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
                deltas.append(self._advance(request, token))

    def _advance(self, request: Request, token: int) -> Delta:
        """Append a token, apply stop rules, and return the text that became final."""
        params = request.params
        request.output_ids.append(token)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.default_stop_ids)
        is_stop_token = token in stop_ids
        if request._decoder is not None and not is_stop_token:
            request._decoded += request._decoder.push(token)
        if is_stop_token:
            request.finish_reason = "stop"
        elif len(request.output_ids) >= params.max_tokens:
            request.finish_reason = "length"
        if request.finished and request._decoder is not None:
            request._decoded += request._decoder.flush()
        emitted = len(request.text)
        final = request._decoded
        cut = _find_stop(final, params.stop, max(0, emitted - max((len(s) for s in params.stop), default=0)))
        if cut is not None:
            final = final[:cut]
            request.finish_reason = "stop"
        elif not request.finished:
            final = final[: len(final) - _held_back(final, params.stop)]
        new_text = final[emitted:]
        request.text = final if len(final) > emitted else request.text
        if request.finished:
            request.finish_time = time.monotonic()
        return Delta(request, new_text, [token], request.finish_reason)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
