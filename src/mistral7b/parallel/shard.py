"""How the model splits over N ranks: the local config and the slice of each canonical tensor.

Rank r keeps KV heads [r*K/N, (r+1)*K/N) and the query heads that use them (whole GQA groups),
and 1/N of the SwiGLU hidden units. wq/wk/wv/w1/w3 are split by output features (weight rows:
column parallel), wo/w2 by input features (weight columns: row parallel) and each of those two is
followed by one all-reduce. Norms and the embedding are replicated; the head is replicated or split
by vocabulary. `Transformer(local_config)` is then exactly one rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from ..config import ModelConfig

HEAD_MODES = ("replicated", "vocab")


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
class Slice:
    """Rows or columns [start, stop) of a 2-D weight; dim 0 splits output features, dim 1 input features."""

    dim: int
    start: int
    stop: int


def tensor_slice(name: str, config: ModelConfig, rank: int, world: int, head: str = "replicated") -> Slice | None:
    """The part of canonical tensor `name` that rank `rank` holds, or None when it holds all of it."""
    key = name.removesuffix(".weight").rpartition(".")[2] if name.startswith("layers.") else name.removesuffix(".weight")
    q, kv, hidden = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    sizes = {"wq": (0, q), "wk": (0, kv), "wv": (0, kv), "wo": (1, q), "w1": (0, hidden), "w3": (0, hidden),
             "w2": (1, hidden)}
    if name.startswith("layers.") and key in sizes:
        dim, size = sizes[key]
    elif name == "output.weight" and head == "vocab":
        dim, size = 0, config.vocab_size
    else:
        return None
    part = size // world
    return Slice(dim, rank * part, (rank + 1) * part)


class AllReduce(nn.Module):
    """Sum the ranks' partial outputs of a row-parallel matmul (in place eagerly; functional when compiled)."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return funcol.all_reduce(x, "sum", self.group)
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(nn.Module):
    """The output projection split by vocabulary rows; every rank gets the full logits by an all-gather."""

    def __init__(self, weight: Tensor, world: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.world, self.group = world, group

    def forward(self, x: Tensor) -> Tensor:
        local = nn.functional.linear(x, self.weight)
        if torch.compiler.is_compiling():
            parts = funcol.all_gather_tensor(local.movedim(-1, 0).contiguous(), 0, self.group)
            return parts.movedim(0, -1)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def install_collectives(model: nn.Module, group) -> None:
    """Make a shard model's attention and feed-forward outputs the sum over all ranks."""
    for layer in model.layers:
        layer.attention.reduce = AllReduce(group)
        layer.feed_forward.reduce = AllReduce(group)
