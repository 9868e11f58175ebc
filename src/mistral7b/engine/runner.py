"""The model runner: the cache, the sampler, prefill forwards, and decode steps launched on the device.

With `compile`, the decode step is compiled over power-of-two widths of rows (CUDA graphs on a GPU),
and kv_len is rounded up to a few buckets so that few graphs are recorded. Decode steps are queued as
a `DecodeGroup` whose tokens the host reads later, so the host's bookkeeping can overlap the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..cache import KVCache
from ..config import ModelConfig
from .. import cpu_pool
from ..sampling import SamplerBatch, sample, top_logprobs
from ..utils import slice_or_index, to_device
from .request import Request, TokenLogprob
from .scheduler import PrefillChunk


@dataclass
class DecodeGroup:
    """Decode steps launched on the device whose tokens the host has not read yet."""

    requests: list[Request]
    steps: int
    tokens: torch.Tensor  # [steps, n] chosen tokens; a pinned host copy while in flight
    ready: object  # CUDA event recorded after the copy, or None on CPU
    next_tokens: torch.Tensor  # [width, 1] on the device: the input of the step after these
    next_positions: torch.Tensor

    def same_batch(self, requests: list[Request]) -> bool:
        return len(requests) == len(self.requests) and all(a is b for a, b in zip(requests, self.requests))

    def read(self) -> list[list[int]]:
        """The chosen tokens, `[step][i]`, waiting for these steps only."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


def compile_decode_step(model, cache: KVCache, device: torch.device):
    """`model`'s decode step over `cache` compiled (CUDA graphs on a GPU), for the widths of
    `padded_width`; kv_len is bucketed by `kv_len_bucket`."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = model.compile_decode(cache, mode)
    return compiled if mode is None else _on_graph_thread(compiled)


def padded_width(needed: int, max_batch: int, compiled: bool) -> int:
    """Rows a decode step over rows [0, needed) runs: a power of two (at most `max_batch`) when compiled."""
    return min(1 << (needed - 1).bit_length(), max_batch) if compiled else needed


def padded_rows(width: int, rows: list[int], tokens: list[int], positions: list[int], device) -> tuple:
    """Decode inputs [width, 1] with each of `rows` holding its token and position; the other rows idle
    (position -1: they ride along and write nothing)."""
    padded_tokens, padded_positions = [0] * width, [-1] * width
    for row, token, position in zip(rows, tokens, positions):
        padded_tokens[row], padded_positions[row] = token, position
    return to_device(padded_tokens, device)[:, None], to_device(padded_positions, device)[:, None]


def kv_len_bucket(needed: int, cache: KVCache) -> int:
    """`needed` rounded up to the next of 256, 384, 512, 768, 1024, ... (powers of two and 1.5 times
    them), at most the cache's largest layer: few graphs, and at most a third of the read wasted."""
    bucket = 256
    while bucket < needed:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return min(bucket, max(layer.size for layer in cache.layers))


def _on_graph_thread(compiled):
    def decode(*args, **kwargs):
        _cuda_graph_thread_state()
        return compiled(*args, **kwargs)

    return decode


@runtime_checkable
class RunnableModel(Protocol):
    """What the runner drives: a `Transformer`, or rank 0's `parallel.TensorParallelModel`, whose caches
    are sharded over its ranks and whose compiled decode step runs on every rank."""

    config: ModelConfig
    tensor_parallel_size: int

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                 rows=None, kv_len: int | None = None, last_only: bool = False, packed: torch.Tensor | None = None,
                 **adapters) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def new_cache(self, max_batch: int = 1, device=None, dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = None, spare_slots: int = 0) -> KVCache: ...

    def compile_decode(self, cache: KVCache, mode: str | None = None) -> Callable[..., torch.Tensor]: ...


