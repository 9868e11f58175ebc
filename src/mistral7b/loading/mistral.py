"""Mistral's own layout: `params.json` plus `consolidated.safetensors` (or `consolidated.00.pth`).

Names are already canonical; q/k rows are in interleaved pairs and are converted to rotate-half.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelLoadError, from_params_json
from . import Checkpoint, interleaved_to_half
from .safetensors_io import stream_pickle_free, stream_safetensors


def open_checkpoint(path: Path) -> Checkpoint:
    config = from_params_json(path / "params.json")
    if (path / "consolidated.safetensors").is_file():
        stream, count = stream_safetensors([path / "consolidated.safetensors"])
    elif (path / "consolidated.00.pth").is_file():
        if (path / "consolidated.01.pth").exists():
            raise ModelLoadError(f"{path}: tensor-parallel shards (consolidated.01.pth) are not supported")
        stream, count = stream_pickle_free(path / "consolidated.00.pth")
    else:
        raise ModelLoadError(f"{path}: no consolidated.safetensors or consolidated.00.pth next to params.json")

    heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}

    def tensors():
        for name, t in stream:
            n = heads.get(name.partition(".")[2].partition(".")[2])
            if n is not None and t.shape[0] == n * config.head_dim:  # a wrong shape is reported by assemble
                t = interleaved_to_half(t, n)
            yield name, t

    return Checkpoint(path, config, tensors(), count)
