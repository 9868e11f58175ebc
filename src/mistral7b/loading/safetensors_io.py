"""Reading tensors lazily from safetensors files and (weights-only) torch pickles, and writing a
model's weights into a safetensors file one tensor at a time."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..config import ModelLoadError
from ..utils import BY_DTYPE


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a valid safetensors file ({e})") from None


def safetensors_reader(files: list[Path], rename: Callable[[str], str] = str, skip: frozenset[str] = frozenset()):
    """(reader, tensor count) of safetensors files, headers checked up front, the keys in `skip` left
    out. The reader yields (rename(key), tensor or the slice asked for): `get_slice` reads just those bytes.

    Each tensor is read through its own short-lived memory map: pages of a map that stays open
    count as resident memory, so one long-lived map would make a load's peak RSS the checkpoint
    plus the model, two copies.
    """
    names = []
    for path in files:
        with _open(path) as handle:
            names.append((path, [key for key in handle.keys() if key not in skip]))

    def read(slice_of, keep=()):
        for path, keys in names:
            for key in keys:
                name = rename(key)
                part = slice_of(name)
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        tensor = handle.get_tensor(key) if part is None else part.cut(handle.get_slice(key))
                except (SafetensorError, OSError, ValueError, RuntimeError, IndexError) as e:
                    raise ModelLoadError(f"{path}: tensor {key!r} is corrupt or truncated ({e})") from None
                yield name, tensor

    return read, sum(len(keys) for _, keys in names)


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One whole tensor of a safetensors file; a bad file is a ModelLoadError naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: tensor {key!r} is corrupt or truncated ({e})") from None


def pickle_reader(path: Path, rename: Callable[[str], str] = str):
    """(reader, tensor count) of a torch checkpoint read with `weights_only=True` (no pickled code is
    ever executed), memory-mapped: a slice touches only the pages it copies."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for bad pickles; all mean the same to a user
        raise ModelLoadError(f"{path}: not a loadable weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(state).__name__}")

    def read(slice_of, keep=()):
        for key, tensor in state.items():
            name = rename(key)
            part = slice_of(name)
            yield name, tensor if part is None else part.cut(tensor).clone()

    return read, len(state)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: dict[str, str] | None = None, desc: str | None = None) -> None:
    """Write a safetensors file tensor by tensor: (name, shape, dtype, thunk) are known up front, so the
    header goes first and each tensor is produced, written and dropped in turn. Written to a temporary
    name and renamed, so a failure never leaves a half-written file under the real name."""
    header: dict = {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        if dtype not in BY_DTYPE:
            raise ValueError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": BY_DTYPE[dtype].safetensors, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    bar = tqdm(total=len(tensors), desc=desc or f"writing {path.name}", unit="tensor", file=sys.stderr,
               disable=None, leave=False)
    try:
        with open(partial, "wb") as f, bar:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype, thunk in tensors:
                t = thunk().detach().to("cpu", dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
                bar.update(1)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_weights(model, path: Path, rename: Callable[[str], str] = lambda name: name,
                  transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Write `model`'s weights, unfused and under canonical names passed through `rename`, into the
    safetensors file `path` in the model's dtype; `transform(name, tensor)` changes a tensor (say, a
    q/k permutation) as it is written. A tied head is left out: loaders tie it back."""
    from . import canonical_views

    config, dtype = model.config, next(model.parameters()).dtype
    tensors = []
    for name, view in canonical_views(model).items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        thunk = (lambda t=view: t) if transform is None else (lambda t=view, n=name: transform(n, t))
        tensors.append((rename(name), tuple(view.shape), dtype, thunk))
    write_safetensors(path, tensors, {"format": "pt"})
