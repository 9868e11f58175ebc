"""KV caches: a rolling buffer of W slots for windowed layers, a linear cache for the others.

Position p lives in slot `p % size`. RoPE is applied before caching, so the order of slots inside the
buffer does not matter: attention masks by the position stored beside each slot. A linear cache is
the same structure with `size = max_seq_len`, where `p % size == p`.

Each row of the batch dimension is one sequence; the engine hands rows out and resets them.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelConfig


@dataclass
class LayerCache:
    k: Tensor  # [max_batch, n_kv_heads, size, head_dim]
    v: Tensor
    pos: Tensor  # [max_batch, size] int64, position held by each slot, -1 when empty; shared, see KVCache
    window: int | None
    spare: int = 0  # slots beyond the window (or max_seq_len): how far a verify may write ahead

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def update(self, k_new: Tensor, v_new: Tensor, q_pos: Tensor, rows: slice | Tensor, kv_len: int | None,
               memo: dict | None = None):
        """Store the new keys/values; return (k, v, k_pos) that the new queries attend over.

        `rows` is a slice or a 1-D index tensor of cache rows, one per batch entry. `kv_len`, when
        given, bounds 1 + the largest position any of these rows holds after this call, so only the
        leading slots that can be filled are read. Without it the whole buffer is read. `memo` lives
        for one forward pass: the first layer of each slot count writes the shared positions and
        works out the slots, and the others reuse them and the same k_pos tensor.

        Decode (one token) writes first and reads the buffer: the slot it overwrites held position
        p - size, which the query no longer sees; so does a verify (`writes_first`). A prefill chunk
        reads the old contents first and appends itself, since its early queries still need slots that
        its later tokens overwrite.
        """
        memo = {} if memo is None else memo
        t = q_pos.shape[1]
        if self.writes_first(q_pos):  # decode's one token too
            n = self.size if kv_len is None else min(kv_len, self.size)
            self._write(rows, k_new, v_new, q_pos, memo)
            k_pos = _memoized(memo, ("k_pos first", self.size), lambda: self.pos[rows, :n])
            return self.k[rows, :, :n], self.v[rows, :, :n], k_pos
        n = self.size if kv_len is None else min(kv_len - t, self.size)
        # Read before the first layer's write changes the shared positions.
        k_pos = _memoized(memo, ("k_pos", self.size), lambda: torch.cat([self.pos[rows, :n], q_pos], dim=1))
        k = torch.cat([self.k[rows, :, :n], k_new], dim=2)
        v = torch.cat([self.v[rows, :, :n], v_new], dim=2)
        keep = min(t, self.size)
        self._write(rows, k_new[:, :, -keep:], v_new[:, :, -keep:], q_pos[:, -keep:], memo)
        return k, v, k_pos

    def writes_first(self, q_pos: Tensor) -> bool:
        """Whether t new tokens are written before the buffer is read, as decode's one is: when they
        overwrite no key any of them sees (t - 1 <= spare slots: a speculative verify). Reading the old
        slots and then writing copies them: compiled, the whole buffer (a 7B verify of 5 tokens cost 4.6
        decode steps on the H200); eagerly on a CPU, three copies a layer."""
        return q_pos.shape[1] - 1 <= self.spare

    def _write(self, rows: slice | Tensor, k_new, v_new, q_pos, memo: dict):
        """Scatter into slots `pos % size`. Rows whose position is -1 (idle rows riding along in a
        batched decode step) write their slot's old contents back, so one launch serves every row.

        Indexing the full buffers (not a view of the rows) matters under torch.compile: a write
        through a view is functionalised into a copy of the whole buffer.
        """
        key = ("slots", self.size)
        if key not in memo:
            keep = q_pos >= 0
            slots = q_pos.clamp(min=0) % self.size  # [B, T], distinct within a row since T <= size
            if isinstance(rows, Tensor):
                row_index = rows[:, None]
            else:
                row_index = (rows.start or 0) + torch.arange(q_pos.shape[0], device=q_pos.device)[:, None]
            # On a CPU, eagerly, asking whether every row writes costs nothing and spares each layer
            # the read of the old slots (an index op, the dearest op of a default-model decode step).
            if q_pos.device.type == "cpu" and not torch.compiler.is_compiling() and bool(keep.all()):
                keep = None
            self.pos[row_index, slots] = q_pos if keep is None else torch.where(keep, q_pos, self.pos[row_index, slots])
            memo[key] = row_index, slots, keep
        row_index, slots, keep = memo[key]
        for buf, new in ((self.k, k_new), (self.v, v_new)):
            new = new.transpose(1, 2).to(buf.dtype)
            buf[row_index, :, slots] = new if keep is None else torch.where(keep[..., None, None], new, buf[row_index, :, slots])

    def read_span(self, row: int, start: int, end: int) -> tuple[Tensor, Tensor]:
        """K and V [n_kv_heads, end - start, head_dim] of positions [start, end) of `row`, read from
        their slots (views when the span does not wrap). The row must still hold them: a rolling
        buffer keeps only the last `size` positions written."""
        parts = [(self.k[row, :, a:b], self.v[row, :, a:b]) for a, b in slot_ranges(self.size, start, end)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)

    def fill_row(self, row: int, start: int, k: Tensor, v: Tensor) -> None:
        """Make `row` hold exactly positions [start, start + n) with these K and V [n_kv_heads, n, head_dim],
        each in slot `p % size`, and every other slot empty: what a prefill of positions 0..start+n-1
        leaves when `start = max(0, start + n - size)`."""
        self.pos[row].fill_(-1)
        offset = 0
        for a, b in slot_ranges(self.size, start, start + k.shape[1]):
            self.k[row, :, a:b].copy_(k[:, offset : offset + b - a])
            self.v[row, :, a:b].copy_(v[:, offset : offset + b - a])
            first = start + offset
            self.pos[row, a:b].copy_(torch.arange(first, first + b - a, device=self.pos.device))
            offset += b - a


def zeros(shape: tuple[int, ...], device, dtype: torch.dtype) -> Tensor:
    """torch.zeros, except that on a CPU the buffer is an anonymous mapping (zero pages until written)
    without transparent huge pages: a slot written maps 4 KiB, not the 2 MiB around it (one KV head's
    8,192 positions of the default model). A default CPU engine's cache (8 rows x 8,192 positions in
    float32: 2.9 GB) then costs what its sequences hold, not its capacity."""
    n_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device or "cpu").type != "cpu" or n_bytes == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    buffer = mmap.mmap(-1, n_bytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def _memoized(memo: dict, key, make):
    """memo[key], made once a forward. Keys hold plain values only: under torch.compile a symbolic kv_len
    in a key is hashed, which guards on its value and compiles the step again for every kv_len bucket."""
    if key not in memo:
        memo[key] = make()
    return memo[key]


def slot_ranges(size: int, start: int, end: int) -> list[tuple[int, int]]:
    """The slot ranges [a, b) that positions [start, end) occupy in a buffer of `size` slots, in
    position order: one range, or two when the span wraps round the end of the buffer."""
    if not 0 <= start <= end or end - start > size:
        raise ValueError(f"positions [{start}, {end}) do not fit in a buffer of {size} slots")
    first = start % size
    if first + end - start <= size:
        return [(first, first + end - start)]
    return [(first, size), (0, first + end - start - size)]


class KVCache:
    """All layers' caches for up to `max_batch` sequences, preallocated once.

    Every layer holds the same positions, so layers with the same slot count share one `pos`
    tensor: a forward pass writes it, and builds its masks from it, once rather than per layer.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_batch: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_seq_len: int | None = None,
        spare_slots: int = 0,
    ):
        """`spare_slots` extra slots per layer let a speculative verify write k draft positions past
        the newest one without overwriting any key still inside the window (engine/speculative.py)."""
        self.config = config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or config.max_seq_len
        self.layers: list[LayerCache] = []
        shape = lambda size: (max_batch, config.n_kv_heads, size, config.head_dim)  # noqa: E731
        positions: dict[int, Tensor] = {}
        for window in config.layer_windows():
            rolls = window is not None and (config.has_window or window < self.max_seq_len)
            size = (window if rolls else self.max_seq_len) + spare_slots
            if size not in positions:
                positions[size] = torch.full((max_batch, size), -1, device=device, dtype=torch.long)
            self.layers.append(
                LayerCache(
                    k=zeros(shape(size), device, dtype),
                    v=zeros(shape(size), device, dtype),
                    pos=positions[size],
                    window=window,
                    spare=spare_slots,
                )
            )

    @property
    def max_positions(self) -> int | None:
        """How many positions a sequence may reach, or None when every layer rolls."""
        return None if self.config.has_window else self.max_seq_len

    def forget(self, row: int, start: int, end: int) -> None:
        """Empty the slots of positions [start, end) of `row` (rejected draft tokens), so no later
        query sees them."""
        self.forget_rows([row], [start], [end])

    def forget_rows(self, rows: list[int], starts: list[int], ends: list[int]) -> None:
        """`forget` for several rows at once (a verify's rejections): one gather and one write per slot
        count (every layer of a slot count shares one `pos`), however many rows."""
        spans = [(row, start, p) for row, start, end in zip(rows, starts, ends) for p in range(start, end)]
        if not spans:
            return
        row, start, position = torch.tensor(spans, device=self.layers[0].pos.device).unbind(1)
        for pos in {id(layer.pos): layer.pos for layer in self.layers}.values():
            slots = position % pos.shape[1]
            held = pos[row, slots]
            pos[row, slots] = torch.where(held >= start, torch.full_like(held, -1), held)

    def reset(self, rows: slice | None = None) -> None:
        """Empty the given rows (all by default) so new sequences can use them."""
        rows = slice(None) if rows is None else rows
        for layer in self.layers:
            layer.pos[rows] = -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v))
