"""Weight-only quantization: int8 per channel and int4 groups, GGUF blocks run as they are.

`load_model(..., quantize="int8" | "int4" | QuantConfig)` quantizes while streaming;
`describe_weights(model)` says what formats a loaded model holds.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .config import DEFAULT_GROUP_SIZE, GROUP_SIZES, METHODS, QuantConfig, add_quantize_arguments, quant_config_from_args, resolve
from .linear import Int4Linear, Int8Linear, QuantEmbedding, QuantModule
from .qtensor import QuantizedWeight, WeightFormat

__all__ = [
    "DEFAULT_GROUP_SIZE", "GROUP_SIZES", "METHODS", "QuantConfig", "QuantizedWeight", "WeightFormat",
    "Int4Linear", "Int8Linear", "QuantEmbedding", "QuantModule", "add_quantize_arguments",
    "quant_config_from_args", "resolve", "describe_weights", "weight_format",
]


def describe_weights(model: nn.Module) -> dict[str, dict[str, int]]:
    """format label -> {"params": values held, "bytes": resident bytes (scales and zeros included)},
    e.g. {"int4 g32 (from Q4_1)": ..., "int8 g32 (from Q8_0)": ..., "float32": ...}. A tied weight counts once."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "bytes": 0})
    quantized = set()
    for module in model.modules():
        if isinstance(module, QuantModule):
            buffers = list(module.buffers(recurse=False))
            if any(b.data_ptr() in quantized for b in buffers):
                continue  # a tied head shares the embedding's buffers
            entry = out[module.fmt.label()]
            entry["params"] += module.out_features * module.in_features
            entry["bytes"] += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            quantized.update(b.data_ptr() for b in buffers)
    for p in model.parameters():
        entry = out[str(p.dtype).removeprefix("torch.")]
        entry["params"] += p.numel()
        entry["bytes"] += p.numel() * p.element_size()
    return dict(out)


def weight_format(model: nn.Module) -> str:
    """One line for `info`: the formats and their shares of the weights."""
    described = describe_weights(model)
    total = sum(d["params"] for d in described.values()) or 1
    parts = sorted(described.items(), key=lambda kv: -kv[1]["params"])
    return ", ".join(f"{label} {100 * d['params'] / total:.0f}%" for label, d in parts)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the model (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
