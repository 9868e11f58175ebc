"""Prefix caching that keeps the sliding window exact.

Requests that share a prompt prefix (a system prompt, few-shot examples, a chat history) reuse its
keys and values instead of recomputing them. Prompts are cut into blocks of B tokens (default 64);
block i's key is blake2b(key of block i-1 || the block's token ids as int32), so a key names the
whole prefix up to the end of its block. A request with a LoRA adapter computes other keys and values
than the base model's: block 0's parent key is then a hash of the adapter's key (its name and load
number, engine/adapters.py), so requests of one adapter share prefixes and never anyone else's. A
stored block holds, for every layer, the K and V of its B positions, in one preallocated pool on the
cache's device and dtype (the memory budget).

Which positions a restore needs. A prefill of L tokens leaves, in a layer whose buffer has S slots
(S = W for a rolling layer, `max_seq_len` for a linear one), exactly positions [max(0, L - S), L),
position p in slot p % S, every other slot empty. `restore` writes just that into the new row: a
rolling layer gets only the blocks covering its last W positions, a linear layer all of [0, L).
Prefilling the rest of the prompt from position L then sees the same keys at the same positions as
without the cache, so logits agree to float rounding and greedy tokens are equal.

Copy into the row, not share blocks by reference. Measured (benchmarks/prefix_bench.py):
- CPU, this 2-core machine under a load average of 10-14 from other jobs (one torch thread, fp32,
  SmolLM2-135M's shape with W = 512, B = 64, 4 prompts of 1024 shared + 64 own tokens): recomputing
  costs 951 ms per block of 64 tokens; restoring costs 2.5 ms per block copied (all 30 layers,
  2.9 MB) and storing 2.8 ms per block, so a copy is about 370x cheaper than recomputing. Prefill of
  the 4 prompts took 64.7 s without the cache and 21.7 s with it (3.0x; 3.4x is the token ratio).
  Last-token logits agree to 3e-7 and the greedy next tokens 4/4.
- Rows are preallocated dense buffers of S slots, so sharing blocks would save no memory; it would
  need block tables in every attention path (dense SDPA masks, FlexAttention, the grouped decode
  kernel, CUDA graphs), and a rolling buffer overwrites slot p % W as it decodes, so a shared block
  would need copy-on-write for the last W positions anyway.
- A restore copies at most S positions per layer whatever the prefix length: for Mistral 7B (bf16,
  W = 4096) at most 512 MiB (1 GiB read and written), about 0.25 ms at the H200's 4.3 TB/s, against
  about 115 ms to recompute 4096 tokens at 35.7k tok/s (the lead measures it with prefix_bench).

Eviction. The stored blocks form a forest of prefixes: a block is stored only when its parent is
stored, and only leaves are evicted (least recently used first). A hit touches its blocks leaf
first, so a parent is always more recent than its children and the LRU order meets leaves first.
`match` stops at the first missing block. Bytes in use never exceed the budget: the pool holds
`budget // block_bytes` blocks and is allocated once.

Integration guide (the engine scheduler; everything runs on the engine thread, in stream order):

1. Build once beside the KV cache: `prefix = PrefixCache(kv_cache, budget_bytes, block_size=64)`
   (`--prefix-cache-gib` x 2**30; `--no-prefix-cache`: build none).
2. Look a request up when its first prefill chunk is about to be scheduled, not on admission: in a
   burst of requests that share a prefix (all admitted in one step), the first one's prefill
   stores the blocks and the others must look up after that, or they all miss. In the prefill
   loop, before forming each group, for every pending request that has not started (no lookup
   yet): hold it back (neither look it up nor schedule it) while `prefix.waits_for(prompt_ids,
   [(q.prompt_ids, q.n_prefilled) for each request q mid-prefill or already in this group])`:
   another request is computing a block it shares. Otherwise, if `prefix.peek(prompt_ids) > 0` (no
   side effects), `n = prefix.load(row, prompt_ids)`: set its prefill offset to n (`n_prefilled =
   n`) and mark it looked up. When a request joins a group at offset 0 without a hit, call
   `prefix.load(row, prompt_ids)` once for it (returns 0, counts the miss, resets the row). n is a
   multiple of B and at most len(prompt) - 1, so at least one prompt token is prefilled and gives
   the first token's logits. `load` rewrites the whole row (no reset needed). `match` + `restore`
   is the split form of `load`: a hit pins its blocks against eviction until restored, or until
   `prefix.release(hit)` for a request dropped in between. tests/test_engine_prefix_cache.py `_burst`
   is this recipe in miniature.
3. After every prefill chunk [start, end) of a row: `prefix.store(row, prompt_ids, start, end)`,
   before any later chunk or decode step writes that row. It copies out the blocks that are now
   complete and not yet stored. A partial last block waits: the next chunk completes and stores
   it, provided its first positions are still in the row; the prompt's own partial last block is
   never stored. The chunk length must be at most `prefix.max_chunk(start)` = (smallest layer
   size S) - start % B, so that the oldest incomplete block is still in the rolling buffer when the
   chunk completes it (block-aligned chunk starts make that simply n <= W); `store` raises
   ValueError if a longer chunk lost positions it needed. Rows prefilled together in one forward
   are stored one by one.
4. On finish or abort: nothing (blocks are read-only once stored and belong to the cache, not to
   requests); only a `match` not followed by `restore` must be released.
5. Metrics for /metrics from `prefix.metrics()` (vLLM's names with our prefix), counters:
   `mistral7b:prefix_cache_queries` (prompt tokens looked up), `mistral7b:prefix_cache_hits` (of
   those, tokens restored), `mistral7b:prefix_cache_stored_tokens`, `mistral7b:prefix_cache_evictions`
   (blocks); gauges: `mistral7b:prefix_cache_usage_bytes`, `mistral7b:prefix_cache_capacity_bytes`.

Stored tokens are prompt tokens only: generated tokens are not cached (a chat's next turn reuses
the prompt part of its history, not the previous answer).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..utils import slice_or_index

DEFAULT_BLOCK_SIZE = 64


def block_keys(prompt_ids: list[int], block_size: int, n_blocks: int, adapter: str | None = None) -> list[bytes]:
    """Keys of the first `n_blocks` complete blocks: each hashes its parent's key and its token ids;
    block 0's parent is the `adapter` key's hash (none for the base model)."""
    data = array("i", prompt_ids[: n_blocks * block_size]).tobytes()
    step = 4 * block_size
    keys = []
    key = b"" if adapter is None else hashlib.blake2b(b"lora\0" + adapter.encode(), digest_size=16).digest()
    for i in range(n_blocks):
        key = hashlib.blake2b(key + data[i * step : (i + 1) * step], digest_size=16).digest()
        keys.append(key)
    return keys


@dataclass(eq=False)
class _Block:
    key: bytes
    parent: _Block | None
    slot: int  # index in the pool
    children: int = 0  # stored blocks whose parent this is
    pins: int = 0  # hits matched but not yet restored


@dataclass(eq=False)
class PrefixHit:
    """What `match` found: the first `n_tokens` prompt tokens are cached in `blocks` (pinned)."""

    n_tokens: int
    blocks: tuple[_Block, ...]
    pinned: bool = True


@dataclass
class PrefixCacheCounters:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached
    requests: int = 0  # lookups
    hit_requests: int = 0  # lookups that found at least one block
    stored_tokens: int = 0
    evictions: int = 0  # blocks evicted
    skipped_blocks: int = 0  # store attempts refused: the pool was full of pinned blocks and their parents


@dataclass(eq=False)
class PrefixCache:
    """Content-addressed prompt blocks for one KVCache, within a memory budget, LRU-evicted."""

    cache: KVCache
    budget_bytes: int
    block_size: int = DEFAULT_BLOCK_SIZE
    counters: PrefixCacheCounters = field(default_factory=PrefixCacheCounters)

    def __post_init__(self):
        B = self.block_size
        if not isinstance(B, int) or B < 1:
            raise ValueError(f"prefix cache block size must be a positive integer, got {B!r}")
        if not isinstance(self.budget_bytes, int) or self.budget_bytes < 0:
            raise ValueError(f"prefix cache budget must be a non-negative number of bytes, got {self.budget_bytes!r}")
        self.min_size = min(layer.size for layer in self.cache.layers)
        if B > self.min_size:
            raise ValueError(f"prefix cache block size {B} exceeds the smallest cache layer ({self.min_size} slots)")
        first = self.cache.layers[0].k
        _, self.n_kv_heads, _, self.head_dim = first.shape
        n_layers = len(self.cache.layers)
        self.block_bytes = 2 * n_layers * self.n_kv_heads * B * self.head_dim * first.element_size()
        self.capacity = self.budget_bytes // self.block_bytes
        # [layer, K/V, kv head, block, position in block, head_dim]: a block's K of one layer is [kv, B, hd].
        shape = (n_layers, 2, self.n_kv_heads, self.capacity, B, self.head_dim)
        self.pool = torch.empty(shape, dtype=first.dtype, device=first.device)
        self.free = list(range(self.capacity - 1, -1, -1))
        self.blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first

    # -- lookups --------------------------------------------------------------------------------

    def match(self, prompt_ids: list[int], adapter: str | None = None) -> PrefixHit:
        """The longest cached prefix of whole blocks (of the base model, or of the LoRA `adapter` key),
        leaving at least one token to compute; pinned until `restore` or `release`."""
        n_blocks = (len(prompt_ids) - 1) // self.block_size
        path = self._cached_path(block_keys(prompt_ids, self.block_size, n_blocks, adapter))
        for block in path:
            block.pins += 1
        self._touch(path)
        n_tokens = len(path) * self.block_size
        c = self.counters
        c.requests += 1
        c.queries += len(prompt_ids)
        c.hits += n_tokens
        c.hit_requests += n_tokens > 0
        return PrefixHit(n_tokens, tuple(path))

    def peek(self, prompt_ids: list[int], adapter: str | None = None) -> int:
        """How many tokens `match` would find now, with no side effect (no pins, counters or LRU touch)."""
        n_blocks = (len(prompt_ids) - 1) // self.block_size
        return len(self._cached_path(block_keys(prompt_ids, self.block_size, n_blocks, adapter))) * self.block_size

    def waits_for(self, prompt_ids: list[int], others: list[tuple], adapter: str | None = None) -> bool:
        """True when one of `others` (a request mid-prefill: its prompt ids, prefill offset and, if
        any, adapter key) is now computing a block that this prompt shares with it and could restore:
        starting this request later, after that block is stored, saves recomputing it."""
        B = self.block_size
        for ids, offset, *other_adapter in others:
            end = (offset // B + 1) * B  # the end of the block that request is computing
            if (other_adapter or [None])[0] != adapter:
                continue  # another model's keys and values: nothing to share
            if end <= len(ids) and end < len(prompt_ids) and prompt_ids[:end] == ids[:end]:
                return True
        return False

    def restore(self, row: int, hit: PrefixHit) -> int:
        """Write into `row` what a prefill of the hit's tokens would have left; return their number."""
        if not hit.pinned:
            raise ValueError("this prefix hit was already restored or released")
        try:
            if hit.n_tokens == 0:
                self.cache.reset(slice(row, row + 1))
                return 0
            self._restore(row, hit)
            return hit.n_tokens
        finally:
            self.release(hit)

    def load(self, row: int, prompt_ids: list[int], adapter: str | None = None) -> int:
        """`match` then `restore`: the number of prompt tokens now in `row` (0 on a miss)."""
        return self.restore(row, self.match(prompt_ids, adapter))

    def release(self, hit: PrefixHit) -> None:
        """Unpin a hit's blocks (done by `restore`; call it for a hit that will not be restored)."""
        if hit.pinned:
            hit.pinned = False
            for block in hit.blocks:
                block.pins -= 1

    def _restore(self, row: int, hit: PrefixHit) -> None:
        B, L = self.block_size, hit.n_tokens
        slots: dict[int, torch.Tensor | slice] = {}  # first block needed -> where its blocks are in the pool
        for i, layer in enumerate(self.cache.layers):
            start = max(0, L - layer.size)
            first = start // B
            if first not in slots:
                slots[first] = slice_or_index([b.slot for b in hit.blocks[first:]], self.pool.device)
            where = slots[first]
            kv = self.pool[i][:, :, where] if isinstance(where, slice) else self.pool[i].index_select(2, where)
            kv = kv.reshape(2, self.n_kv_heads, -1, self.head_dim)[:, :, start - first * B :]  # a view for a slice
            layer.fill_row(row, start, kv[0], kv[1])

    # -- storing --------------------------------------------------------------------------------

    def max_chunk(self, start: int) -> int:
        """The longest prefill chunk starting at `start` whose complete blocks `store` can still read."""
        return self.min_size - start % self.block_size

    def store(self, row: int, prompt_ids: list[int], start: int, end: int, adapter: str | None = None) -> int:
        """After a prefill chunk wrote positions [start, end) of `row` (with the LoRA `adapter` key, if
        any): copy out the blocks now complete and not yet stored. Returns the number of tokens stored."""
        if not 0 <= start < end <= len(prompt_ids):
            raise ValueError(f"chunk [{start}, {end}) is not inside a prompt of {len(prompt_ids)} tokens")
        B = self.block_size
        n_complete = end // B
        if self.capacity == 0 or n_complete == 0:
            return 0
        keys = block_keys(prompt_ids, B, n_complete, adapter)
        path = self._cached_path(keys)
        first_new = len(path)
        if first_new == n_complete:
            self._touch(path)
            return 0
        if first_new * B < end - self.min_size:  # block `first_new` is no longer (all) in the row
            if first_new >= start // B:
                raise ValueError(
                    f"prefill chunk [{start}, {end}) is too long for the prefix cache: at most "
                    f"{self.max_chunk(start)} tokens from position {start} (the rolling buffer holds {self.min_size})"
                )
            # An earlier block went unstored (full pool, or evicted since): later ones would be unreachable.
            self._touch(path)
            return 0
        new = self._allocate_chain(keys[first_new:], path[-1] if path else None)
        if new:
            self._copy_out(row, first_new * B, new)
        self._touch(path + new)
        self.counters.stored_tokens += len(new) * B
        return len(new) * B

    def _allocate_chain(self, keys: list[bytes], parent: _Block | None) -> list[_Block]:
        new = []
        for key in keys:
            slot = self._free_slot(protect=parent)
            if slot is None:
                self.counters.skipped_blocks += len(keys) - len(new)
                break
            block = _Block(key, parent, slot)
            if parent is not None:
                parent.children += 1
            self.blocks[key] = block
            new.append(block)
            parent = block
        return new

    def _copy_out(self, row: int, start: int, blocks: list[_Block]) -> None:
        # One strided copy per run of consecutive pool slots (measured on CPU: index_copy_ from the
        # strided row is 4-40x slower than plain copies; on CUDA runs are few as free slots come in order).
        n = len(blocks)
        runs = _runs([b.slot for b in blocks])
        for i, layer in enumerate(self.cache.layers):
            k, v = layer.read_span(row, start, start + n * self.block_size)
            for j, src in enumerate((k, v)):
                src = src.view(self.n_kv_heads, n, self.block_size, self.head_dim)
                for offset, slot, length in runs:
                    self.pool[i, j, :, slot : slot + length].copy_(src[:, offset : offset + length])

    def _free_slot(self, protect: _Block | None) -> int | None:
        """A free pool slot, evicting the least recently used unpinned leaf if need be."""
        if not self.free:
            victim = next(
                (b for b in self.blocks.values() if b.children == 0 and b.pins == 0 and b is not protect), None
            )
            if victim is None:
                return None
            del self.blocks[victim.key]
            if victim.parent is not None:
                victim.parent.children -= 1
            self.free.append(victim.slot)
            self.counters.evictions += 1
        return self.free.pop()

    # -- helpers --------------------------------------------------------------------------------

    def _cached_path(self, keys: list[bytes]) -> list[_Block]:
        path = []
        for key in keys:
            block = self.blocks.get(key)
            if block is None:
                break
            path.append(block)
        return path

    def _touch(self, path: list[_Block]) -> None:
        """Most recently used, leaf first: a parent ends up more recent than each of its children."""
        for block in reversed(path):
            self.blocks.move_to_end(block.key)

    @property
    def used_bytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    def metrics(self) -> dict[str, int]:
        """Prometheus-style names (vLLM's, with our prefix) and their current values."""
        c = self.counters
        return {
            "mistral7b:prefix_cache_queries": c.queries,
            "mistral7b:prefix_cache_hits": c.hits,
            "mistral7b:prefix_cache_stored_tokens": c.stored_tokens,
            "mistral7b:prefix_cache_evictions": c.evictions,
            "mistral7b:prefix_cache_usage_bytes": self.used_bytes,
            "mistral7b:prefix_cache_capacity_bytes": self.capacity * self.block_bytes,
        }


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive values: (index in `slots`, first slot, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, slot, 1))
    return runs
