"""Each rank reads only its slices of a checkpoint and streams them into its meta-device shard.

The format readers of `mistral7b.loading` hand back the slice of each tensor that the weight map's
shard rule gives this rank (`weights.Sharding`), and `loading.assemble` places them into the shard
built from the local config, quantized as the load plan says: the plan of the full model, so every
rank holds exactly the groups one process would. GGUF blocks stay in their own format where the
rank's columns fall on group boundaries.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, ModelLoadError
from ..loading import Checkpoint, assemble, cut, open_checkpoint
from ..model import Transformer
from ..quant.plan import make_plan
from ..quant.qtensor import QuantizedWeight
from ..weights import Sharding, check_world_size, local_config
from .shard import VocabParallelHead


def load_shard(source, rank: int, world: int, group=None, device=None, dtype=None, head: str = "replicated",
               quant=None, on_tensor=None):
    """This rank's Transformer shard (collectives not yet installed) and the full config.

    `quant` is a QuantConfig or None, as for `load_model`; `on_tensor()` is called as each tensor is
    read (start-up progress). With `head="vocab"` the shard's `output` becomes a VocabParallelHead
    holding 1/N of the rows (dense)."""
    checkpoint = open_checkpoint(source)
    config = checkpoint.config
    if on_tensor is not None:
        checkpoint.reader = _counted(checkpoint.reader, on_tensor)
    check_world_size(config, world, head)
    sharding = Sharding(rank, world, head)
    if head == "replicated":
        return assemble(checkpoint, device, dtype, make_plan(config, quant, checkpoint.formats, sharding)), config
    head_rows: list = []

    def without_head(slice_of, keep):
        for name, tensor in checkpoint.stream(slice_of, keep):
            if name == "output.weight":
                head_rows.append(tensor)
                continue
            if name == "tok_embeddings.weight" and config.tie_embeddings:
                head_rows.append(cut(tensor, sharding.slice_of(config, "output.weight")))
            yield name, tensor

    # A tied config makes assemble expect no output.weight; the head is put in afterwards.
    tied = Checkpoint(checkpoint.path, config.with_(tie_embeddings=True), n_tensors=checkpoint.n_tensors,
                      formats=checkpoint.formats, reader=without_head)
    plan = make_plan(tied.config, quant, {n: f for n, f in checkpoint.formats.items() if n != "output.weight"}, sharding)
    model = assemble(tied, device, dtype, plan)
    if not head_rows:
        raise ModelLoadError(f"{checkpoint.path}: missing tensors output.weight")
    weight = head_rows[0]
    weight = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
    model.output = VocabParallelHead(weight.to(device=model.norm.weight.device, dtype=model.norm.weight.dtype),
                                     world, group)
    return model, config


def _counted(reader, on_tensor):
    def read(slice_of, keep):
        for item in reader(slice_of, keep):
            on_tensor()
            yield item

    return read


def random_shard(config: ModelConfig, rank: int, world: int, group=None, device=None, dtype=None,
                 head: str = "replicated"):
    """A shard with random weights at `config`'s shape, built on the device (benchmarks: speed does
    not depend on the values, and no 14 GB checkpoint has to be written first)."""
    check_world_size(config, world, head)
    torch.manual_seed(rank)
    with torch.device(device or "cpu"):
        model = Transformer(local_config(config, world)).to(dtype or torch.float32).eval()
        if head == "vocab":
            weight = torch.randn(config.vocab_size // world, config.dim, dtype=model.norm.weight.dtype) * 0.02
            model.output = VocabParallelHead(weight, world, group)
    return model, config
