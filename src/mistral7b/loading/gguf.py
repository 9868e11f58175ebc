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

from ..config import ModelLoadError, from_gguf_metadata
from . import Checkpoint, interleaved_to_half

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


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


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
    import gguf

    try:
        return gguf.GGUFReader(path)
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
    names = {t.name for t in reader.tensors}
    config = from_gguf_metadata(path, metadata(reader), has_output="output.weight" in names)
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name} "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
    heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}

    def tensors():
        for t in reader.tensors:
            name = to_canonical(t.name)
            try:
                w = tensor_to_torch(t, keep_quantized)
            except Exception as e:  # noqa: BLE001 - dequantizing garbage fails in numpy in many ways
                raise ModelLoadError(f"{path}: tensor {t.name!r} is corrupt ({type(e).__name__}: {e})") from None
            n = heads.get(name.partition(".")[2].partition(".")[2])
            if n is not None and w.shape[0] == n * config.head_dim:
                w = w.map_rows(lambda rows: interleaved_to_half(rows, n)) if hasattr(w, "map_rows") \
                    else interleaved_to_half(w, n)
            yield name, w

    formats = quantized_formats(reader) if keep_quantized else {}
    return Checkpoint(path, config, tensors(), len(reader.tensors), formats)
