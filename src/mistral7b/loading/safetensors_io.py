"""Reading tensors lazily from safetensors files and (weights-only) torch pickles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelLoadError


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a valid safetensors file ({e})") from None


def stream_safetensors(files: list[Path]) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """Tensors one at a time, and how many there are; headers are checked up front.

    Each tensor is read through its own short-lived memory map: pages of a map that stays open
    count as resident memory, so one long-lived map would make a load's peak RSS the checkpoint
    plus the model, two copies.
    """
    names = []
    for path in files:
        with _open(path) as handle:
            names.append((path, list(handle.keys())))

    def stream():
        for path, keys in names:
            for name in keys:
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        tensor = handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise ModelLoadError(f"{path}: tensor {name!r} is corrupt or truncated ({e})") from None
                yield name, tensor

    return stream(), sum(len(keys) for _, keys in names)


def stream_pickle_free(path: Path) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """A torch checkpoint read with `weights_only=True`: no pickled code is ever executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for bad pickles; all mean the same to a user
        raise ModelLoadError(f"{path}: not a loadable weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return iter(state.items()), len(state)
