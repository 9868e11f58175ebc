"""HF transformers folders: `config.json` plus `model.safetensors`, sharded safetensors, or `pytorch_model.bin`.

HF stores q/k rows in rotate-half order, which is already our internal layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import ModelLoadError, from_hf_config
from . import Checkpoint
from .safetensors_io import stream_pickle_free, stream_safetensors

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}


def to_canonical(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return name  # unknown: assemble reports it as unexpected


def from_canonical(name: str) -> str:
    for hf, ours in _TOP_NAMES.items():
        if name == ours:
            return hf
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    for hf, ours in _LAYER_NAMES.items():
        if m and m.group(2) == ours:
            return f"model.layers.{m.group(1)}.{hf}"
    raise KeyError(name)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: shard listed in {index.name} is missing")
        return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise ModelLoadError(f"{path}: no weights found (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def open_checkpoint(path: Path) -> Checkpoint:
    config = from_hf_config(path / "config.json")
    files = weight_files(path)
    if files[0].suffix == ".bin":
        stream, count = stream_pickle_free(files[0])
    else:
        stream, count = stream_safetensors(files)
    tensors = ((to_canonical(name), t) for name, t in stream)
    return Checkpoint(path, config, tensors, count)
