"""Each rank reads only its slices of a checkpoint and streams them into its meta-device shard.

The format modules' config readers and name maps are reused; only the reading differs:
- safetensors: `safe_open(...).get_slice(name)[rows]` or `[:, cols]` reads just those bytes;
- weights-only torch pickles are memory-mapped, so slicing touches only the pages it copies;
- GGUF rows are quantized along the input features in blocks (32 or 256 values). A row split
  (wq/wk/wv/w1/w3, the vocab-split head) is a contiguous byte range; a column split (wo/w2) is a
  byte range of every row when its bounds fall on block boundaries (true for Mistral 7B and
  SmolLM2 at every allowed N), so the rank dequantizes only its blocks. When a bound falls inside
  a block the rank dequantizes whole rows and keeps its columns: correct, but it reads the whole
  tensor (one at a time).
The slices then go through `loading.assemble` with the local config.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig, ModelLoadError
from ..loading import Checkpoint, assemble, interleaved_to_half, open_checkpoint
from ..model import Transformer
from .shard import Slice, VocabParallelHead, check_world_size, local_config, tensor_slice


def _cut(tensor, part: Slice | None) -> torch.Tensor:
    """Rows or columns of anything indexable like a tensor (a safetensors slice, a mapped tensor)."""
    if part is None:
        return tensor[:]
    return tensor[part.start : part.stop] if part.dim == 0 else tensor[:, part.start : part.stop]


def _safetensors(files: list[Path], rename, plan) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({e})") from None
        for key in keys:
            name = rename(key)
            try:  # a short-lived map per tensor, as loading.safetensors_io explains
                with safe_open(str(path), framework="pt") as handle:
                    tensor = _cut(handle.get_slice(key), plan(name))
            except (SafetensorError, OSError, ValueError, RuntimeError, IndexError) as e:
                raise ModelLoadError(f"{path}: tensor {key!r} is corrupt or truncated ({e})") from None
            yield name, tensor


def _pickle(path: Path, rename, plan) -> Iterator[tuple[str, torch.Tensor]]:
    from ..loading.safetensors_io import stream_pickle_free

    stream, _ = stream_pickle_free(path)
    for key, tensor in stream:
        name = rename(key)
        yield name, _cut(tensor, plan(name)).clone()


def _gguf_tensor(t, part: Slice | None) -> torch.Tensor:
    """Dequantize only the rows, or the whole blocks of columns, that `part` selects."""
    import gguf

    shape = [int(d) for d in reversed(t.shape)]
    data = t.data.reshape(shape[0], -1) if len(shape) == 2 else t.data
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    if data.dtype != np.uint8:
        block, type_size = 1, 1  # F32/F16 arrive as elements, not bytes
    whole_rows = None
    if part is not None and part.dim == 0:
        data, shape[0] = data[part.start : part.stop], part.stop - part.start
    elif part is not None and part.start % block == 0 and part.stop % block == 0:
        data = data[:, part.start // block * type_size : part.stop // block * type_size]
        shape[1] = part.stop - part.start
    elif part is not None:
        whole_rows = part
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        array = np.array(data, dtype=np.float32)
    else:
        array = gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type)
    tensor = torch.from_numpy(np.ascontiguousarray(array).reshape(shape))
    return _cut(tensor, whole_rows).contiguous() if whole_rows is not None else tensor


def gguf_table(path: Path) -> list[tuple[str, int, tuple[int, ...], int, int]]:
    """Where each tensor of a GGUF file lies: (name, type, dims, offset, bytes). Parsing a header with
    a large vocabulary takes seconds in Python, so rank 0 parses it once and hands the table on."""
    from ..loading import gguf as gguf_format

    return [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
            for t in gguf_format.read(path).tensors]


def _mapped_tensors(path: Path, table) -> Iterator[SimpleNamespace]:
    """The table's tensors as the gguf reader would give them (name, type, dims, mapped data)."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    for name, code, dims, offset, n_bytes in table:
        qtype = gguf.GGMLQuantizationType(code)
        shape = tuple(reversed(dims))
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype)
        if dtype is None:
            dtype, shape = np.uint8, quant_shape_to_byte_shape(shape, qtype)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(n_bytes,)).view(dtype).reshape(shape)
        yield SimpleNamespace(name=name, tensor_type=qtype, shape=dims, data=data)


def _gguf(path: Path, plan, table=None) -> Iterator[tuple[str, torch.Tensor]]:
    from ..loading import gguf as gguf_format

    for t in gguf_format.read(path).tensors if table is None else _mapped_tensors(path, table):
        name = gguf_format.to_canonical(t.name)
        try:
            tensor = _gguf_tensor(t, plan(name))
        except Exception as e:  # noqa: BLE001 - dequantizing garbage fails in numpy in many ways
            raise ModelLoadError(f"{path}: tensor {t.name!r} is corrupt ({type(e).__name__}: {e})") from None
        yield name, tensor


