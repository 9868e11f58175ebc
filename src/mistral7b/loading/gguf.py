"""GGUF files (llama architecture).

Quantized tensors (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0) that the load plan keeps arrive repacked,
exactly, into our int4/int8 formats (`quant/gguf_blocks.py`) and run quantized; the others are
dequantized with the `gguf` package. F32/F16/BF16 arrive as tensors. A slice of rows is a byte range;
a slice of columns is a byte range of every row when it falls on block boundaries (else whole rows
are decoded and cut), so a tensor-parallel rank decodes only its blocks.
llama.cpp's converter permutes q/k rows into interleaved pairs; they are converted back to
rotate-half, which for a quantized tensor permutes the rows of its integers, scales and zeros alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, ModelLoadError, build_config
from ..utils import read_gguf as read  # noqa: F401 - the format's reader, shared with the tokenizer
from ..weights import Slice
from . import Checkpoint, cut

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


def tensor_to_torch(t, keep_quantized: bool = False, part: Slice | None = None):
    """A tensor of the reader (or the slice `part` of it) as a torch tensor, or as a QuantizedWeight
    when it is quantized and `keep_quantized` (2-D only: a quantized vector is dequantized)."""
    import gguf

    from ..quant.gguf_blocks import FORMATS, repack

    shape = [int(d) for d in reversed(t.shape)]
    data = t.data.reshape(shape[0], -1) if len(shape) == 2 else t.data
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type] if data.dtype == np.uint8 else (1, 1)
    if part is not None and part.dim == 0:
        data, shape[0], part = data[part.start : part.stop], part.stop - part.start, None
    elif part is not None and part.start % block == 0 and part.stop % block == 0:
        data = data[:, part.start // block * type_size : part.stop // block * type_size]
        shape[1], part = part.stop - part.start, None
    if keep_quantized and t.tensor_type.name in FORMATS and len(shape) == 2:
        return cut(repack(data, t.tensor_type.name, *shape), part)
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        array = np.array(data, dtype=np.float32)  # a copy: the memory map is read-only
    elif t.tensor_type == gguf.GGMLQuantizationType.F16:
        array = np.array(data, dtype=np.float16)
    else:
        array = gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type)
    return cut(torch.from_numpy(np.ascontiguousarray(array).reshape(shape)), part)


def quantized_formats(reader) -> dict:
    """canonical name -> WeightFormat of the 2-D tensors stored quantized."""
    from ..quant.gguf_blocks import FORMATS

    return {to_canonical(t.name): FORMATS[t.tensor_type.name] for t in reader.tensors
            if t.tensor_type.name in FORMATS and len(t.shape) == 2}


def open_checkpoint(path: Path) -> Checkpoint:
    reader = read(path)
    config = read_config(path, reader)
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name} "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )

    def tensors(slice_of, keep):
        for t in reader.tensors:
            name = to_canonical(t.name)
            try:
                w = tensor_to_torch(t, name in keep, slice_of(name))
            except Exception as e:  # noqa: BLE001 - dequantizing garbage fails in numpy in many ways
                raise ModelLoadError(f"{path}: tensor {t.name!r} is corrupt ({type(e).__name__}: {e})") from None
            yield name, w
            reader.release_pages(t.data_offset, t.n_bytes)  # copied out by now: RSS holds one tensor's pages

    return Checkpoint(path, config, n_tensors=len(reader.tensors), formats=quantized_formats(reader),
                      reader=tensors, interleaved=True)
