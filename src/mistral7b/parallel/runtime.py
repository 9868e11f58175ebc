"""Rank 0 drives, the other ranks follow.

Rank 0 holds `TensorParallelModel`, which the engine's runner drives as it drives a `Transformer`
(`engine.runner.RunnableModel`: forward, `new_cache`, `compile_decode`, the full `config`). Each call first broadcasts a small command header over a gloo
group, then its token/position/row tensors over the default group (NCCL on GPUs), and then runs the
forward on rank 0's shard; the workers run the same forward on theirs, meeting at the two
all-reduces of every layer. Caches are sharded by KV heads: `new_cache` allocates rank 0's part and
has every worker allocate its own, and `reset` and `forget_rows` (rejected drafts) are broadcast too.
Only rank 0 samples and speculates: a verify is a forward of a few tokens like any other.

Workers wait for the next header on a group with a very long timeout (a server may idle for days);
they still never hang, since a rank that dies closes its sockets and every collective with it
fails. All other collectives run under the launch timeout. After any failure the model is shut
down and every later call raises `TensorParallelError`.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..cache import KVCache
from ..config import ModelConfig
from ..model import Transformer, check_packed

OP_FORWARD, OP_NEW_CACHE, OP_RESET, OP_SHUTDOWN, OP_COMPILE, OP_DECODE, OP_FORGET = 1, 2, 3, 4, 5, 6, 7
HEADER_LEN = 11
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPILE_MODES = (None, "reduce-overhead", "default", "max-autotune")
BACKENDS = ("inductor", "eager", "aot_eager")


class TensorParallelError(RuntimeError):
    """A rank stopped or a collective failed; the tensor-parallel model can no longer run."""


@dataclass
class Link:
    """One rank's ends of the two channels: commands (gloo, CPU) and data (the default group)."""

    rank: int
    world: int
    device: torch.device
    commands: object  # a gloo ProcessGroup
    timeout_s: float  # of every collective but the workers' wait for the next command

    def send(self, header: list[int], payload: Tensor | None = None) -> None:
        dist.broadcast(torch.tensor(header + [0] * (HEADER_LEN - len(header))), 0, group=self.commands)
        if payload is not None:
            dist.broadcast(payload, 0)

    def receive(self) -> list[int]:
        header = torch.empty(HEADER_LEN, dtype=torch.long)
        dist.broadcast(header, 0, group=self.commands)
        return header.tolist()

    def receive_payload(self, n: int) -> Tensor:
        payload = torch.empty(n, dtype=torch.long, device=self.device)
        dist.broadcast(payload, 0)
        return payload


def encode_forward(tokens: Tensor, positions, cache_id: int, rows, kv_len, last_only: bool, packed=None):
    """The header and the one int64 payload (tokens, positions, a ragged batch's `packed` indices, row
    indices) of a forward call."""
    batch, t = tokens.shape
    parts = [tokens.reshape(-1).long()]
    if positions is not None:
        parts.append(positions.reshape(-1).long())
    if packed is not None:
        parts.append(packed.long().to(tokens.device))
    if isinstance(rows, Tensor):
        parts.append(rows.reshape(-1).long().to(tokens.device))
        rows_spec = [1, 0, rows.numel()]
    else:
        rows = slice(0, batch) if rows is None else rows
        rows_spec = [0, rows.start or 0, batch if rows.stop is None else rows.stop]
    header = [OP_FORWARD, batch, t, -1 if kv_len is None else int(kv_len), int(last_only), cache_id,
              *rows_spec, int(positions is not None), 0 if packed is None else packed.numel()]
    return header, torch.cat(parts)


def decode_forward(header: list[int], link: Link) -> tuple[Tensor, Tensor | None, int, object, int | None, bool,
                                                           Tensor | None]:
    _, batch, t, kv_len, last_only, cache_id, rows_kind, rows_a, rows_b, has_positions, n_packed = header
    n_rows = rows_b if rows_kind == 1 else 0
    fed = batch * t * (1 + has_positions)
    payload = link.receive_payload(fed + n_packed + n_rows)
    tokens = payload[: batch * t].view(batch, t)
    positions = payload[batch * t : 2 * batch * t].view(batch, t) if has_positions else None
    packed = payload[fed : fed + n_packed] if n_packed else None
    rows = payload[payload.numel() - n_rows :] if rows_kind == 1 else slice(rows_a, rows_b)
    return tokens, positions, cache_id, rows, None if kv_len < 0 else kv_len, bool(last_only), packed


