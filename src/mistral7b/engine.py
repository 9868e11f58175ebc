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
from collections import defaultdict, deque
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


@dataclass(eq=False)  # a request equals only itself: membership tests (waiting queue, batches) by identity
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
    _stop_ids: frozenset = frozenset()
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


@dataclass
class _DecodeGroup:
    """Decode steps launched on the device whose tokens the host has not read yet."""

    requests: list[Request]
    steps: int
    tokens: torch.Tensor  # [steps, n] chosen tokens; a pinned host copy while in flight
    ready: object  # CUDA event recorded after the copy, or None on CPU
    next_tokens: torch.Tensor  # [width, 1] on the device: the input of the step after these
    next_positions: torch.Tensor

    def same_batch(self, requests: list[Request]) -> bool:
        return len(requests) == len(self.requests) and all(a is b for a, b in zip(requests, self.requests))


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
        pipeline: bool | None = None,
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
        # Pipelined decode: launch the next group of steps before reading the last one's tokens, so
        # the host's bookkeeping overlaps the GPU's work instead of leaving it idle.
        self.pipeline = self.device.type == "cuda" if pipeline is None else pipeline
        self._inflight: _DecodeGroup | None = None
        self._warmed = False
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
        compiled = torch.compile(self._eager_decode, mode=mode, fullgraph=True)
        if mode is None:
            return compiled

        def decode(*args):
            _cuda_graph_thread_state()
            return compiled(*args)

        return decode

    def warmup(self) -> None:
        """Compile before serving rather than during it: prefill at batch 1 and 2, decode at two kv_len
        buckets. After the second bucket kv_len is symbolic, so later buckets only record a CUDA graph
        and never recompile. Leaves every row free. Run it on the thread that will step the engine:
        the CUDA graphs that torch.compile records belong to it."""
        if self._warmed:
            return
        self._warmed = True
        limit = min(layer.size for layer in self.cache.layers)
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        for n, length in ((1, 200), (2, 300)):
            length = max(1, min(length, limit - 2))
            requests = [self.add([1] * length, params) for _ in range(n)]
            while self.has_work():
                self.step()
            assert all(r.finish_reason == "length" for r in requests)

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
        eos = frozenset() if params.ignore_eos else self.default_stop_ids
        request._stop_ids = frozenset(params.stop_token_ids) | eos
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
        deltas: list[Delta] = []
        if self._inflight is not None and self.waiting:  # rows may free up: know which first
            self._finish(self._inflight, deltas)
        with self.lock:
            for request in self.rows:
                if request is not None and request.finished:
                    self._release(request)
            self._admit()
            running = [r for r in self.rows if r is not None]
        decoding = [r for r in running if r.n_prefilled == len(r.prompt_ids) and not r.finished]
        self._prefill([r for r in running if r.n_prefilled < len(r.prompt_ids) and not r.finished], deltas)
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

    def _prefill(self, pending: list[Request], deltas: list[Delta]) -> None:
        """Push up to `prefill_budget` prompt tokens, oldest request first, each request at most one
        chunk. Requests at the same offset share one forward ([B, n] tokens), so a burst of new
        prompts costs a few large forwards rather than one small forward each."""
        budget = self.prefill_budget
        while pending and budget > 0:
            head = pending[0]
            start = head.n_prefilled
            n = min(self.chunk_size, budget, len(head.prompt_ids) - start)
            group = [r for r in pending if r.n_prefilled == start and len(r.prompt_ids) - start >= n]
            group = group[: max(1, budget // n)]
            self._prefill_chunk(group, start, n, deltas)
            budget -= n * len(group)
            pending = [r for r in pending if r not in group]

    def _prefill_chunk(self, group: list[Request], start: int, n: int, deltas: list[Delta]) -> None:
        tokens = self._to_device([t for r in group for t in r.prompt_ids[start : start + n]]).view(len(group), n)
        positions = torch.arange(start, start + n, device=self.device).expand(len(group), n)
        rows = self._rows([r.row for r in group])
        logits = self.model(tokens, positions, self.cache, rows=rows, kv_len=start + n, last_only=True)
        done = []
        for i, request in enumerate(group):
            request.n_prefilled += n
            if request.n_prefilled == len(request.prompt_ids):
                done.append(i)
        if done:
            self._accept([group[i] for i in done], logits[done, -1], deltas)

    def _rows(self, rows: list[int]) -> slice | torch.Tensor:
        """Cache rows as a slice when they are consecutive (a view), else as an index tensor."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return self._to_device(rows)

    def _decode(self, decoding: list[Request], deltas: list[Delta]) -> None:
        """Advance every decoding row. When nothing waits to be prefilled, several steps run back to
        back with the sampled tokens fed back on the device, and the host reads them once at the end;
        a sequence that stops early has its surplus tokens dropped. With `pipeline`, the host reads
        them one group later, after launching the next group for the same batch."""
        idle = bool(self.waiting) or any(r.n_prefilled < len(r.prompt_ids) for r in self.rows if r is not None)
        prev = self._inflight
        if prev is not None and (idle or not prev.same_batch(decoding) or self._remaining(decoding, prev) < 1):
            self._finish(prev, deltas)
            prev = None
            decoding = [r for r in decoding if not r.finished]
            if not decoding:
                return
        steps = 1 if idle else min(self.decode_steps, self._remaining(decoding, prev))
        want_logprobs = any(r.params.logprobs is not None for r in decoding)
        pipelined = self.pipeline and not idle and not want_logprobs
        group, logprobs = self._launch(decoding, steps, prev, host_copy=pipelined)
        if prev is not None:
            self._finish(prev, deltas)
        if pipelined:
            self._inflight = group
        else:
            self._apply(decoding, group.tokens.tolist(), logprobs, deltas)

    @staticmethod
    def _remaining(decoding: list[Request], prev: _DecodeGroup | None) -> int:
        ahead = prev.steps if prev is not None else 0
        return min(r.params.max_tokens - len(r.output_ids) for r in decoding) - ahead

    def _launch(self, decoding: list[Request], steps: int, prev: _DecodeGroup | None, host_copy: bool):
        """Queue `steps` decode steps for `decoding`, continuing from `prev`'s tokens if given."""
        width = self.max_batch if self.compiled else max(r.row for r in decoding) + 1
        ahead = prev.steps if prev is not None else 0
        if prev is None:
            tokens, positions = [0] * width, [-1] * width  # idle rows ride along and write nothing
            for r in decoding:
                tokens[r.row], positions[r.row] = r.output_ids[-1], r.position
            tokens_t, positions_t = self._to_device(tokens)[:, None], self._to_device(positions)[:, None]
        else:
            tokens_t, positions_t = prev.next_tokens, prev.next_positions
        kv_len = self._kv_len(max(r.position for r in decoding) + ahead + steps)
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
        tokens, ready = torch.stack(chosen), None
        if host_copy and self.device.type == "cuda":
            tokens = tokens.to("cpu", non_blocking=True)  # pinned; valid once `ready` has passed
            ready = torch.cuda.Event()
            ready.record()
        return _DecodeGroup(decoding, steps, tokens, ready, tokens_t, positions_t), logprobs

    def _finish(self, group: _DecodeGroup, deltas: list[Delta]) -> None:
        """Read an in-flight group's tokens (waiting for those steps only) and advance its requests."""
        self._inflight = None
        if group.ready is not None:
            group.ready.synchronize()
        self._apply(group.requests, group.tokens.tolist(), [None] * group.steps, deltas)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """Host ints to the device without a stream sync (pinned memory, non-blocking copy)."""
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _kv_len(self, needed: int) -> int:
        """Compiled graphs are recorded per kv_len, so round it up to the next of 256, 384, 512, 768,
        1024, ... (powers of two and 1.5 times them): few graphs, and at most a third of the read wasted."""
        if not self.compiled:
            return needed
        bucket = 256
        while bucket < needed:
            bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
        return min(bucket, max(layer.size for layer in self.cache.layers))

    def _eager_decode(self, tokens, positions, kv_len):
        return self.model(tokens, positions, self.cache, rows=slice(0, tokens.shape[0]), kv_len=kv_len)

    def _logprobs(self, requests, logits, tokens):
        want = [r.params.logprobs for r in requests if r.params.logprobs is not None]
        return top_logprobs(logits, tokens, max(want)) if want else None

    def _accept(self, requests: list[Request], logits: torch.Tensor, deltas: list[Delta]) -> None:
        rows = [r.row for r in requests]
        tokens = sample(logits, self.sampler, rows, self._to_device(rows), all(r.params.greedy for r in requests))
        self._apply(requests, [tokens.tolist()], [self._logprobs(requests, logits, tokens)], deltas)

    def _apply(self, requests, token_rows: list[list[int]], logprobs, deltas) -> None:
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
                deltas.append(self._advance(request, token))

    def _advance(self, request: Request, token: int) -> Delta:
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
        if request.finished and request._decoder is not None:
            request._decoded += request._decoder.flush()
        emitted = len(request.text)
        final = request._decoded
        if params.stop:
            cut = _find_stop(final, params.stop, max(0, emitted - max(len(s) for s in params.stop)))
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


def _cuda_graph_thread_state() -> None:
    """torch < 2.13 keeps the CUDA-graph trees' state in a threading.local that only the thread which
    imported the module has, so recording a graph from any other thread fails an assertion (2.13 sets
    the state up per thread itself). Give this thread its own state, as 2.13 does."""
    from torch._inductor import cudagraph_trees as trees

    local = trees.local
    if hasattr(local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)


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