def _raw_slices(checkpoint: Checkpoint, plan, table) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, this rank's slice) in the checkpoint's own q/k row order."""
    from ..loading import hf

    path = checkpoint.path
    if path.is_file():  # only GGUF checkpoints are single files
        return _gguf(path, plan, table)
    if (path / "params.json").is_file():
        if (path / "consolidated.safetensors").is_file():
            return _safetensors([path / "consolidated.safetensors"], str, plan)
        return _pickle(path / "consolidated.00.pth", str, plan)
    files = hf.weight_files(path)
    if files[0].suffix == ".bin":
        return _pickle(files[0], hf.to_canonical, plan)
    return _safetensors(files, hf.to_canonical, plan)


def shard_checkpoint(source, rank: int, world: int, head: str = "replicated",
                     prepared: tuple[Path, dict, list] | None = None) -> tuple[Checkpoint, ModelConfig]:
    """Rank `rank`'s checkpoint (local config, its slices) and the full model's config.

    `prepared` (path, config dict, GGUF table) from rank 0 spares a worker parsing a GGUF header."""
    if prepared is not None:
        path, config_dict, table = prepared
        full = Checkpoint(Path(path), ModelConfig.from_dict(config_dict), None, len(table))
    else:
        full, table = open_checkpoint(source), None
    config = full.config
    check_world_size(config, world, head)
    local = local_config(config, world)
    plan = lambda name: tensor_slice(name, config, rank, world, head)  # noqa: E731
    interleaved = not (full.path.is_dir() and not (full.path / "params.json").is_file())  # all but HF
    heads = {"attention.wq.weight": local.n_heads, "attention.wk.weight": local.n_kv_heads}

    def tensors():
        for name, tensor in _raw_slices(full, plan, table):
            n = heads.get(name.partition(".")[2].partition(".")[2])
            if interleaved and n is not None and tensor.shape[0] == n * config.head_dim:
                tensor = interleaved_to_half(tensor, n)  # per head, so a slice of whole heads converts alone
            yield name, tensor
            if name == "tok_embeddings.weight" and head == "vocab" and config.tie_embeddings:
                yield "output.weight", _cut(tensor, plan("output.weight")).clone()

    return Checkpoint(full.path, local, tensors(), full.n_tensors), config


def load_shard(source, rank: int, world: int, group=None, device=None, dtype=None, head: str = "replicated",
               prepared=None):
    """This rank's Transformer shard (collectives not yet installed) and the full config.

    With `head="vocab"` the shard's `output` becomes a VocabParallelHead holding 1/N of the rows."""
    checkpoint, config = shard_checkpoint(source, rank, world, head, prepared)
    if head == "replicated":
        return _assemble(checkpoint, device, dtype), config
    head_rows: list[torch.Tensor] = []

    def without_head():
        for name, tensor in checkpoint.tensors:
            if name == "output.weight":
                head_rows.append(tensor)
            else:
                yield name, tensor

    # A tied local config makes assemble expect no output.weight; the head is put in afterwards.
    tied = Checkpoint(checkpoint.path, checkpoint.config.with_(tie_embeddings=True), without_head(), checkpoint.n_tensors)
    model = _assemble(tied, device, dtype)
    if not head_rows:  # a tied checkpoint may also store the head: both copies are the same rows
        raise ModelLoadError(f"{checkpoint.path}: missing tensors output.weight")
    weight = head_rows[0].to(device=model.norm.weight.device, dtype=model.norm.weight.dtype)
    model.output = VocabParallelHead(weight, world, group)
    return model, config


def random_shard(config: ModelConfig, rank: int, world: int, group=None, device=None, dtype=None,
                 head: str = "replicated"):
    """A shard with random weights at `config`'s shape, built on the device (benchmarks: speed does
    not depend on the values, and no 14 GB checkpoint has to be written first)."""
    check_world_size(config, world, head)
    torch.manual_seed(rank)
    with torch.device(device or "cpu"):
        model = Transformer(local_config(config, world)).to(dtype or torch.float32).eval()
        if head == "vocab":
            weight = torch.randn(config.vocab_size // world, config.dim, dtype=model.norm.weight.dtype) * 0.02
            model.output = VocabParallelHead(weight, world, group)
    return model, config


def _assemble(checkpoint: Checkpoint, device, dtype) -> Transformer:
    try:
        return assemble(checkpoint, device, dtype)
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{checkpoint.path}: could not read the weights ({e})") from None