class ShardedKVCache(KVCache):
    """Rank 0's share of a cache whose other shares live on the workers; `reset` and `forget_rows` reach them all."""

    def __init__(self, model: "TensorParallelModel", cache_id: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model, self.cache_id = model, cache_id

    def reset(self, rows: slice | None = None) -> None:
        rows = slice(None) if rows is None else rows
        stop = -1 if rows.stop is None else rows.stop
        with self.model.collective("a cache reset"):
            self.model.link.send([OP_RESET, self.cache_id, rows.start or 0, stop])
            super().reset(rows)

    def forget_rows(self, rows: list[int], starts: list[int], ends: list[int]) -> None:
        spans = [(row, start, end) for row, start, end in zip(rows, starts, ends) if start < end]
        if not spans:
            return
        with self.model.collective("forgetting rejected draft positions"):
            for row, start, end in spans:  # the ranks' protocol takes a row at a time
                self.model.link.send([OP_FORGET, self.cache_id, row, start, end])
            super().forget_rows(rows, starts, ends)


class Worker:
    """A rank other than 0: executes rank 0's commands on its shard until told to stop."""

    def __init__(self, link: Link, shard: Transformer):
        self.link, self.shard = link, shard
        self.caches: dict[int, KVCache] = {}
        self.decoders: dict[int, object] = {}  # compiled steps by id: decode and a verify have one each

    @torch.no_grad()
    def serve(self) -> None:
        while True:
            header = self.link.receive()
            op = header[0]
            if op == OP_SHUTDOWN:
                return
            if op == OP_FORWARD:
                tokens, positions, cache_id, rows, kv_len, last_only, packed = decode_forward(header, self.link)
                cache = self.caches[cache_id] if cache_id >= 0 else None
                self.shard(tokens, positions, cache, rows=rows, kv_len=kv_len, last_only=last_only, packed=packed)
            elif op == OP_NEW_CACHE:
                _, cache_id, max_batch, max_seq_len, dtype, spare_slots = header[:6]
                self.caches[cache_id] = self.shard.new_cache(
                    max_batch, self.link.device, DTYPES[dtype], max_seq_len if max_seq_len > 0 else None, spare_slots
                )
            elif op == OP_RESET:
                self.caches[header[1]].reset(slice(header[2], None if header[3] < 0 else header[3]))
            elif op == OP_FORGET:
                self.caches[header[1]].forget(*header[2:5])
            elif op == OP_DECODE:
                _, batch, t, kv_len, step_id = header[:5]
                payload = self.link.receive_payload(2 * batch * t)
                self.decoders[step_id](payload[: batch * t].view(batch, t), payload[batch * t :].view(batch, t), kv_len)
            elif op == OP_COMPILE:
                _, cache_id, mode, backend, step_id = header[:5]
                self.decoders[step_id] = self.shard.compile_decode(
                    self.caches[cache_id], COMPILE_MODES[mode], BACKENDS[backend]
                )
            else:
                raise RuntimeError(f"unknown tensor-parallel command {op}")


class TensorParallelModel(nn.Module):
    """Rank 0's view of a model sharded over `tensor_parallel_size` ranks: the runner drives it as it
    drives a Transformer (engine.runner.RunnableModel).

    `parameters()` are rank 0's shard (they give the engine its device and dtype); `config` is the
    full model's. Caches must come from `new_cache`."""

    def __init__(self, shard: Transformer, config: ModelConfig, link: Link, processes=(), on_close=None):
        super().__init__()
        self.shard, self.config, self.link = shard, config, link
        self.tensor_parallel_size = link.world
        self._processes, self._on_close = list(processes), on_close
        self._n_caches, self._n_steps, self._failure, self._closed = 0, 0, None, False

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                rows: slice | Tensor | None = None, kv_len: int | None = None, last_only: bool = False,
                packed: Tensor | None = None) -> Tensor:
        if cache is not None and not (isinstance(cache, ShardedKVCache) and cache.model is self):
            raise TypeError("a tensor-parallel model needs a cache made by its new_cache(), not a KVCache")
        if cache is not None and positions is None:
            raise ValueError("positions are required with a cache")
        check_packed(packed, cache, last_only)  # here, before the workers are sent a forward they would fail
        header, payload = encode_forward(tokens, positions, -1 if cache is None else cache.cache_id, rows, kv_len,
                                         last_only, packed)
        with self.collective("a forward pass"):
            self.link.send(header, payload)
            return self.shard(tokens, positions, cache, rows=rows, kv_len=kv_len, last_only=last_only, packed=packed)

    def new_cache(self, max_batch: int = 1, device=None, dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = None, spare_slots: int = 0) -> ShardedKVCache:
        """A KV cache sharded by KV heads: rank 0 gets its part here, each worker allocates its own."""
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
        cache_id, self._n_caches = self._n_caches, self._n_caches + 1
        with self.collective("allocating a cache"):
            self.link.send([OP_NEW_CACHE, cache_id, max_batch, max_seq_len or -1, DTYPES.index(dtype), spare_slots])
            return ShardedKVCache(self, cache_id, self.shard.config, max_batch, device, dtype, max_seq_len, spare_slots)

    def compile_decode(self, cache: ShardedKVCache, mode: str | None = None, backend: str = "inductor"):
        """A compiled step `(tokens [B, T], positions [B, T], kv_len) -> logits` over all of `cache`'s
        rows: decode (T = 1), or a verify of k + 1 tokens as a second step of its own. Every rank compiles
        its own shard's step (CUDA graphs with mode "reduce-overhead"); each call sends the inputs, then
        replays rank 0's."""
        if mode not in COMPILE_MODES or backend not in BACKENDS:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES} and backend one of {BACKENDS}")
        step_id, self._n_steps = self._n_steps, self._n_steps + 1
        with self.collective("compiling the decode step"):
            self.link.send([OP_COMPILE, cache.cache_id, COMPILE_MODES.index(mode), BACKENDS.index(backend), step_id])
            local = self.shard.compile_decode(cache, mode, backend)

        def decode(tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
            payload = torch.cat([tokens.reshape(-1), positions.reshape(-1)])
            with self.collective("a decode step"):
                self.link.send([OP_DECODE, *tokens.shape, int(kv_len), step_id], payload)
                return local(tokens, positions, kv_len)

        return decode

    @contextlib.contextmanager
    def collective(self, what: str):
        """Run rank 0's side of a command; any failure shuts the model down for good."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        if self._closed:
            raise TensorParallelError("this tensor-parallel model has been closed")
        try:
            yield
        except Exception as e:
            self._failure = self._describe(e, what)
            self._stop(graceful=False)
            raise TensorParallelError(self._failure) from None

    def _describe(self, error: Exception, what: str) -> str:
        deadline = time.monotonic() + 2.0  # a rank that was killed is reaped within moments
        dead = []
        while self._processes and not dead and time.monotonic() < deadline:
            dead = [(r, p) for r, p in enumerate(self._processes, 1) if p.exitcode is not None]
            time.sleep(0.05)
        if dead:
            rank, process = dead[0]
            code = process.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return (f"tensor-parallel rank {rank} of {self.link.world} (pid {process.pid}) {how} during {what}; "
                    "the model has been shut down, load it again")
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0])  # gloo's source path
        if "timed out" in reason.lower():
            return (f"a tensor-parallel rank did not answer within {self.link.timeout_s:g}s during {what}; "
                    "the model has been shut down, load it again")
        return (f"tensor parallelism failed during {what} ({type(error).__name__}: {reason}); "
                "the model has been shut down, load it again")

    def close(self) -> None:
        """Stop the workers and leave the process group (safe to call twice)."""
        if not self._closed:
            self._stop(graceful=self._failure is None)

    def _stop(self, graceful: bool) -> None:
        self._closed = True
        if graceful:
            with contextlib.suppress(Exception):
                self.link.send([OP_SHUTDOWN])
        for process in self._processes:
            process.join(timeout=10 if graceful else 0.5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        with contextlib.suppress(Exception):
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if not graceful and self.link.device.type == "cuda" and abort is not None:
                abort()  # NCCL work queued with a dead peer would make a plain destroy wait for it
            else:
                dist.destroy_process_group()
        if self._on_close is not None:
            self._on_close()
