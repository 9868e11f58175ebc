"""GGUF files (llama architecture).

Quantized tensors (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0) arrive repacked, exactly, into our int4/int8
formats (`quant/gguf_blocks.py`) and run quantized; with `keep_quantized=False` (an explicit
quantize= at load) they are dequantized with the `gguf` package instead. F32/F16/BF16 arrive as tensors.
llama.cpp's converter permutes q/k rows into interleaved pairs; they are converted back to
rotate-half, which for a quantized tensor permutes the rows of its integers, scales and zeros alike.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, ModelLoadError, build_config
from . import Checkpoint, qk_to_rotate_half

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def to_canonical(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return name


def read(path: Path):
    """Open a GGUF file with the gguf package, turning its many failure modes into one error.

    Parsing the header of a large vocabulary takes seconds, so the model loader and the tokenizer
    share one reader per unchanged file."""
    stat = Path(path).stat()
    return _read(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int, size: int):
    from .gguf_reader import FastGGUFReader

    try:
        return FastGGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad files
        raise ModelLoadError(f"{path}: not a valid GGUF file or truncated ({type(e).__name__}: {e})") from None


_BULKY = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def metadata(reader) -> dict[str, Any]:
    """Scalar and string fields; the vocabulary arrays are left out (slow to decode) except their length."""
    meta = {}
    for key, field in reader.fields.items():
        if key in _BULKY:
            meta[key + ".count"] = len(field.data)
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field we cannot decode is one we do not need
            continue
    return meta


def from_gguf_metadata(path: Path, meta: dict[str, Any], has_output: bool) -> ModelConfig:
    """GGUF key/values (already decoded) of the llama architecture; `has_output` says if `output.weight` exists."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (only 'llama' is supported)")
    try:
        dim = int(meta["llama.embedding_length"])
        n_heads = int(meta["llama.attention.head_count"])
        vocab = meta.get("llama.vocab_size") or meta["tokenizer.ggml.tokens.count"]
        window = meta.get("llama.attention.sliding_window")
        return build_config(
            path,
            dim=dim,
            n_layers=int(meta["llama.block_count"]),
            head_dim=int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or dim // n_heads),
            hidden_dim=int(meta["llama.feed_forward_length"]),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            vocab_size=int(vocab),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            sliding_window=int(window) if window else None,
            max_seq_len=int(meta.get("llama.context_length", 4096)),
            tie_embeddings=not has_output,
            name=str(meta.get("general.name", path.stem)),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: missing GGUF metadata {e.args[0]!r}") from None


def read_config(path: Path, reader) -> ModelConfig:
    """The config of a GGUF file already open."""
    names = {t.name for t in reader.tensors}
    return from_gguf_metadata(path, metadata(reader), has_output="output.weight" in names)


def tensor_to_torch(t, keep_quantized: bool = False):
    """A tensor of the reader as a torch tensor, or as a QuantizedWeight when it is quantized and
    `keep_quantized` (2-D only: a quantized vector is dequantized)."""
    import gguf

    from ..quant.gguf_blocks import FORMATS, repack

    shape = tuple(int(d) for d in reversed(t.shape))
    if keep_quantized and t.tensor_type.name in FORMATS and len(shape) == 2:
        return repack(t.data, t.tensor_type.name, *shape)
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        array = np.array(t.data, dtype=np.float32)  # a copy: the memory map is read-only
    elif t.tensor_type == gguf.GGMLQuantizationType.F16:
        array = np.array(t.data, dtype=np.float16)
    else:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(array).reshape(shape))


def quantized_formats(reader) -> dict:
    """canonical name -> WeightFormat of the 2-D tensors that stay quantized."""
    from ..quant.gguf_blocks import FORMATS

    return {to_canonical(t.name): FORMATS[t.tensor_type.name] for t in reader.tensors
            if t.tensor_type.name in FORMATS and len(t.shape) == 2}


def open_checkpoint(path: Path, keep_quantized: bool = True) -> Checkpoint:
    reader = read(path)
    config = read_config(path, reader)
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name} "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )

    def tensors():
        for t in reader.tensors:
            name = to_canonical(t.name)
            try:
                w = tensor_to_torch(t, keep_quantized)
            except Exception as e:  # noqa: BLE001 - dequantizing garbage fails in numpy in many ways
                raise ModelLoadError(f"{path}: tensor {t.name!r} is corrupt ({type(e).__name__}: {e})") from None
            yield name, qk_to_rotate_half(name, w, config)

    formats = quantized_formats(reader) if keep_quantized else {}
    return Checkpoint(path, config, tensors(), len(reader.tensors), formats)
