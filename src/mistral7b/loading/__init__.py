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
from dataclasses import dataclass
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


def qk_to_rotate_half(name: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A tensor as read from an interleaved-pairs checkpoint (Mistral, GGUF), q/k rows converted to
    rotate-half. A q/k of the wrong shape is left as it is, for `assemble` to report."""
    n = qk_heads(name, config)
    if n is not None and w.shape[0] == n * config.head_dim:
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


def canonical_views(model: Transformer) -> dict[str, torch.Tensor]:
    """canonical name -> the parameter, or the rows of a fused parameter, that holds that weight."""
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
        layer, _, rest = name.removeprefix("layers.").partition(".") if name.startswith("layers.") else ("", "", "")
        key = rest.removesuffix(".weight")
        if key in fused:
            param, lo, hi = fused[key]
            views[name] = params[f"layers.{layer}.{param}.weight"][lo:hi]
        else:
            views[name] = params[name]
    return views


def assemble(checkpoint: Checkpoint, device=None, dtype=None) -> Transformer:
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = Transformer(checkpoint.config).to(dtype)
    model.to_empty(device=device)
    if checkpoint.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty unties them
    targets = {name: (view, tuple(view.shape)) for name, view in canonical_views(model).items()}
    loaded: set[str] = set()
    bar = tqdm(
        total=checkpoint.n_tensors or None, desc=f"loading {checkpoint.path.name}", unit="tensor",
        file=sys.stderr, disable=None, leave=False,
    )
    with torch.no_grad(), bar:
        for name, tensor in checkpoint.tensors:
            bar.update(1)
            if name == "output.weight" and checkpoint.config.tie_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            if name not in targets:
                raise ModelLoadError(f"{checkpoint.path}: unexpected tensor {name!r} for this config")
            target, shape = targets[name]
            if tuple(tensor.shape) != shape:
                raise ModelLoadError(
                    f"{checkpoint.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"but the config implies {shape}"
                )
            target.copy_(tensor)
            loaded.add(name)
    missing = [n for n in targets if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{checkpoint.path}: missing tensors {shown}")
    return model.eval()


def open_checkpoint(source: str | Path) -> Checkpoint:
    """Recognise the format of `source` (a folder, a file or a hub id) and open it."""
    from . import gguf, hf, hub, mistral

    path = Path(source).expanduser()
    if not path.exists():
        if hub.looks_like_hub_id(str(source)):
            path = hub.resolve(str(source))
        else:
            raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_file():
        if is_gguf(path):
            return gguf.open_checkpoint(path)
        if path.name in ("config.json", "params.json"):
            path = path.parent
        else:
            raise ModelLoadError(f"{path}: unknown checkpoint format (expected .gguf, or a folder)")
    if (path / "params.json").is_file():
        return mistral.open_checkpoint(path)
    if (path / "config.json").is_file():
        return hf.open_checkpoint(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return gguf.open_checkpoint(ggufs[0])
    raise ModelLoadError(
        f"{path}: unknown checkpoint format (no config.json, params.json or single .gguf file in this folder)"
    )


def load_model(source: str | Path, device=None, dtype=None) -> Transformer:
    """Load a Transformer from an HF folder, a Mistral folder, a .gguf file or a cached hub id."""
    checkpoint = open_checkpoint(source)
    try:
        return assemble(checkpoint, device, dtype)
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{checkpoint.path}: could not read the weights ({e})") from None