def cache_dtype_of(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """EngineConfig.kv_cache_dtype as a torch dtype: "auto" the model's; "float16" on a CPU only, where the
    attention kernel reads half keys and values (attention_cpu). A GPU's cache keeps its model's 16 bits."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if device.type != "cpu":
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype} is for a CPU; on {device.type} the cache keeps the "
                         f"model's dtype (leave it auto)")
    return getattr(torch, kv_cache_dtype)


class ModelRunner:
    def __init__(self, model: RunnableModel, max_batch: int, max_seq_len: int | None, compile: bool,
                 spare_slots: int = 0, kv_cache_dtype: str = "auto"):
        """`spare_slots`: cache slots beyond each layer's window for speculative verifies (speculative.py);
        `kv_cache_dtype`: EngineConfig's."""
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.max_batch = max_batch
        cache_dtype = cache_dtype_of(kv_cache_dtype, self.dtype, self.device)
        self.cache = model.new_cache(max_batch, self.device, cache_dtype, max_seq_len, spare_slots)
        self.sampler = SamplerBatch(max_batch, model.config.vocab_size, self.device)
        # Each cache row's LoRA slot, on the device: a forward gathers its rows' slots without a host sync.
        self.row_slots = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.compiled = compile
        self._static_bank = None  # the LoRA bank marked static for the compiled step (lora.LoRABank.mark_static)
        self.decode_fn = self._compile_decode() if compile else self.eager_decode
        # Decode steps (their sampling too: an OpenMP team there would wait on the core where the
        # kernels' pool spins) and verify forwards, a decode step of a few tokens, threaded alike.
        self.verify_fn = self.model
        # A verify forward feeds every row 1 + spare_slots tokens: one compiled shape per decode width,
        # so a GPU verify replays CUDA graphs as decode does instead of launching each kernel, and a CPU
        # one runs the compiled decode's fused kernels (its arithmetic too: greedy stays token-identical).
        self.verify_tokens = 1 + spare_slots
        self.compiled_verify = self._compile_decode() if compile and spare_slots else None
        # The whole of a speculative step (proposing, verifying, accepting) on the decode threads too.
        self.decode_scope = contextlib.nullcontext
        if self.device.type == "cpu":
            threads = min(torch.get_num_threads(), cpu_pool.physical_cores())
            self.decode_scope = functools.partial(cpu_pool.decoding, threads)
            self.launch = cpu_pool.decode_threads(self.launch, threads)
            self.verify_fn = cpu_pool.decode_threads(self.model, threads)
            if self.compiled_verify is not None:
                self.compiled_verify = cpu_pool.decode_threads(self.compiled_verify, threads)

    def _compile_decode(self):
        return compile_decode_step(self.model, self.cache, self.device)

    def assign(self, request: Request) -> None:
        """Give `request` its row: an empty cache row and the row's sampling parameters."""
        self.cache.reset(slice(request.row, request.row + 1))
        self.sampler.assign(request.row, request.params, request.prompt_ids)
        self.row_slots[request.row] = request.lora_slot

    def prefill(self, chunk: PrefillChunk) -> torch.Tensor:
        """Run one prefill forward; the logits [B, vocab] of each request's last token in it. A request
        that wants prompt log-probabilities gets them for the chunk's tokens (all positions' logits)."""
        group, start, n = chunk.requests, chunk.start, chunk.length
        tokens = self.to_device([t for r in group for t in r.prompt_ids[start : start + n]]).view(len(group), n)
        positions = torch.arange(start, start + n, device=self.device).expand(len(group), n)
        rows = self.rows([r.row for r in group])
        every = any(r.params.prompt_logprobs is not None for r in group)
        logits = self.model(tokens, positions, self.cache, rows=rows, kv_len=start + n, last_only=not every,
                            **self.adapters(group, rows))
        if every:
            for i, r in enumerate(group):
                if r.params.prompt_logprobs is not None:
                    record_prompt_logprobs(r, logits[i], start)
        return logits[:, -1]

    def sample(self, requests: list[Request], logits: torch.Tensor, bitmask=None):
        """(tokens [n], logprobs or None) of one step for `requests`, whose logits are rows of `logits`;
        `bitmask` (a callable giving the device bitmask or None) restricts constrained rows."""
        rows = [r.row for r in requests]
        mask = bitmask() if bitmask is not None else None
        greedy = all(r.params.greedy for r in requests)
        tokens = sample(logits, self.sampler, rows, self.to_device(rows), greedy, bitmask=mask)
        return tokens, self.logprobs(requests, logits, tokens)

    def launch(self, decoding: list[Request], steps: int, prev: DecodeGroup | None, host_copy: bool, bitmask=None):
        """Queue `steps` decode steps for `decoding`, continuing from `prev`'s tokens if given.
        `bitmask` (constraints.py; single steps only) is called once the forward is queued."""
        width = self.decode_width(decoding, prev)
        ahead = prev.steps if prev is not None else 0
        if prev is None:
            tokens_t, positions_t = padded_rows(width, [r.row for r in decoding], [r.output_ids[-1] for r in decoding],
                                                [r.position for r in decoding], self.device)
        else:
            tokens_t, positions_t = prev.next_tokens, prev.next_positions
        kv_len = self.kv_len(max(r.position for r in decoding) + ahead + steps)
        rows = [r.row for r in decoding]
        greedy = all(r.params.greedy for r in decoding)
        index = self.to_device(rows)
        adapters = self.adapters(decoding, slice(0, width), self.compiled)
        chosen, logprobs = [], []
        for _ in range(steps):
            logits = self.decode_fn(tokens_t, positions_t, kv_len, **adapters)[index, -1]
            mask = bitmask() if bitmask is not None else None  # host work while the device runs the forward
            step_tokens = sample(logits, self.sampler, rows, index, greedy, bitmask=mask)
            chosen.append(step_tokens)
            logprobs.append(self.logprobs(decoding, logits, step_tokens))
            tokens_t[index, 0] = step_tokens
            positions_t = torch.where(positions_t >= 0, positions_t + 1, positions_t)
        tokens, ready = torch.stack(chosen), None
        if host_copy and self.device.type == "cuda":
            tokens = tokens.to("cpu", non_blocking=True)  # pinned; valid once `ready` has passed
            ready = torch.cuda.Event()
            ready.record()
        return DecodeGroup(decoding, steps, tokens, ready, tokens_t, positions_t), logprobs

    def decode_width(self, decoding: list[Request], prev: DecodeGroup | None) -> int:
        """Rows one decode step runs: every row up to the last decoding one, rounded up to a power of two
        (at most `max_batch`) when compiled, so that a few shapes are recorded and a lone request runs
        one-row kernels: int4 tinygemm takes 2.2 ms a 7B step at 1 row against 5.1 at 8 (H200,
        benchmarks/gemv_bench.py), and flash_decode splits the keys finer. Queued steps keep their width."""
        if prev is not None:
            return prev.next_tokens.shape[0]
        return padded_width(max(r.row for r in decoding) + 1, self.max_batch, self.compiled)

    def verify(self, requests: list[Request], drafts: list[list[int]]) -> torch.Tensor:
        """One forward of each row's last token and its draft tokens (speculative decoding), as a
        prefill chunk at the row's positions; the logits [n, T, vocab]. T is 1 + the longest draft, or
        on a GPU `verify_tokens` through the compiled step, whose `decode_width` rows include idle ones
        at position -1 (they write nothing). Shorter drafts are padded with repeats at the following
        positions; the engine forgets every position it does not accept, so padding costs compute only.
        Eagerly, only the fed tokens go through the linears (`Transformer.forward`'s `packed`)."""
        graphs = self.compiled_verify is not None
        t = self.verify_tokens if graphs else 1 + max(len(d) for d in drafts)
        width = self.decode_width(requests, None) if graphs else len(requests)
        ragged = not graphs and any(len(d) + 1 < t for d in drafts)
        tokens, positions = [0] * (width * t), [-1] * (width * t)
        for i, (r, d) in enumerate(zip(requests, drafts)):
            fed, start = [r.output_ids[-1], *d], (r.row if graphs else i) * t
            tokens[start : start + t] = fed + [fed[-1]] * (t - len(fed))
            positions[start : start + t] = range(r.position, r.position + t)
        tokens_t, positions_t = self.to_device(tokens).view(width, t), self.to_device(positions).view(width, t)
        rows = self.rows([r.row for r in requests])
        if not graphs:
            fed = [i * t + j for i, d in enumerate(drafts) for j in range(1 + len(d))]  # the rest is padding
            packed = {"packed": self.to_device(fed)} if ragged else {}
            return self.verify_fn(tokens_t, positions_t, self.cache, rows=rows, kv_len=max(r.position for r in requests) + t,
                                  **self.adapters(requests, rows), **packed)
        kv_len = self.kv_len(max(r.position for r in requests)) + t  # the bucket's slots, then these t
        return self.compiled_verify(tokens_t, positions_t, kv_len, **self.adapters(requests, slice(0, width), True))[rows]

    def to_device(self, values: list[int]) -> torch.Tensor:
        return to_device(values, self.device)

    def rows(self, rows: list[int]) -> slice | torch.Tensor:
        """Cache rows as a slice when they are consecutive (a view), else as an index tensor."""
        return slice_or_index(rows, self.device)

    def adapters(self, requests: list[Request], rows: slice | torch.Tensor, compiled: bool = False) -> dict:
        """The forward's `adapters` argument: the slots of cache rows `rows`, or nothing when none of
        `requests` runs an adapter (the base model alone, no delta computed). The `compiled` decode step
        gets them whenever the model has LoRA slots: one graph whatever the batch runs."""
        bank = getattr(self.model, "lora", None)
        if compiled and bank is not None:
            if self._static_bank is not bank:  # made after compile_decode (the first load): mark it now
                bank.mark_static()
                self._static_bank = bank
            return {"adapters": self.row_slots[rows]}
        if not any(r.lora_slot for r in requests):
            return {}
        return {"adapters": self.row_slots[rows]}

    def kv_len(self, needed: int) -> int:
        """Compiled graphs are recorded per kv_len: round it up to a bucket (`kv_len_bucket`)."""
        return kv_len_bucket(needed, self.cache) if self.compiled else needed

    def eager_decode(self, tokens, positions, kv_len, **adapters):
        return self.model(tokens, positions, self.cache, rows=slice(0, tokens.shape[0]), kv_len=kv_len, **adapters)

    @staticmethod
    def logprobs(requests, logits, tokens):
        want = [r.params.logprobs for r in requests if r.params.logprobs is not None]
        return top_logprobs(logits, tokens, max(want)) if want else None


def record_prompt_logprobs(request: Request, logits: torch.Tensor, start: int) -> None:
    """Add the log-probabilities of prompt tokens start+1 .. start+len(logits) (those that the chunk's
    positions predict) to `request.prompt_logprobs`; the first prompt token gets None."""
    entries = [None] if start == 0 else []
    targets = request.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
    if targets:
        chosen, top_values, top_ids = top_logprobs(logits[: len(targets)], torch.tensor(targets, device=logits.device),
                                                   request.params.prompt_logprobs)
        k = request.params.prompt_logprobs
        for token, lp, values, ids in zip(targets, chosen.tolist(), top_values.tolist(), top_ids.tolist()):
            entries.append(TokenLogprob(token, lp, list(zip(ids[:k], values[:k]))))
    request.add_prompt_logprobs(entries, first=start == 0)


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
