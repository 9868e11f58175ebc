"""The canonical weight map: each weight of a `Transformer` under its canonical name (Mistral's,
unfused), the module and rows that hold it (q, k, v fused into `wqkv`; w1, w3 into `w13`), and how
tensor parallelism splits it. Loading, quantization and sharding all read this map.

Rank r of N keeps KV heads [r*K/N, (r+1)*K/N) with the query heads that use them, and 1/N of the
SwiGLU units: wq/wk/wv/w1/w3 split by output rows, wo/w2 by input columns (each followed by an
all-reduce); norms and the embedding are whole, the head whole or split by vocabulary rows.
`Transformer(local_config(config, N))` is one rank's shard, and its own map places each slice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .config import ModelConfig

HEAD_MODES = ("replicated", "vocab")


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0, output features) or columns (dim 1, input features) [start, stop) of a 2-D weight."""

    dim: int
    start: int
    stop: int

    def cut(self, t):
        """These rows or columns of anything indexable like a tensor (a safetensors slice, a mapped array)."""
        return t[self.start : self.stop] if self.dim == 0 else t[:, self.start : self.stop]


@dataclass(frozen=True)
class WeightSlot:
    """Canonical tensor `name` is rows [lo, hi) of the weight of module `module`, `cols` wide (0: a
    vector). `split` is the dim tensor parallelism splits (None: every rank holds all of it);
    `heads` is set for q/k, whose rows some formats store per head in interleaved pairs."""

    name: str
    module: str
    lo: int
    hi: int
    cols: int
    split: int | None = None
    heads: int | None = None

    @property
    def quantizable(self) -> bool:  # a matrix: a block linear, the head or the embedding
        return self.cols > 0


def _layer_parts(c: ModelConfig) -> list[tuple[str, str, int, int, int | None, int | None]]:
    """(part, module, rows, cols, split, heads) in the order of each fused module's rows."""
    q, kv, hidden = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim
    return [
        ("attention_norm", "attention_norm", c.dim, 0, None, None),
        ("ffn_norm", "ffn_norm", c.dim, 0, None, None),
        ("attention.wq", "attention.wqkv", q, c.dim, 0, c.n_heads),
        ("attention.wk", "attention.wqkv", kv, c.dim, 0, c.n_kv_heads),
        ("attention.wv", "attention.wqkv", kv, c.dim, 0, None),
        ("attention.wo", "attention.wo", c.dim, q, 1, None),
        ("feed_forward.w1", "feed_forward.w13", hidden, c.dim, 0, None),
        ("feed_forward.w3", "feed_forward.w13", hidden, c.dim, 0, None),
        ("feed_forward.w2", "feed_forward.w2", c.dim, hidden, 1, None),
    ]


@functools.lru_cache(maxsize=4)  # readers ask for each tensor they stream; callers never change it
def weight_map(config: ModelConfig) -> dict[str, WeightSlot]:
    """canonical name -> its slot, for every weight of the model. A tied head is left out: its weight
    is the embedding's (`output.weight` is listed only when the head is a matrix of its own)."""
    c = config
    slots = [WeightSlot("tok_embeddings.weight", "tok_embeddings", 0, c.vocab_size, c.dim),
             WeightSlot("norm.weight", "norm", 0, c.dim, 0)]
    if not c.tie_embeddings:
        slots.append(head_slot(c))
    for i in range(c.n_layers):
        filled: dict[str, int] = {}
        for part, module, rows, cols, split, heads in _layer_parts(c):
            lo = filled.get(module, 0)
            filled[module] = lo + rows
            slots.append(WeightSlot(f"layers.{i}.{part}.weight", f"layers.{i}.{module}", lo, lo + rows, cols, split, heads))
    return {s.name: s for s in slots}


def head_slot(config: ModelConfig) -> WeightSlot:
    """The output head's slot (also for a tied model, whose quantized head is a module of its own)."""
    return WeightSlot("output.weight", "output", 0, config.vocab_size, config.dim, split=0)


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """module path -> (rows, cols) of its weight, for the quantizable modules (head included)."""
    shapes: dict[str, tuple[int, int]] = {}
    for s in [*weight_map(config).values(), head_slot(config)]:
        if s.quantizable:
            shapes[s.module] = (max(s.hi, shapes.get(s.module, (0,))[0]), s.cols)
    return shapes


def check_world_size(config: ModelConfig, world: int, head: str = "replicated") -> None:
    """A clear ValueError unless `world` ranks can each hold whole KV heads (and whole FFN/vocab slices)."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    if head not in HEAD_MODES:
        raise ValueError(f"unknown head split {head!r}; choose one of {', '.join(HEAD_MODES)}")
    if config.n_kv_heads % world:
        divisors = [d for d in range(1, config.n_kv_heads + 1) if config.n_kv_heads % d == 0]
        raise ValueError(
            f"tensor_parallel_size {world} does not divide this model's {config.n_kv_heads} KV heads; "
            f"choose one of {', '.join(map(str, divisors))}"
        )
    if config.hidden_dim % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide the feed-forward size {config.hidden_dim}")
    if head == "vocab" and config.vocab_size % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide the vocabulary ({config.vocab_size})")


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The config whose Transformer is one rank's shard (dim, vocab and windows unchanged)."""
    check_world_size(config, world)
    return config.with_(
        n_heads=config.n_heads // world, n_kv_heads=config.n_kv_heads // world, hidden_dim=config.hidden_dim // world
    )


@dataclass(frozen=True)
class Sharding:
    """Rank `rank` of `world`: which slice of each canonical tensor it reads (world 1: all of each)."""

    rank: int = 0
    world: int = 1
    head: str = "replicated"

    def slice_of(self, config: ModelConfig, name: str) -> Slice | None:
        """The part of canonical tensor `name` this rank holds, or None when it holds all of it."""
        slot = head_slot(config) if name == "output.weight" else weight_map(config).get(name)
        if slot is None or slot.split is None or self.world == 1 or (slot.module == "output" and self.head != "vocab"):
            return None
        part = ((slot.hi - slot.lo) if slot.split == 0 else slot.cols) // self.world
        return Slice(slot.split, self.rank * part, (self.rank + 1) * part)
