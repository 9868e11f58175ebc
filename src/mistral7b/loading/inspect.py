"""Looking into a checkpoint without loading it: its format, its config, and what its weight files
store (parameters and bytes by storage type, from the headers alone)."""

from __future__ import annotations

from pathlib import Path

from ..utils import BY_SAFETENSORS, dtype_of
from . import Checkpoint

TIED_NAMES = ("output.weight", "lm_head.weight")


def checkpoint_format(checkpoint: Checkpoint) -> str:
    """"gguf", "mistral" or "hf" (our quantized folders are HF-shaped)."""
    return "hf" if checkpoint.format == "quantized" else checkpoint.format


def _weight_files(checkpoint: Checkpoint) -> list[Path]:
    from . import hf

    if checkpoint_format(checkpoint) == "hf":
        return hf.weight_files(checkpoint.path)
    st = checkpoint.path / "consolidated.safetensors"
    return [st] if st.is_file() else [checkpoint.path / "consolidated.00.pth"]


def _file_entries(file: Path):
    """(name, storage type, numel, bytes) of each tensor in a safetensors file or a weights-only pickle."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                numel = 1
                for d in s.get_shape():
                    numel *= d
                kind = s.get_dtype()
                row = BY_SAFETENSORS.get(kind)
                yield name, kind, numel, numel * (row.dtype.itemsize if row else 0)
        return
    import torch

    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    for name, t in state.items():
        yield name, str(t.dtype).removeprefix("torch."), t.numel(), t.numel() * t.element_size()


def _entries(checkpoint: Checkpoint):
    if checkpoint_format(checkpoint) == "gguf":
        from . import gguf

        for t in gguf.read(checkpoint.path).tensors:  # the reader the checkpoint opened (cached)
            yield t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)
        return
    for file in _weight_files(checkpoint):
        yield from _file_entries(file)


def stored_tensors(checkpoint: Checkpoint) -> dict:
    """Parameter count and bytes by storage type, from the weight files' headers (no weights read)."""
    by_type: dict[str, dict[str, int]] = {}
    total = 0
    for name, kind, numel, nbytes in _entries(checkpoint):
        if checkpoint.config.tie_embeddings and name in TIED_NAMES:
            continue  # a tied head stored a second time is the same parameters
        slot = by_type.setdefault(kind, {"tensors": 0, "params": 0, "bytes": 0})
        slot["tensors"] += 1
        slot["params"] += numel
        slot["bytes"] += nbytes
        total += numel
    return {"params": total, "bytes": sum(v["bytes"] for v in by_type.values()), "by_type": by_type}


def source_dtype(checkpoint: Checkpoint):
    """The float dtype most of the source's bytes are stored in; GGUF (quantized) loads in float32."""
    import torch

    if checkpoint_format(checkpoint) == "gguf":
        return torch.float32
    floats = [(v["bytes"], dtype_of(k)) for k, v in stored_tensors(checkpoint)["by_type"].items()]
    floats = [(n, d) for n, d in floats if d in (torch.float32, torch.float16, torch.bfloat16)]
    return max(floats, key=lambda x: x[0])[1] if floats else torch.float32
