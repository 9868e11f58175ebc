"""Quantized checkpoints of ours (`convert --quantize`): written by `save_quantized`, read back with
no source and no quantizing.

A folder with `config.json` (an HF-style config plus `quantization_config`) and `model.safetensors`.
The layout does not depend on the device that wrote it (no kernel tiles). Names are our module paths:

- a quantized module M (e.g. `layers.0.attention.wqkv`, `output`, `tok_embeddings`) has
  - `M.qweight`: int4: uint8 [N, K/2], two values per byte, column 2j in the low nibble and 2j+1 in
    the high one, values 0..15 with `w = (q - 8) * scale + zero`; int8: int8 [N, K], `w = q * scale (+ zero)`
  - `M.scales`: float32 [N, K / group_size]
  - `M.zeros`: float32 [N, K / group_size], for int4 always and for int8 with zeros
- every other weight under its parameter name in the model's dtype (`layers.0.attention_norm.weight`,
  a 16-bit `output.weight`, `layers.0.attention.wqkv.weight` for a fused 16-bit linear, ...)
- the safetensors metadata: `format` = "mistral7b-quantized", `format_version` = "1", and `modules`,
  a JSON object {module path: {"kind", "group_size" (null: per channel), "has_zero", "source"}}.

`quantization_config` in config.json: {"quant_method": "mistral7b", "format_version": 1, "method":
"int8" | "int4" | "gguf", "group_size", "quantize_head"}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelLoadError
from ..quant.config import FORMAT_VERSION
from ..quant.qtensor import QuantizedWeight, WeightFormat, pack_pairs, unpack_pairs
from . import Checkpoint, cut, hf
from .safetensors_io import read_tensor as _get

QUANT_METHOD = "mistral7b"
FORMAT = "mistral7b-quantized"


def is_quantized_folder(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _parts(config) -> dict[str, list[tuple[str, int, int]]]:
    """module path -> the canonical tensors it holds, as (name, lo, hi) row ranges (a tied head too)."""
    from ..weights import head_slot, weight_map

    parts: dict[str, list] = {}
    for slot in [*weight_map(config).values(), head_slot(config)][: None if config.tie_embeddings else -1]:
        if slot.quantizable:
            parts.setdefault(slot.module, []).append((slot.name, slot.lo, slot.hi))
    return parts


# ------------------------------------------------------------------------------------------ writing


def save_quantized(model, path: str | Path, tokenizer=None) -> Path:
    """Write a (quantized) model in the layout above; `tokenizer` (optional) is saved beside it."""
    from ..quant.linear import QuantModule
    from .convert import save_tokenizer
    from .hf import hf_config
    from .safetensors_io import write_safetensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype = next(model.parameters()).dtype
    quant = getattr(model, "quant_config", None)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}
    if config.tie_embeddings and "tok_embeddings" in modules:
        modules.pop("output", None)  # the tied head is rebuilt from the embedding
    permuted = [name for name, m in modules.items() if m.fmt.act_order]
    if permuted:
        raise ValueError(f"{permuted[0]} is act-order (inputs permuted), which this layout does not store; "
                         "convert with --quantize int4 or int8")
    tensors, cache = [], {}

    def unpacked(name):
        if name not in cache:
            cache.clear()
            cache[name] = modules[name].unpack()
        return cache[name]

    for name, m in modules.items():
        n, k, g = m.out_features, m.in_features, m.in_features // m.group_size
        int4 = m.fmt.kind == "int4"
        q_spec = ((n, k // 2), torch.uint8) if int4 else ((n, k), torch.int8)
        tensors.append((f"{name}.qweight", *q_spec, lambda name=name: _qweight(unpacked(name))))
        tensors.append((f"{name}.scales", (n, g), torch.float32, lambda name=name: unpacked(name).scale))
        if int4 or m.fmt.has_zero:
            tensors.append((f"{name}.zeros", (n, g), torch.float32, lambda name=name: _zeros(unpacked(name))))
    for name, p in model.named_parameters():
        tensors.append((name, tuple(p.shape), dtype, lambda p=p: p))
    described = {name: {"kind": m.fmt.kind, "group_size": m.fmt.group_size, "has_zero": m.fmt.has_zero,
                        "source": m.fmt.source} for name, m in modules.items()}
    qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
          "method": quant.method if quant is not None else "gguf",
          "group_size": quant.group_size if quant is not None else None,
          "quantize_head": quant.quantize_head if quant is not None else "output" in modules or config.tie_embeddings}
    (path / "config.json").write_text(json.dumps(hf_config(config, dtype, quantization_config=qc), indent=2) + "\n")
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "modules": json.dumps(described)}
    write_safetensors(path / "model.safetensors", tensors, metadata)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)
    return path


def _qweight(w: QuantizedWeight) -> torch.Tensor:
    return pack_pairs(w.q) if w.kind == "int4" else w.q


def _zeros(w: QuantizedWeight) -> torch.Tensor:
    return w.zero if w.zero is not None else torch.zeros_like(w.scale)


# ------------------------------------------------------------------------------------------ reading


def _formats(path: Path, metadata: dict) -> dict[str, WeightFormat]:
    if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
        raise ModelLoadError(f"{path}: not a mistral7b quantized checkpoint of format version {FORMAT_VERSION} "
                             f"(metadata says {metadata.get('format')!r} version {metadata.get('format_version')!r})")
    try:
        described = json.loads(metadata["modules"])
        return {name: WeightFormat(d["kind"], d["group_size"], bool(d["has_zero"]), d.get("source"))
                for name, d in described.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: the quantization metadata is malformed ({type(e).__name__}: {e})") from None


def open_checkpoint(path: Path) -> Checkpoint:
    config = hf.read_config(path / "config.json")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    if qc.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path / 'config.json'}: quantized format version {qc.get('format_version')!r} "
                             f"is not supported (this version reads {FORMAT_VERSION})")
    file = path / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata, keys = handle.metadata() or {}, set(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: not a valid safetensors file ({e})") from None
    modules = _formats(file, metadata)
    parts = _parts(config)
    unknown = [m for m in modules if m not in parts]
    if unknown:
        raise ModelLoadError(f"{file}: unexpected quantized module {unknown[0]!r} for this config")
    formats = {name: fmt for m, fmt in modules.items() for name, _, _ in parts[m]}
    if config.tie_embeddings and "tok_embeddings" in modules:
        formats.pop("output.weight", None)
    quant_keys = {f"{m}.{s}" for m in modules for s in ("qweight", "scales", "zeros")}

    def tensors(slice_of, keep):
        for m, fmt in modules.items():
            weight = _read_module(file, m, fmt, config, keys)
            for name, lo, hi in parts[m]:
                rows = weight.map_rows(lambda t, lo=lo, hi=hi: t[lo:hi])
                yield name, cut(rows if name in keep else rows.dequantize(), slice_of(name))
        for key in sorted(keys - quant_keys):
            tensor = _get(file, key)
            module = key.removesuffix(".weight")
            if module in parts and module not in ("tok_embeddings", "output") and key.endswith(".weight"):
                for name, lo, hi in parts[module]:  # a fused 16-bit linear: split it back
                    yield name, cut(tensor[lo:hi], slice_of(name))
            else:
                yield key, cut(tensor, slice_of(key))

    count = sum(len(p) for m, p in parts.items() if m in modules) + len(keys - quant_keys)
    return Checkpoint(path, config, n_tensors=count, formats=formats, reader=tensors)


def _read_module(file: Path, name: str, fmt: WeightFormat, config, keys: set[str]) -> QuantizedWeight:
    """One module's tensors, every shape and dtype checked against the config and its format."""
    from ..weights import module_shapes

    n, k = module_shapes(config)[name]
    group = fmt.group_size or k
    if k % group:
        raise ModelLoadError(f"{file}: module {name!r} has group size {group}, which does not divide its width {k}")
    int4 = fmt.kind == "int4"
    want = {"qweight": ((n, k // 2) if int4 else (n, k), torch.uint8 if int4 else torch.int8),
            "scales": ((n, k // group), torch.float32)}
    if int4 or fmt.has_zero:
        want["zeros"] = ((n, k // group), torch.float32)
    got = {}
    for part, (shape, dtype) in want.items():
        key = f"{name}.{part}"
        if key not in keys:
            raise ModelLoadError(f"{file}: missing tensor {key!r}")
        t = _get(file, key)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ModelLoadError(f"{file}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        got[part] = t
    q = got["qweight"]
    if int4:
        q = unpack_pairs(q)
    return QuantizedWeight(fmt.kind, q, got["scales"], got.get("zeros"), group, fmt.source)
