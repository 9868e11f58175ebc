"""HF transformers folders: `config.json` plus `model.safetensors`, sharded safetensors, or `pytorch_model.bin`.

The reader (`read_config`, `open_checkpoint`), the writer (`save`: config.json with model_type mistral,
or llama when no layer has a window, and model.safetensors) and the name map. HF stores q/k rows in
rotate-half order, which is already our internal layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import ModelConfig, ModelLoadError, build_config, read_json
from ..utils import BY_DTYPE
from . import Checkpoint
from .safetensors_io import pickle_reader, safetensors_reader, write_weights

HF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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


def read_config(path: Path) -> ModelConfig:
    """HF `config.json` for the mistral and llama model types."""
    c = read_json(path)
    model_type = c.get("model_type")
    if model_type not in ("mistral", "llama"):
        raise ModelLoadError(f"{path}: unsupported model_type {model_type!r} (expected 'mistral' or 'llama')")
    try:
        window = c.get("sliding_window") if model_type == "mistral" else None
        layer_types = c.get("layer_types")
        if window is not None and layer_types:
            window = tuple(window if t == "sliding_attention" else None for t in layer_types)
        # transformers 5 writes the scaling into `rope_parameters` (rope_type != "default"), older ones into `rope_scaling`.
        for key, absent in (("rope_scaling", None), ("rope_parameters", "default")):
            scaling = c.get(key) or {}
            if scaling and scaling.get("rope_type", scaling.get("type", absent)) != "default":
                raise ModelLoadError(f"{path}: {key} {scaling!r} is not supported")
        rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return build_config(
            path,
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            vocab_size=c["vocab_size"],
            rope_theta=float(rope_theta),
            sliding_window=window,
            max_seq_len=c.get("max_position_embeddings", 32768),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            name=path.parent.name,
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: missing field {e.args[0]!r}") from None


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
    """The folder's tensors; a `quantization_config` (AWQ, GPTQ, compressed-tensors) is read by
    `prequantized`, which keeps the stored integers."""
    config = read_config(path / "config.json")
    files = weight_files(path)
    qc = read_json(path / "config.json").get("quantization_config")
    if qc is not None:
        from . import prequantized

        return prequantized.open_checkpoint(path, config, qc, files)
    if files[0].suffix == ".bin":
        reader, count = pickle_reader(files[0], to_canonical)
    else:
        reader, count = safetensors_reader(files, to_canonical)
    return Checkpoint(path, config, n_tensors=count, reader=reader)


def _single_window(config: ModelConfig) -> tuple[int | None, list[str] | None]:
    """HF's config has one sliding_window; per-layer windows become `layer_types` (all equal W or none)."""
    windows = config.layer_windows()
    distinct = {w for w in windows if w is not None}
    if not distinct:
        return None, None
    if len(distinct) > 1:
        raise ValueError(f"HF's config.json cannot express several window sizes ({sorted(distinct)}); "
                         "convert to the Mistral layout instead")
    window = distinct.pop()
    if all(w is not None for w in windows):
        return window, None
    return window, ["sliding_attention" if w is not None else "full_attention" for w in windows]


def hf_config(config: ModelConfig, dtype: torch.dtype, **extra) -> dict:
    window, layer_types = _single_window(config)
    mistral = window is not None
    d = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": float(config.rope_theta),
        "tie_word_embeddings": bool(config.tie_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": BY_DTYPE[dtype].name if dtype in HF_DTYPES else "float32",
    }
    if mistral:
        d["sliding_window"] = window
        if layer_types:
            d["layer_types"] = layer_types
    else:
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1, rope_scaling=None)
    d.update(extra)
    return d


def save(model, path: str | Path, **config_extra) -> Path:
    """Write `model` as an HF transformers folder: config.json + model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    (path / "config.json").write_text(json.dumps(hf_config(model.config, dtype, **config_extra), indent=2) + "\n")
    write_weights(model, path / "model.safetensors", rename=from_canonical)
    return path
