"""`mistral7b info`: config, parameters, bytes and KV cache of a model, from its config and tensor headers."""

from __future__ import annotations

import argparse

from .common import add_quantize_options, device_of, dtype_name, model_source, note, one_line, positive_int, print_json
from .common import quantize_of

NAME = "info"
HELP = "config, parameter count, bytes and KV cache of a model (reads no weights)"
DESCRIPTION = ("The model's config and parameter count, bytes by dtype, KV bytes per token, attention window, "
               "and the KV cache at --seq-len (rolling and linear). Reads only the config and tensor headers.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="sequence length for the cache figures (None: the model's context length)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_quantize_options(p)  # the formats and group sizes a load with these flags would use


def _stored(args, checkpoint):
    from ..loading.inspect import stored_tensors

    try:
        return stored_tensors(checkpoint)
    except Exception as e:  # noqa: BLE001 - the header summary is a nicety; the config is the point
        if args.debug:
            raise
        note(f"could not read the tensor headers ({one_line(e)}); figures below come from the config")
        return None


def weight_formats(checkpoint, quant, load_dtype: str) -> dict:
    """format label -> {"params"} of the weights as a load with `quant` would hold them, from the load
    plan (headers alone): a GGUF's Q4_1 -> "int4 g32 (from Q4_1)", the group sizes actually used."""
    from ..quant.plan import make_plan
    from ..weights import module_shapes

    plan = make_plan(checkpoint.config, quant, checkpoint.formats)
    shapes = module_shapes(checkpoint.config)
    tied = checkpoint.config.tie_embeddings
    out: dict[str, dict[str, int]] = {}
    dense = checkpoint.config.n_params
    for module, fmt in plan.formats.items():
        if module == "output" and tied and "tok_embeddings" in plan.formats:
            continue  # the tied head is the embedding's table
        rows, cols = shapes[module]
        out.setdefault(fmt.label(), {"params": 0})["params"] += rows * cols
        dense -= 0 if module == "output" and tied else rows * cols  # a quantized copy of a dense table
    return {**out, load_dtype: {"params": dense}} if dense else out


def format_line(formats: dict) -> str:
    """"int4 g32 (from Q4_1) 79%, ..." as quant.weight_format writes it for a loaded model."""
    total = sum(d["params"] for d in formats.values()) or 1
    parts = sorted(formats.items(), key=lambda kv: -kv[1]["params"])
    return ", ".join(f"{label} {100 * d['params'] / total:.0f}%" for label, d in parts)


def report(args) -> dict:
    """Everything `info` shows, as plain numbers."""
    from .. import memory
    from ..loading import open_checkpoint
    from ..loading.inspect import checkpoint_format
    from ..utils import default_device, resolve_dtype

    quant = quantize_of(args)  # a bad mix fails before anything is read
    checkpoint = open_checkpoint(model_source(args))  # a GGUF's header is parsed once, then shared
    config = checkpoint.config
    stored = _stored(args, checkpoint)
    dtype = resolve_dtype(dtype_name(args), device_of(args) or default_device())
    element = dtype.itemsize
    seq_len = args.seq_len or config.max_seq_len
    window = config.sliding_window
    load_dtype = str(dtype).removeprefix("torch.")
    formats = weight_formats(checkpoint, quant, load_dtype)
    return {
        "source": str(checkpoint.path),
        "format": checkpoint_format(checkpoint),
        "quantization": checkpoint.quantization,  # a hub quantization found (AWQ, GPTQ, compressed-tensors)
        "config": config.to_dict(),
        "n_params": config.n_params,
        "stored": stored,
        "weight_bytes": memory.weight_bytes(config),
        "weight_format": format_line(formats),
        "weight_formats": formats,
        "quantize": quant.label if quant is not None else None,
        "load_dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_token": memory.kv_bytes_per_token(config, element),
        "kv_bytes_per_token_by_dtype": {"float32": memory.kv_bytes_per_token(config, 4),
                                        "bfloat16": memory.kv_bytes_per_token(config, 2)},
        "attention_window": window if not isinstance(window, tuple) else list(config.layer_windows()),
        "receptive_field": memory.receptive_field(config),
        "seq_len": seq_len,
        "kv_cache_bytes": {
            "linear": memory.kv_cache_bytes(config, seq_len, 1, element),
            "rolling": memory.kv_cache_bytes(config, seq_len, 1, element, rolling=True),
        },
        "element_bytes": element,
    }


def describe(data: dict, config) -> list[str]:
    """The human-readable lines of `report`."""
    from ..memory import format_bytes as fb
    from ..memory import format_count as fc

    c, window, stored = config, config.sliding_window, data["stored"]
    window_text = ("none (full attention)" if window is None else
                   f"{window} tokens" if not isinstance(window, tuple) else
                   ", ".join("full" if w is None else str(w) for w in window))
    found = f", {data['quantization']}" if data.get("quantization") else ""
    lines = [
        f"model           {data['source']} ({data['format']}{found})",
        f"name            {c.name}",
        f"architecture    dim {c.dim}, {c.n_layers} layers, head_dim {c.head_dim}, hidden_dim {c.hidden_dim} (SwiGLU)",
        f"attention       {c.n_heads} query heads / {c.n_kv_heads} KV heads "
        f"({'GQA ' + str(c.n_heads // c.n_kv_heads) + ':1' if c.n_kv_heads < c.n_heads else 'MHA'}), "
        f"window {window_text}",
        f"vocab           {c.vocab_size}; rope_theta {c.rope_theta:g}; norm_eps {c.norm_eps:g}; "
        f"context {c.max_seq_len}; tied embeddings {'yes' if c.tie_embeddings else 'no'}",
        f"parameters      {c.n_params:,} ({fc(c.n_params)})",
        "weights         " + ", ".join(f"{k} {fb(v)}" for k, v in data["weight_bytes"].items() if k != "float16"),
    ]
    if stored is not None:
        kinds = ", ".join(f"{k} {v['tensors']} tensors / {fb(v['bytes'])}" for k, v in
                          sorted(stored["by_type"].items(), key=lambda kv: -kv[1]["bytes"]))
        lines.append(f"stored          {stored['params']:,} parameters in {fb(stored['bytes'])}: {kinds}")
    flag = f"--quantize {data['quantize']}" if data["quantize"] else "no --quantize"
    lines.append(f"weight format   {data['weight_format']} (as loaded with {flag})")
    lines += [
        f"KV per token    {fb(data['kv_bytes_per_token'])} in {data['load_dtype']} "
        f"(= 2 x {c.n_layers} layers x {c.n_kv_heads} KV heads x {c.head_dim} x {data['element_bytes']} bytes)",
        f"KV cache        at {data['seq_len']} tokens: linear {fb(data['kv_cache_bytes']['linear'])}, "
        f"rolling buffer {fb(data['kv_cache_bytes']['rolling'])}"
        + ("" if window is not None else " (no window: the cache grows with the sequence)"),
    ]
    if data["receptive_field"]:
        lines.append(f"receptive field {data['receptive_field']} tokens (n_layers x W)")
    return lines


def run(args) -> int:
    from ..config import ModelConfig

    data = report(args)
    element = data.pop("element_bytes")
    if args.json:
        print_json(data)
        return 0
    print("\n".join(describe({**data, "element_bytes": element}, ModelConfig.from_dict(data["config"]))))
    return 0
