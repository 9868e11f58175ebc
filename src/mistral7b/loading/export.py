"""Checkpoint writers: a loaded `Transformer` back out as an HF folder or a Mistral folder.

* `save_hf`: `config.json` (model_type mistral, or llama when no layer has a window) and
  `model.safetensors` under HF names. Our q/k rows are already in HF's rotate-half order.
* `save_mistral`: `params.json` (rope_theta and sliding_window always written) and
  `consolidated.safetensors` under Mistral's names, q/k rows permuted back to interleaved pairs.

The fused projections are split back (wqkv -> q, k, v; w13 -> gate w1, up w3). Tensors are written
in the model's dtype, one at a time straight into the file (the header is computed up front from
the shapes), so no second copy of the model is ever held.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig
from . import canonical_views, half_to_interleaved
from .hf import from_canonical as hf_name

# safetensors' dtype names
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
}
_HF_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def canonical_tensors(model) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(canonical name, thunk giving the tensor in rotate-half order) for every weight, unfused."""
    for name, view in canonical_views(model).items():
        yield name, (lambda t=view: t)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: dict[str, str] | None = None, desc: str | None = None) -> None:
    """Write a safetensors file tensor by tensor: (name, shape, dtype, thunk) are known up front, so the
    header goes first and each tensor is produced, written and dropped in turn. Written to a temporary
    name and renamed, so a failure never leaves a half-written file under the real name."""
    header: dict = {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        if dtype not in _ST_DTYPES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    bar = tqdm(total=len(tensors), desc=desc or f"writing {path.name}", unit="tensor", file=sys.stderr,
               disable=None, leave=False)
    try:
        with open(partial, "wb") as f, bar:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype, thunk in tensors:
                t = thunk().detach().to("cpu", dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
                bar.update(1)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


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
        "torch_dtype": _HF_DTYPES.get(dtype, "float32"),
    }
    if mistral:
        d["sliding_window"] = window
        if layer_types:
            d["layer_types"] = layer_types
    else:
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1, rope_scaling=None)
    d.update(extra)
    return d


def mistral_params(config: ModelConfig) -> dict:
    window = config.sliding_window
    return {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.hidden_dim,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "norm_eps": config.norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": float(config.rope_theta),
        "sliding_window": list(window) if isinstance(window, tuple) else window,
        "max_seq_len": config.max_seq_len,
        "tied_embeddings": bool(config.tie_embeddings),
    }


def _prepare(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_hf(model, path: str | Path, **config_extra) -> Path:
    """Write `model` as an HF transformers folder: config.json + model.safetensors."""
    path = _prepare(path)
    config, dtype = model.config, _dtype(model)
    tensors = []
    for name, thunk in canonical_tensors(model):
        if name == "output.weight" and config.tie_embeddings:
            continue  # HF ties lm_head to embed_tokens itself
        tensors.append((hf_name(name), tuple(thunk().shape), dtype, thunk))
    (path / "config.json").write_text(json.dumps(hf_config(config, dtype, **config_extra), indent=2) + "\n")
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    return path


def save_mistral(model, path: str | Path) -> Path:
    """Write `model` in Mistral's layout: params.json + consolidated.safetensors (q/k interleaved)."""
    path = _prepare(path)
    config, dtype = model.config, _dtype(model)
    heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}
    tensors = []
    for name, thunk in canonical_tensors(model):
        if name == "output.weight" and config.tie_embeddings:
            continue
        shape = tuple(thunk().shape)  # a view: no copy
        n = heads.get(name.partition(".")[2].partition(".")[2]) if name.startswith("layers.") else None
        if n is not None:
            thunk = (lambda t=thunk, n=n: half_to_interleaved(t(), n))
        tensors.append((name, shape, dtype, thunk))
    (path / "params.json").write_text(json.dumps(mistral_params(config), indent=2) + "\n")
    write_safetensors(path / "consolidated.safetensors", tensors, {"format": "pt"})
    return path


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of a checkpoint folder (tokenizer.model*, tokenizer.json, ...) to `dst`."""
    import shutil

    copied = []
    if not src.is_dir():
        return copied
    names = [p.name for p in sorted(src.glob("tokenizer.model*")) if p.is_file()]
    names += [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for name in names:
        shutil.copyfile(src / name, dst / name)
        copied.append(name)
    return copied


def save_tokenizer(tokenizer, dst: Path) -> list[str]:
    """Write a `tokenizers`-backed Tokenizer (e.g. one rebuilt from a GGUF vocabulary) as tokenizer.json
    + tokenizer_config.json (+ generation_config.json for extra stop ids). Returns the files written,
    or [] where the tokenizer has no `tokenizers` backend to save."""
    backend = getattr(tokenizer, "_hf", None)
    if backend is None or not hasattr(backend, "save"):
        return []
    backend.save(str(dst / "tokenizer.json"))
    config = {
        "bos_token": tokenizer.bos_token or None,
        "eos_token": tokenizer.eos_token or None,
        "add_bos_token": bool(tokenizer.add_bos),
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    written = ["tokenizer.json", "tokenizer_config.json"]
    stops = sorted(getattr(tokenizer, "stop_token_ids", ()) or ())
    if stops:
        gen = {"eos_token_id": stops if len(stops) > 1 else stops[0]}
        if tokenizer.bos_id is not None:
            gen["bos_token_id"] = tokenizer.bos_id
        (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        written.append("generation_config.json")
    return written
