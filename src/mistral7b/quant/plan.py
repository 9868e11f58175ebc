"""Which module of the model gets which weight format, and swapping nn.Linear/nn.Embedding for the
quantized modules before anything is allocated.

The plan is decided before a single tensor is read: from `--quantize` for a 16-bit source, or from
the GGUF tensor types for a quantized file. A fused matrix (wqkv, w13) takes one format that holds
all its parts exactly (`merge_formats`); a part in 16 bits makes the whole module 16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig, ModelLoadError
from .config import QuantConfig
from .linear import QuantEmbedding, QuantModule, quant_linear
from .qtensor import WeightFormat, merge_formats

_FUSED = {
    "attention.wq": ("attention.wqkv", 0),
    "attention.wk": ("attention.wqkv", 1),
    "attention.wv": ("attention.wqkv", 2),
    "attention.wo": ("attention.wo", 0),
    "feed_forward.w1": ("feed_forward.w13", 0),
    "feed_forward.w3": ("feed_forward.w13", 1),
    "feed_forward.w2": ("feed_forward.w2", 0),
}


@dataclass(frozen=True)
class Slot:
    """Where a canonical tensor goes: rows lo:hi of the weight of module `module`."""

    module: str
    lo: int
    hi: int


def linear_slots(config: ModelConfig) -> dict[str, Slot]:
    """canonical name -> its rows in a fused or plain linear (block linears and the output head)."""
    c = config
    q, kv, hidden = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim
    bounds = {"attention.wqkv": [0, q, q + kv, q + 2 * kv], "feed_forward.w13": [0, hidden, 2 * hidden],
              "attention.wo": [0, c.dim], "feed_forward.w2": [0, c.dim]}
    slots = {"output.weight": Slot("output", 0, c.vocab_size)}
    for i in range(c.n_layers):
        for part, (module, index) in _FUSED.items():
            b = bounds[module]
            slots[f"layers.{i}.{part}.weight"] = Slot(f"layers.{i}.{module}", b[index], b[index + 1])
    return slots


def in_features(config: ModelConfig, module: str) -> int:
    """The input width of a quantizable module ("output", "tok_embeddings" or a block linear)."""
    kind = module.partition(".")[2].partition(".")[2]
    return {"attention.wo": config.n_heads * config.head_dim, "feed_forward.w2": config.hidden_dim}.get(kind, config.dim)


def requested_format(config: ModelConfig, quant: QuantConfig, module: str) -> WeightFormat:
    """The format `quant` gives one module: int8 per channel, or int4 in the largest supported groups
    up to the requested size that divide its width (the requested size itself when none does, for
    `install` to report)."""
    if quant.method == "int8":
        return WeightFormat("int8")
    group = quant.group_size_for(in_features(config, module)) or quant.group_size
    return WeightFormat("int4", group, True)


def plan(config: ModelConfig, quant: QuantConfig | None, source_formats: dict[str, WeightFormat]) -> dict[str, WeightFormat]:
    """module path -> format, for the modules that are quantized ("tok_embeddings", "output", linears)."""
    slots = linear_slots(config)
    if quant is not None:
        modules = {s.module for s in slots.values()}
        return {m: requested_format(config, quant, m) for m in sorted(modules) if m != "output" or quant.quantize_head}
    parts: dict[str, list[WeightFormat | None]] = {}
    for name, slot in slots.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        parts.setdefault(slot.module, []).append(source_formats.get(name))
    out = {m: merge_formats(fs) for m, fs in parts.items() if all(f is not None for f in fs)}
    embedding = source_formats.get("tok_embeddings.weight")
    if embedding is not None:
        out["tok_embeddings"] = embedding
    if config.tie_embeddings:  # the head is the quantized embedding, or a quantized copy stored apart
        head = embedding or source_formats.get("output.weight")
        if head is not None:
            out["output"] = head
    return out


def install(model: nn.Module, formats: dict[str, WeightFormat], device: torch.device, dtype: torch.dtype,
            path) -> dict[str, QuantModule]:
    """Replace the planned modules of a meta-device model by empty quantized ones."""
    modules = {}
    for name, fmt in formats.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        try:
            if isinstance(old, nn.Embedding):
                new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, device, dtype)
            else:
                new = quant_linear(old.in_features, old.out_features, fmt, device, name)
        except ValueError as e:
            raise ModelLoadError(f"{path}: cannot use {fmt.label()} for {name}: {e}") from None
        setattr(parent, attr, new)
        modules[name] = new
    return modules
