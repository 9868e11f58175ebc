"""Checkpoint loading: find the format, read its config, stream its tensors into a model.

Every format module yields tensors under one canonical naming (Mistral's, unfused, q/k rows in
rotate-half order). `assemble` builds the model on the meta device, allocates it once on the target
device and copies each tensor into place as it arrives, so a checkpoint is never held twice. A
checkpoint that is missing tensors, has extra ones or disagrees on a shape raises `ModelLoadError`
and no model is returned.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig, ModelLoadError
from ..model import Transformer
from ..utils import is_gguf


@dataclass
class Checkpoint:
    """A checkpoint opened but not read: its config and a stream of (canonical name, tensor)."""

    path: Path
    config: ModelConfig
    tensors: "Iterator[tuple[str, torch.Tensor]] | None" = None
    n_tensors: int = 0
    # canonical name -> format, for tensors the stream yields already quantized (QuantizedWeight)
    formats: dict = field(default_factory=dict)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from interleaved pairs (Meta, Mistral, GGUF) to HF's rotate-half order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`, for writing Mistral and GGUF checkpoints."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def qk_heads(name: str, config: ModelConfig) -> int | None:
    """Heads of the q or k projection called `name` (canonical), or None for any other tensor."""
    if not name.startswith("layers."):
        return None
    kind = name.partition(".")[2].partition(".")[2]
    return {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}.get(kind)


def qk_to_rotate_half(name: str, w, config: ModelConfig):
    """A tensor as read from an interleaved-pairs checkpoint (Mistral, GGUF), q/k rows converted to
    rotate-half; a quantized weight has its rows (and their scales) reordered the same way. A q/k of
    the wrong shape is left as it is, for `assemble` to report."""
    n = qk_heads(name, config)
    if n is not None and w.shape[0] == n * config.head_dim:
        if hasattr(w, "map_rows"):
            return w.map_rows(lambda rows: interleaved_to_half(rows, n))
        return interleaved_to_half(w, n)
    return w


def canonical_names(config: ModelConfig) -> list[str]:
    names = ["tok_embeddings.weight", "norm.weight"]
    if not config.tie_embeddings:
        names.append("output.weight")
    for i in range(config.n_layers):
        p = f"layers.{i}."
        names += [p + "attention_norm.weight", p + "ffn_norm.weight"]
        names += [p + f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        names += [p + f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    return names


def canonical_views(model: Transformer, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """canonical name -> the parameter, or the rows of a fused parameter, that holds that weight
    (leaving out the weights of the modules in `skip`, which are quantized)."""
    c = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    q, kv, hidden = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim
    fused = {
        "attention.wq": ("attention.wqkv", 0, q),
        "attention.wk": ("attention.wqkv", q, q + kv),
        "attention.wv": ("attention.wqkv", q + kv, q + 2 * kv),
        "feed_forward.w1": ("feed_forward.w13", 0, hidden),
        "feed_forward.w3": ("feed_forward.w13", hidden, 2 * hidden),
    }
    views = {}
    for name in canonical_names(c):
        if name.removesuffix(".weight") in skip or _fused_module(name) in skip:
            continue
        layer, _, rest = name.removeprefix("layers.").partition(".") if name.startswith("layers.") else ("", "", "")
        key = rest.removesuffix(".weight")
        if key in fused:
            param, lo, hi = fused[key]
            views[name] = params[f"layers.{layer}.{param}.weight"][lo:hi]
        else:
            views[name] = params[name]
    return views


def _fused_module(name: str) -> str:
    for part, fused in (("wq", "wqkv"), ("wk", "wqkv"), ("wv", "wqkv"), ("w1", "w13"), ("w3", "w13")):
        for kind in ("attention", "feed_forward"):
            suffix = f".{kind}.{part}.weight"
            if name.endswith(suffix):
                return name.removesuffix(suffix) + f".{kind}.{fused}"
    return ""


def assemble(checkpoint: Checkpoint, device=None, dtype=None, quant: "QuantConfig | None" = None) -> Transformer:
    """Build on meta, swap in the quantized modules the plan asks for, allocate once, then copy (or
    quantize) each tensor into place as it arrives: a 16-bit copy of the model never exists."""
    from ..quant import plan as quant_plan

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    config = checkpoint.config
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    formats = quant_plan.plan(config, quant, checkpoint.formats)
    modules = quant_plan.install(model, formats, device, dtype, checkpoint.path)
    _allocate(model, device)
    if config.tie_embeddings and "output" not in modules:
        model.output.weight = model.tok_embeddings.weight  # to_empty unties them
    model.quant_config = quant
    targets = _targets(model, modules, separate_head="output.weight" in checkpoint.formats)
    loaded: set[str] = set()
    bar = tqdm(
        total=checkpoint.n_tensors or None, desc=f"loading {checkpoint.path.name}", unit="tensor",
        file=sys.stderr, disable=None, leave=False,
    )
    with torch.no_grad(), bar:
        for name, tensor in checkpoint.tensors:
            bar.update(1)
            if name == "output.weight" and config.tie_embeddings and name not in targets:
                continue  # some tied checkpoints store the shared matrix twice
            if name not in targets:
                raise ModelLoadError(f"{checkpoint.path}: unexpected tensor {name!r} for this config")
            for target in targets[name]:
                _place(checkpoint.path, name, tensor, target, dtype, requantize=quant is not None)
            loaded.add(name)
    missing = [n for n in targets if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{checkpoint.path}: missing tensors {shown}")
    return model.eval()


def _allocate(model: Transformer, device: torch.device) -> None:
    """`model.to_empty(device)` without its `empty_like` of meta tensors, whose Python meta path
    imports sympy (about a second on a small CPU): plain `torch.empty` of each shape. Like
    `to_empty`, it unties tied parameters."""
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def _targets(model: Transformer, modules: dict, separate_head: bool) -> dict[str, list]:
    """canonical name -> where it goes: dense views of parameters, or (module, lo, hi) row ranges of a
    quantized module. A tied embedding also feeds a quantized head, unless the checkpoint stores that
    head on its own (`separate_head`: a quantized checkpoint of a tied model)."""
    from ..quant.plan import linear_slots

    tied, vocab = model.config.tie_embeddings, model.config.vocab_size
    targets = {name: [view] for name, view in canonical_views(model, set(modules)).items()}
    for name, slot in linear_slots(model.config).items():
        if slot.module in modules and not (name == "output.weight" and tied and not separate_head):
            targets[name] = [(modules[slot.module], slot.lo, slot.hi)]
    if "tok_embeddings" in modules:
        targets["tok_embeddings.weight"] = [(modules["tok_embeddings"], 0, vocab)]
    if tied and "output" in modules and not separate_head:
        targets["tok_embeddings.weight"].append((modules["output"], 0, vocab))
    return targets


def _place(path: Path, name: str, tensor, target, dtype: torch.dtype, requantize: bool) -> None:
    """Copy one tensor into a dense view, or quantize it into rows of a quantized module (a tensor
    that arrives quantized goes in as it is, unless an explicit quantize= asks to requantize it)."""
    from ..quant.qtensor import QuantizedWeight

    if isinstance(target, tuple):
        module, lo, hi = target
        shape = (hi - lo, module.in_features)
    else:
        shape = tuple(target.shape)
    if tuple(tensor.shape) != shape:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config implies {shape}"
        )
    if not isinstance(target, tuple):
        target.copy_(tensor.dequantize(dtype) if isinstance(tensor, QuantizedWeight) else tensor)
        return
    if isinstance(tensor, QuantizedWeight) and requantize:
        tensor = tensor.dequantize()
    if not isinstance(tensor, QuantizedWeight):
        tensor = module.fmt.quantize(tensor.to(module.target), name)
    module.fill(lo, hi, tensor)


def open_checkpoint(source: str | Path, keep_quantized: bool = True) -> Checkpoint:
    """Recognise the format of `source` (a folder, a file or a hub id) and open it. With
    `keep_quantized=False` a GGUF file's quantized tensors arrive dequantized."""
    from . import gguf, hf, hub, mistral, quantized

    path = Path(source).expanduser()
    if not path.exists():
        if hub.looks_like_hub_id(str(source)):
            path = hub.resolve(str(source))
        else:
            raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_file():
        if is_gguf(path):
            return gguf.open_checkpoint(path, keep_quantized)
        if path.name in ("config.json", "params.json"):
            path = path.parent
        else:
            raise ModelLoadError(f"{path}: unknown checkpoint format (expected .gguf, or a folder)")
    if (path / "params.json").is_file():
        return mistral.open_checkpoint(path)
    if (path / "config.json").is_file():
        if quantized.is_quantized_folder(path):
            return quantized.open_checkpoint(path)
        return hf.open_checkpoint(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return gguf.open_checkpoint(ggufs[0], keep_quantized)
    raise ModelLoadError(
        f"{path}: unknown checkpoint format (no config.json, params.json or single .gguf file in this folder)"
    )


def load_model(source: str | Path, device=None, dtype=None, quantize=None) -> Transformer:
    """Load a Transformer from an HF folder, a Mistral folder, a .gguf file or a cached hub id.

    `quantize` (None, "int8", "int4" or a QuantConfig) quantizes the block linears and the head while
    streaming. Without it, a GGUF file's quantized tensors stay quantized in the nearest kernel format
    (`dtype` then sets the activations only) and a quantized checkpoint (`convert --quantize`) loads as
    saved. With it, a GGUF file is dequantized and quantized again. `quantize=False` (or "none")
    dequantizes everything into `dtype`. Unknown methods raise ValueError.
    """
    from ..quant.config import resolve

    dense = quantize is False or quantize == "none"
    quant = None if dense else resolve(quantize)
    checkpoint = open_checkpoint(source, keep_quantized=quant is None and not dense)
    if dense:
        checkpoint.formats = {}  # every quantized tensor is dequantized into a dense view
    try:
        return assemble(checkpoint, device, dtype, quant)
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{checkpoint.path}: could not read the weights ({e})") from None
