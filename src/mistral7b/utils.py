"""Small shared facts: the one dtype table, `resolve_dtype`, the default device, the one GGUF detector
and the shared GGUF reader, and host-to-device index copies."""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DtypeName:
    dtype: torch.dtype
    name: str  # torch's own name, as HF's config.json writes it
    safetensors: str  # the code in a safetensors header
    aliases: tuple[str, ...] = ()


DTYPE_TABLE = (
    DtypeName(torch.float32, "float32", "F32", ("fp32",)),
    DtypeName(torch.bfloat16, "bfloat16", "BF16", ("bf16",)),
    DtypeName(torch.float16, "float16", "F16", ("fp16",)),
    DtypeName(torch.float64, "float64", "F64"),
    DtypeName(torch.int64, "int64", "I64"),
    DtypeName(torch.int32, "int32", "I32"),
    DtypeName(torch.int16, "int16", "I16"),
    DtypeName(torch.int8, "int8", "I8"),
    DtypeName(torch.uint8, "uint8", "U8"),
    DtypeName(torch.bool, "bool", "BOOL"),
    DtypeName(torch.float8_e4m3fn, "float8_e4m3fn", "F8_E4M3"),
    DtypeName(torch.float8_e5m2, "float8_e5m2", "F8_E5M2"),
)
BY_DTYPE = {row.dtype: row for row in DTYPE_TABLE}
BY_SAFETENSORS = {row.safetensors: row for row in DTYPE_TABLE}
# The dtypes a model can be loaded in, by every name a user may write.
LOAD_DTYPES = {n: row.dtype for row in DTYPE_TABLE[:3] for n in (row.name, *row.aliases)}


def dtype_of(name: str) -> torch.dtype | None:
    """A torch dtype from its torch name ("float16") or safetensors code ("F16"); None if unknown."""
    row = BY_SAFETENSORS.get(name) or next((r for r in DTYPE_TABLE if r.name == name), None)
    return None if row is None else row.dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A load dtype from a name, a torch dtype, or None (bfloat16 on CUDA, float32 elsewhere)."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(LOAD_DTYPES)}")
    return LOAD_DTYPES[dtype]


GGUF_MAGIC = b"GGUF"


def expand_path(path: str | Path) -> Path:
    """`path` with a leading ~ or ~user expanded; as written when that user has no home (a folder may
    really be named "~x"), where `Path.expanduser` raises RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def is_gguf(path: str | Path) -> bool:
    """A file with GGUF's magic bytes, or named `.gguf`: such a file is meant to be one, so a corrupt one
    reaches the GGUF reader and its clear error rather than "unknown format"."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_gguf(path: str | Path):
    """Open a GGUF file, turning the reader's many failure modes into one ModelLoadError.

    Parsing the header of a large vocabulary takes seconds, so the model loader and the tokenizer
    share one reader per unchanged file."""
    stat = Path(path).stat()
    return _read_gguf(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str, mtime_ns: int, size: int):
    from .config import ModelLoadError
    from .gguf_reader import FastGGUFReader  # numpy and gguf only: loaded on the first GGUF

    try:
        return FastGGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad files
        raise ModelLoadError(f"{path}: not a valid GGUF file or truncated ({type(e).__name__}: {e})") from None


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Host ints to `device` without a stream sync (pinned memory, non-blocking copy)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def slice_or_index(values: list[int], device: torch.device) -> slice | torch.Tensor:
    """A slice when `values` are consecutive (indexing is then a view), else an index tensor on `device`."""
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return to_device(values, device)


def own_code(fn):
    """`fn` with a code object of its own. Dynamo keeps compiled graphs, and counts them against its
    recompile limit (8), per code object; every cache is new, so decode steps sharing one code object
    made the fifth model or quantization compiled in one process fail with FailOnRecompileLimitHit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def cache_dir() -> Path:
    """The cache folder (the default model, built C kernels): $MISTRAL7B_CACHE, else XDG's or ~/.cache's mistral7b."""
    root = os.environ.get("MISTRAL7B_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mistral7b"
    )
    return Path(root)
