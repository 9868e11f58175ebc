"""The collectives a shard needs: each layer's row-parallel output summed over the ranks, and the
head split by vocabulary. How the weights split is the shard rule of `mistral7b.weights`."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn


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
