"""Mistral's own layout: `params.json` plus `consolidated.safetensors` (or `consolidated.00.pth`).

The reader (`read_config`, `open_checkpoint`) and the writer (`save`: params.json with rope_theta and
sliding_window always written). Names are already canonical; q/k rows are in interleaved pairs,
converted to rotate-half on the way in and back on the way out.
"""

from __future__ import annotations

from pathlib import Path

import json

from ..config import ModelConfig, ModelLoadError, build_config, read_json
from ..weights import weight_map
from . import Checkpoint, half_to_interleaved
from .safetensors_io import pickle_reader, safetensors_reader, write_weights


def read_config(path: Path) -> ModelConfig:
    """Mistral's `params.json`. v0.1's file has no rope_theta: 10000 when windowed, else 1e6."""
    p = read_json(path)
    try:
        window = p.get("sliding_window")
        return build_config(
            path,
            dim=p["dim"],
            n_layers=p["n_layers"],
            head_dim=p.get("head_dim", p["dim"] // p["n_heads"]),
            hidden_dim=p["hidden_dim"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads", p["n_heads"]),
            norm_eps=p.get("norm_eps", 1e-5),
            vocab_size=p["vocab_size"],
            rope_theta=p.get("rope_theta", 10000.0 if window else 1e6),
            sliding_window=window,
            max_seq_len=p.get("max_seq_len", p.get("max_position_embeddings", 32768)),
            tie_embeddings=p.get("tied_embeddings", False),
            name=path.parent.name,
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: missing field {e.args[0]!r}") from None


def open_checkpoint(path: Path) -> Checkpoint:
    config = read_config(path / "params.json")
    if (path / "consolidated.safetensors").is_file():
        reader, count = safetensors_reader([path / "consolidated.safetensors"])
    elif (path / "consolidated.00.pth").is_file():
        if (path / "consolidated.01.pth").exists():
            raise ModelLoadError(f"{path}: tensor-parallel shards (consolidated.01.pth) are not supported")
        reader, count = pickle_reader(path / "consolidated.00.pth")
    else:
        raise ModelLoadError(f"{path}: no consolidated.safetensors or consolidated.00.pth next to params.json")
    return Checkpoint(path, config, n_tensors=count, reader=reader, interleaved=True)


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


def save(model, path: str | Path) -> Path:
    """Write `model` in Mistral's layout: params.json + consolidated.safetensors (q/k interleaved)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config

    def interleave(name, t):
        n = getattr(weight_map(config).get(name), "heads", None)
        return t if n is None else half_to_interleaved(t, n)

    (path / "params.json").write_text(json.dumps(mistral_params(config), indent=2) + "\n")
    write_weights(model, path / "consolidated.safetensors", transform=interleave)
    return path
