"""The load plan: which module gets which weight format, which stored tensors are read as they are
stored, and which slice of each this process reads; and swapping nn.Linear/nn.Embedding for the
quantized modules before anything is allocated.

The plan is decided before a single tensor is read, from `quantize` (a QuantConfig or None) and the
formats the checkpoint stores (a GGUF's tensor types, a quantized checkpoint's modules). A fused
matrix (wqkv, w13) takes one format that holds all its parts exactly (`merge_formats`); a part in 16
bits makes the whole module 16-bit. Module paths are the same in every tensor-parallel shard, so the
plan of the full model is every rank's plan; an int4 group size also divides each rank's share of a
row-parallel matrix, so the ranks together hold the groups of one process that uses the same sizes
(the load reports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig, ModelLoadError
from ..weights import Sharding, local_config, module_shapes, weight_map
from .config import QuantConfig, cuda_rows_kernel
from .linear import QuantEmbedding, quant_linear
from .qtensor import WeightFormat, merge_formats


@dataclass(frozen=True)
class LoadPlan:
    """`formats`: module path -> format of the quantized modules; `keep`: canonical names read in their
    stored quantized format (the rest arrive dense); `sharding`: which slice this process reads;
    `whole`: names read whole and cut after quantizing (int8's scale spans a whole row, so a rank
    holding some of its columns needs all of them to match one process); `rows_kernel`: the few-row CUDA
    kernel setting the quantized modules carry (MISTRAL7B_CUDA_ROWS_KERNEL when the plan is made)."""

    formats: dict[str, WeightFormat] = field(default_factory=dict)
    keep: frozenset[str] = frozenset()
    quant: QuantConfig | None = None
    sharding: Sharding = Sharding()
    whole: frozenset[str] = frozenset()
    rows_kernel: str = field(default_factory=cuda_rows_kernel)


def shardable(formats: dict[str, WeightFormat], config: ModelConfig, sharding: Sharding) -> dict[str, WeightFormat]:
    """The stored formats a rank can read as they are: a split of input columns must fall on group
    boundaries (a GGUF column split inside a group is read dense instead)."""
    out = {}
    for name, fmt in formats.items():
        part = sharding.slice_of(config, name)
        g = fmt.group_size
        # act-order's groups are scattered over the inputs: a rank holding some columns reads them dense
        if part is None or part.dim == 0 or (not fmt.act_order and (g is None or (part.start % g == 0
                                                                          and part.stop % g == 0))):
            out[name] = fmt
    return out


def make_plan(config: ModelConfig, quant: QuantConfig | None, stored: dict[str, WeightFormat],
              sharding: Sharding = Sharding()) -> LoadPlan:
    """The plan for the full model `config` (tensor parallel: this rank's reads of it)."""
    if quant is not None and quant.dense:
        return LoadPlan(quant=quant, sharding=sharding)
    stored = shardable(stored, config, sharding)
    parts: dict[str, list[tuple[str, WeightFormat | None]]] = {}
    for slot in weight_map(config).values():  # the block linears and an untied head
        if slot.quantizable and slot.module != "tok_embeddings":
            parts.setdefault(slot.module, []).append((slot.name, stored.get(slot.name)))
    if quant is not None:
        if config.tie_embeddings:  # a quantized copy of the embedding, on the embedding's grid
            parts["output"] = [("tok_embeddings.weight", stored.get("tok_embeddings.weight"))]
        shard = local_config(config, sharding.world) if sharding.world > 1 else config
        formats = _requested(module_shapes(shard), quant, parts)
        keep = {n for m, ps in parts.items() if m in formats for n, f in ps if _same(f, formats[m])}
        whole = {n for m, ps in parts.items() if m in formats and formats[m].group_size is None for n, _ in ps
                 if n not in keep and getattr(sharding.slice_of(config, n), "dim", 0) == 1}
        return LoadPlan(formats, frozenset(keep), quant, sharding, frozenset(whole))
    formats = {m: merge_formats([f for _, f in ps]) for m, ps in parts.items() if all(f for _, f in ps)}
    keep = {n for m, ps in parts.items() if m in formats for n, _ in ps}
    embedding = stored.get("tok_embeddings.weight")
    if embedding is not None:
        formats["tok_embeddings"] = embedding
        keep.add("tok_embeddings.weight")
    if config.tie_embeddings:  # the head is the quantized embedding, or a quantized copy stored apart
        head = embedding or stored.get("output.weight")
        if head is not None:
            formats["output"] = head
            keep.add("output.weight")
    return LoadPlan(formats, frozenset(keep), None, sharding)


def _same(stored: WeightFormat | None, wanted: WeightFormat) -> bool:
    return stored is not None and (stored.kind, stored.group_size, stored.has_zero, stored.act_order) == (
        wanted.kind, wanted.group_size, wanted.has_zero, wanted.act_order)


def _requested(shapes: dict, quant: QuantConfig, parts: dict) -> dict[str, WeightFormat]:
    """The format `quant` gives each module: int8 per channel, or int4 in groups (the requested size,
    else the grid the module's stored parts share, else the default; fitted to the width of the
    module, or of one rank's share of it: a group never straddles two ranks)."""
    out = {}
    for module, ps in sorted(parts.items()):
        if module == "output" and not quant.quantize_head:
            continue
        if quant.method == "int8":
            out[module] = WeightFormat("int8")
            continue
        grids = {f.group_size for _, f in ps if f is not None}
        source = grids.pop() if len(grids) == 1 and all(f is not None for _, f in ps) else None
        width = shapes[module][1]
        group = quant.group_size_for(width, source) or quant.group_size or width  # install reports a misfit
        out[module] = WeightFormat("int4", group, True)
        kept = [f for _, f in ps if _same(f, out[module])]
        if ps and len(kept) == len(ps):  # stored in this very format: it keeps its name ("from Q4_1")
            out[module] = merge_formats(kept)
    return out


def install(model: nn.Module, formats: dict[str, WeightFormat], device: torch.device, dtype: torch.dtype,
            path, rows_kernel: str = "auto") -> dict[str, nn.Module]:
    """Replace the planned modules of a meta-device model by empty quantized ones (running few CUDA
    rows through `rows_kernel`)."""
    modules = {}
    for name, fmt in formats.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        try:
            if isinstance(old, nn.Embedding):
                new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, device, dtype)
            else:
                new = quant_linear(old.in_features, old.out_features, fmt, device, name, rows_kernel)
        except ValueError as e:
            raise ModelLoadError(f"{path}: cannot use {fmt.label()} for {name}: {e}") from None
        setattr(parent, attr, new)
        modules[name] = new
    return modules
