"""The engine: continuous batching over a preallocated rolling-buffer cache.

Every `step()` admits waiting requests into free cache rows (`Scheduler`), pushes a bounded number of
prompt tokens through chunked prefill (so a long prompt never stalls the streams already running),
then advances every decoding row in one forward (`ModelRunner`). The scheduler updates the requests
from the chosen tokens, which the `OutputProcessor` turns into final text. Sequences join and leave
the batch at every step. `LLM.generate` and the HTTP server both drive it.

With `prefix_cache_gib > 0` a `PrefixCache` sits beside the KV cache: the scheduler restores a
request's cached prefix into its row before its first chunk, and every prefill chunk's complete
blocks are stored right after its forward, before any later forward writes that row.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import torch

from .. import batch_invariant
from ..model import Transformer
from .prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from ..sampling import SamplingParams
from .adapters import AdapterRegistry
from .config import EngineConfig
from .constraints import ConstraintManager
from .output import OutputProcessor
from .request import Delta, Request
from .runner import DecodeGroup, ModelRunner, padded_width
from .scheduler import Scheduler
from .speculative import make_speculator


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None, draft_model=None,
                 **options):
        """`config` holds the knobs; `options` (EngineConfig's fields: max_batch=..., chunk_size=...) change it.
        `draft_model` is the proposer of `speculative` methods "draft" and "self-int4" (LLM loads it)."""
        param = next(model.parameters())
        s = EngineConfig.of(config, **options).resolved(model.config, param.device)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        batch_invariant.configure(model, param.device, s.batch_invariant)  # before the decode step compiles
        spare = s.speculative.num_tokens if s.speculative is not None else 0
        self.runner = ModelRunner(model, s.max_batch, s.max_seq_len, s.compile, spare_slots=spare,
                                  kv_cache_dtype=s.kv_cache_dtype)
        self.prefix = self._prefix_cache(s)
        self.output = OutputProcessor(tokenizer)
        self.scheduler = Scheduler(s.max_batch, s.chunk_size, s.prefill_budget, self.prefix, s.batch_invariant,
                                   self.output)
        self.constraints = ConstraintManager(tokenizer, model.config.vocab_size, s.max_batch, self.runner.device)
        self.device, self.cache = self.runner.device, self.runner.cache
        self.max_batch, self.chunk_size, self.prefill_budget = s.max_batch, s.chunk_size, s.prefill_budget
        self.compiled = s.compile
        self.speculator = make_speculator(s, self.runner, draft_model, self.scheduler, self.constraints)
        # Mutable between steps (benchmarks and tests switch them): several decode steps back to back,
        # and pipelined decode, which launches the next group of steps before reading the last one's tokens.
        self.decode_steps, self.pipeline = s.decode_steps, s.pipeline
        self.adapters = AdapterRegistry(model, s.max_loras, s.max_lora_rank, self._slots_in_use)
        self._ids = itertools.count()
        self._inflight: DecodeGroup | None = None
        self._steps_read = 0  # decode steps whose tokens the host read during this engine step
        self._last_step = (False, 0.0)  # whether the last engine step only decoded plainly, and its end
        self._warmed = False

    def _prefix_cache(self, s: EngineConfig) -> PrefixCache | None:
        if s.prefix_cache_gib == 0:
            return None
        smallest = min(layer.size for layer in self.runner.cache.layers)
        block = s.prefix_block_size or min(DEFAULT_BLOCK_SIZE, smallest)
        return PrefixCache(self.runner.cache, s.prefix_cache_bytes, block)

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_ids, params, self.config.vocab_size, self.cache.max_positions, self.constraints)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, lora=None) -> Request:
        """Queue a request; `lora` (a lora.LoRARequest, loaded on first use, or a loaded adapter's name)
        runs it with that adapter."""
        self.validate(prompt_ids, params)
        lora = self._check_lora(lora)
        request = Request(list(prompt_ids), params, request_id or f"req-{next(self._ids)}")
        self.output.prepare(request, self.constraints.build(params))
        with self.adapters.lock:  # queued before another thread can unload the adapter and reuse its slot
            slot = self.adapters.slot(lora)
            self.scheduler.add(request, slot, self.adapters.key(slot))
        return request

    def load_lora(self, name: str, path) -> None:
        """Load the PEFT adapter at `path` under `name` (see engine/adapters.py)."""
        self._check_lora(name)
        self.adapters.load(name, path)

    def unload_lora(self, name: str) -> None:
        self.adapters.unload(name)

    def _check_lora(self, lora):
        """`lora` as given, or a ValueError naming the setting that adapters cannot run with yet."""
        if lora is None:
            return None
        if self.model.tensor_parallel_size > 1:
            raise ValueError("LoRA adapters cannot run with tensor_parallel_size yet")
        return lora

    def _slots_in_use(self) -> set[int]:
        with self.scheduler.lock:
            requests = [*self.scheduler.rows, *self.scheduler.waiting]
        return {r.lora_slot for r in requests if r is not None and not r.finished}

    def abort(self, request: Request) -> None:
        """Drop a request wherever it is. Safe from any thread: a running request's cache row is
        released at the start of the next step, never in the middle of one."""
        self.scheduler.abort(request)

    @property
    def rows(self) -> list[Request | None]:
        return self.scheduler.rows

    @property
    def n_running(self) -> int:
        return self.scheduler.n_running

    @property
    def n_waiting(self) -> int:
        return self.scheduler.n_waiting

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def warmup(self) -> None:
        """Compile before serving rather than during it: prefill at batch 1 and 2; decode (speculating:
        verifies and draft steps too) at width 1 over two kv_len buckets, after which kv_len is symbolic
        and later buckets only record a CUDA graph; then at every other width the runner uses (powers of
        two up to max_batch), each of which compiles once: a compile while serving would stall every
        stream for as long. Leaves every row free. Run it on the thread that will step the engine: the
        CUDA graphs that torch.compile records belong to it."""
        if self._warmed:
            return
        self._warmed = True
        spec = self.speculator
        # Speculating, room for a draft and its verify after the first token (Speculator.warming: each
        # step then verifies), so that the verify's graphs and a draft model's are compiled here too.
        tokens = 2 if spec is None else spec.config.num_tokens + 3
        limit = min(layer.size for layer in self.cache.layers)
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        self.scheduler.prefix = None  # warm-up prompts are not worth caching, nor counting
        try:
            with spec.warming() if spec is not None else contextlib.nullcontext():
                widths = sorted({padded_width(n, self.max_batch, True) for n in range(3, self.max_batch + 1)})
                wide = [(n, 16) for n in widths]  # short prompts, prefilled in one step: a decode at width n
                # One-token prefills (a prefix-cache hit short of its last token) at 1 and 2 rows: the
                # eager steps' fused CUDA kernels specialize sizes of 1 and would compile while serving.
                for n, length in [(1, 200), (1, 300), (2, 300), (1, 1), (2, 1), *wide]:
                    length = max(1, min(length, limit - tokens))
                    requests = [self.add([1] * length, params) for _ in range(n)]
                    while self.has_work():
                        self.step()
                    assert all(r.finish_reason == "length" for r in requests)
        finally:
            self.scheduler.prefix = self.prefix

    # -- one iteration ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Delta]:
        deltas: list[Delta] = []
        self._steps_read = 0
        if self._inflight is not None and self.scheduler.waiting:  # rows may free up: know which first
            self._finish(self._inflight, deltas)
        admitted, running = self.scheduler.schedule()
        for request in admitted:
            self.runner.assign(request)
        live = [r for r in running if not r.finished]
        decoding = [r for r in live if r.prefilled]  # before this step's prefill: those decode next step
        prefilling = [r for r in live if not r.prefilled]
        self._prefill(prefilling, deltas)
        speculated = False
        if decoding and self.speculator is not None and self.speculator.active(decoding):
            speculated = True
            with self.runner.decode_scope():
                self._speculate(decoding, deltas, timed=not prefilling)
        elif decoding:
            self._decode(decoding, deltas)
        if self.speculator is not None:
            self._time_plain(bool(decoding) and not prefilling and not speculated)
        for d in deltas:
            if d.request.finished:
                self.scheduler.release(d.request)
                if self.speculator is not None:
                    self.speculator.finished(d.request)
        return deltas

    def _prefill(self, pending: list[Request], deltas: list[Delta]) -> None:
        for chunk in self.scheduler.plan_prefill(pending):
            logits = self.runner.prefill(chunk)
            if self.scheduler.prefix is not None:
                end = chunk.start + chunk.length
                for request in chunk.requests:
                    self.prefix.store(request.row, request.prompt_ids, chunk.start, end, request.lora_key)
            done = self.scheduler.prefilled(chunk)
            if done:
                requests = [chunk.requests[i] for i in done]
                tokens, logprobs = self.runner.sample(requests, logits[done], self._bitmask(requests))
                deltas += self.scheduler.update_from_output(requests, [tokens.tolist()], [logprobs])

    def _decode(self, decoding: list[Request], deltas: list[Delta], max_steps: int | None = None) -> None:
        """Advance every decoding row. When nothing waits to be prefilled, several steps run back to
        back with the sampled tokens fed back on the device, and the host reads them once at the end;
        a sequence that stops early has its surplus tokens dropped. With `pipeline`, the host reads
        them one group later, after launching the next group for the same batch."""
        idle = self.scheduler.prefilling()
        prev = self._inflight
        if prev is not None and (idle or not prev.same_batch(decoding) or _remaining(decoding, prev) < 1):
            self._finish(prev, deltas)
            prev = None
            decoding = [r for r in decoding if not r.finished]
            if not decoding:
                return
        constrained = self.constraints.any_constrained(decoding)  # their masks need each token: single steps
        steps = 1 if idle or constrained else min(max_steps or self.decode_steps, _remaining(decoding, prev))
        want_logprobs = any(r.params.logprobs is not None for r in decoding)
        pipelined = self.pipeline and not idle and not want_logprobs and not constrained
        group, logprobs = self.runner.launch(decoding, steps, prev, host_copy=pipelined, bitmask=self._bitmask(decoding))
        if prev is not None:
            self._finish(prev, deltas)
        if pipelined:
            self._inflight = group
        else:
            self._steps_read += steps
            deltas += self.scheduler.update_from_output(decoding, group.tokens.tolist(), logprobs)
            self._probe(decoding)

    def _speculate(self, decoding: list[Request], deltas: list[Delta], timed: bool = True) -> None:
        """One speculative step (propose, verify, accept) for every decoding row, after reading any
        decode group still in flight; `timed` for the backoff's break-even unless a prefill shares the
        step (its device work would be waited for inside ours)."""
        if self._inflight is not None:
            self._finish(self._inflight, deltas)
            decoding = [r for r in decoding if not r.finished]
            if not decoding:
                return
        backoff, start = self.speculator.backoff, time.perf_counter()
        if timed and backoff.wants_plain_timing(decoding):
            self._plain_steps(decoding, deltas, timed=True)
            return
        proposal = self.speculator.propose(decoding)
        if proposal is None and backoff.sleeping_rows_decode_in_groups(decoding):
            self._decode(decoding, deltas)
            return
        if proposal is None:
            self._plain_steps(decoding, deltas, max_steps=1)  # one step: the next may have a proposal
            if timed:
                backoff.time_lone(time.perf_counter() - start)
            return
        width = self.speculator.step(decoding, proposal, deltas)  # reads the tokens: the device is done
        if timed:
            backoff.time_speculative(time.perf_counter() - start, width)

    def _plain_steps(self, decoding: list[Request], deltas: list[Delta], max_steps: int | None = None,
                     timed: bool = False) -> None:
        """Plain decode steps inside speculation, their tokens read at once. `timed`: a group of steps, as a
        row that backed off decodes, gives the break-even's plain cost per step. A lone step, with a host
        read of its own, costs more than that (most likely why self-int4 on the default model kept
        speculating on an H100 at 0.31x of plain speed when the probe was one step, 2026-12-05g)."""
        start, read = time.perf_counter(), self._steps_read
        self._decode(decoding, deltas, max_steps=max_steps)
        if self._inflight is not None:
            self._finish(self._inflight, deltas)
        if timed and self._steps_read > read:
            self.speculator.backoff.time_plain((time.perf_counter() - start) / (self._steps_read - read))

    def _time_plain(self, plain: bool) -> None:
        """Time plain decode for the speculator's break-even (spec_backoff; `_speculate` times verifies): the
        wall time between two engine steps that only decoded plainly, per decode step read. Pipelined,
        the host reads one group while the next runs, so a step's own duration would miss the device's."""
        now, (was_plain, last_end) = time.perf_counter(), self._last_step
        self._last_step = (plain, now)
        if plain and was_plain and self._steps_read:
            self.speculator.backoff.time_plain((now - last_end) / self._steps_read)

    def _bitmask(self, requests: list[Request]):
        """A callable giving the step's constraint bitmask (None for free rows), or None if all are free."""
        if not self.constraints.any_constrained(requests):
            return None
        return lambda: self.constraints.bitmask(requests)

    def _finish(self, group: DecodeGroup, deltas: list[Delta]) -> None:
        """Read an in-flight group's tokens (waiting for those steps only) and advance its requests."""
        self._inflight = None
        self._steps_read += group.steps
        deltas += self.scheduler.update_from_output(group.requests, group.read(), [None] * group.steps)
        self._probe(group.requests)

    def _probe(self, requests: list[Request]) -> None:
        """Plain steps' tokens were read: sleeping speculative rows look for a draft again."""
        if self.speculator is not None:
            self.speculator.probe(requests)


def _remaining(decoding: list[Request], prev: DecodeGroup | None) -> int:
    ahead = prev.steps if prev is not None else 0
    return min(r.params.max_tokens - len(r.output_ids) for r in decoding) - ahead


def validate_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, limit: int | None,
                     constraints: ConstraintManager) -> None:
    """A ValueError naming what is wrong with a request for a model of `vocab_size` whose context is
    `limit` (None: unbounded); shared by `Engine.validate` and the HTTP side of an engine process."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:3]}")
    bias = [t for t in params.logit_bias or () if t >= vocab_size]
    if bias:
        raise ValueError(f"logit_bias token id {bias[0]} is not in the vocabulary [0, {vocab_size})")
    constraints.validate(params)
    if limit is not None and len(prompt_ids) + params.max_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
            f"{len(prompt_ids) + params.max_tokens} exceeds this model's context of {limit} tokens "
            "(it has no sliding window)"
        )
