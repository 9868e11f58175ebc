"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read without unpickling.

PEFT names its tensors after the HF model (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
so the HF name map gives each one's canonical weight, and `lora.LoRABank` places it in the fused rows.
The scale is lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`). What we cannot run exactly is
refused in one line naming the field: DoRA, biases, per-module ranks or alphas, fan_in_fan_out, extra
trained modules, and targets that are not a linear of the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..lora import linear_names
from ..utils import expand_path
from .hf import to_canonical

_TENSOR = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class Adapter:
    """One adapter, ready for `LoRABank.write`: canonical weight name -> (A [r, in], B [out, r])."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scale: float


def read_config(path: Path) -> tuple[int, float]:
    """(r, scale) of `adapter_config.json`, or a ValueError naming the unsupported field."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise ValueError(f"{path}: no adapter_config.json (not a PEFT adapter folder)")
    c = json.loads(file.read_text())
    where = f"{file}:"
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where} peft_type {c['peft_type']!r} is not supported (only LORA)")
    if c.get("use_dora"):
        raise ValueError(f"{where} use_dora=true (DoRA) is not supported")
    if c.get("bias", "none") != "none":
        raise ValueError(f"{where} bias {c['bias']!r} is not supported (only 'none')")
    if c.get("fan_in_fan_out"):
        raise ValueError(f"{where} fan_in_fan_out=true is not supported")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if c.get(field):
            raise ValueError(f"{where} {field} is not supported")
    r, alpha = c.get("r"), c.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where} r and lora_alpha must be numbers (r a positive integer), got {r!r}, {alpha!r}")
    return r, alpha / (math.sqrt(r) if c.get("use_rslora") else r)


def read_adapter(path: str | Path, config: ModelConfig) -> Adapter:
    """The adapter in folder `path` for a model of `config`, checked name by name and shape by shape."""
    path = expand_path(path)
    rank, scale = read_config(path)
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise ValueError(f"{path}: no adapter_model.safetensors (a .bin adapter is not read: it would be unpickled)")
    targets, slots = linear_names(config), _slots(config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            if key.endswith(".base_layer.weight"):  # PEFT saves a targeted head's frozen base weight too
                continue
            m = _TENSOR.match(key)
            name = to_canonical(m.group(1) + ".weight") if m else None
            if name not in targets:
                raise ValueError(f"{file}: tensor {key!r} is not a LoRA weight of a linear of this model")
            halves.setdefault(name, {})[m.group(2)] = f.get_tensor(key).float()
    weights = {}
    for name, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{file}: {name} has lora_{'A' if 'A' not in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        rows, cols = slots[name]
        if a.shape != (rank, cols) or b.shape != (rows, rank):
            raise ValueError(f"{file}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                             f"expected ({rank}, {cols}) and ({rows}, {rank}) (r={rank})")
        weights[name] = (a, b)
    if not weights:
        raise ValueError(f"{file}: no LoRA tensors")
    return Adapter(weights, rank, scale)


def _slots(config: ModelConfig) -> dict[str, tuple[int, int]]:
    from ..weights import head_slot, weight_map

    slots = {**weight_map(config), "output.weight": head_slot(config)}
    return {name: (s.hi - s.lo, s.cols) for name, s in slots.items()}
