"""Checkpoint loading: find the format, read its config, stream its tensors into a model.

Every format module maps its tensors onto the canonical names of `mistral7b.weights` (Mistral's,
unfused, q/k rows in rotate-half order) and reads, on request, only a slice of each (one rank's
share under tensor parallelism). `assemble` builds the model on the meta device, allocates it once
on the target device and copies each tensor into place as it arrives, so a checkpoint is never held
twice. What goes where, quantized or not, is a `quant.plan.LoadPlan` decided before any tensor is
read. A checkpoint that is missing tensors, has extra ones or disagrees on a shape raises
`ModelLoadError` and no model is returned.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig, ModelLoadError
from ..model import Transformer
from ..utils import expand_path, is_gguf
from ..weights import Slice, head_slot, local_config, weight_map

SliceOf = Callable[[str], "Slice | None"]
# A format's reader: (slice_of, keep) -> (canonical name, tensor); `keep` names the tensors wanted in
# their stored quantized format (QuantizedWeight), every other one arrives dequantized.
Reader = Callable[[SliceOf, Container[str]], Iterator[tuple[str, object]]]


def _whole(name: str) -> None:
    return None


@dataclass
class Checkpoint:
    """A checkpoint opened but not read: its config, and its tensors on request (`stream`).

    Format readers set `reader`; a stream of whole tensors (`tensors`, e.g. random weights) works too,
    each sliced after it is made. `formats`: canonical name -> WeightFormat of the tensors stored
    quantized; `interleaved`: q/k rows stored in interleaved pairs (Mistral, GGUF); `quantization`:
    the hub quantization found (e.g. "AWQ 4-bit g128 (GEMM)"), None for others."""

    path: Path
    config: ModelConfig
    tensors: "Iterator[tuple[str, torch.Tensor]] | None" = None
    n_tensors: int = 0
    formats: dict = field(default_factory=dict)
    reader: "Reader | None" = None
    interleaved: bool = False
    format: str = "tensors"
    quantization: str | None = None

    def stream(self, slice_of: SliceOf = _whole, keep: Container[str] = frozenset()):
        """(canonical name, tensor or its slice), q/k rows in rotate-half order."""
        if self.reader is not None:
            items = self.reader(slice_of, keep)
        else:
            items = ((name, cut(t, slice_of(name))) for name, t in self.tensors)
        slots = weight_map(self.config)
        for name, tensor in items:
            slot = slots.get(name)
            if self.interleaved and slot is not None and slot.heads:
                tensor = _rotate_half(tensor, self.config.head_dim)
            yield name, tensor


def cut(tensor, part: Slice | None):
    """Rows or columns of a tensor or a QuantizedWeight (whole groups of columns)."""
    from ..quant.qtensor import QuantizedWeight

    if part is None:
        return tensor
    if not isinstance(tensor, QuantizedWeight):
        return part.cut(tensor).contiguous()
    if part.dim == 0:
        return tensor.map_rows(part.cut)
    if tensor.perm is not None:
        raise ValueError(f"columns {part.start}:{part.stop} of an act-order weight cut its groups")
    from dataclasses import replace

    g, tensor = tensor.group_size, tensor.unpacked()
    if g == tensor.q.shape[1]:  # one group per row: the scales stay
        return replace(tensor, q=part.cut(tensor.q).contiguous(), group_size=part.stop - part.start)
    if part.start % g or part.stop % g:
        raise ValueError(f"columns {part.start}:{part.stop} split groups of {g}")
    groups = Slice(1, part.start // g, part.stop // g)
    zero = None if tensor.zero is None else groups.cut(tensor.zero).contiguous()
    return replace(tensor, q=part.cut(tensor.q).contiguous(), scale=groups.cut(tensor.scale).contiguous(), zero=zero)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from interleaved pairs (Meta, Mistral, GGUF) to HF's rotate-half order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`, for writing Mistral and GGUF checkpoints."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rotate_half(w, head_dim: int):
    """q/k rows of whole heads (all of them, or one rank's) from interleaved pairs to rotate-half; a
    quantized weight has its rows (and their scales) reordered the same way. Rows that are not whole
    heads are left as they are, for `assemble` to report the shape."""
    if w.shape[0] % head_dim:
        return w
    n = w.shape[0] // head_dim
    if hasattr(w, "map_rows"):
        return w.map_rows(lambda rows: interleaved_to_half(rows, n))
    return interleaved_to_half(w, n)


def canonical_names(config: ModelConfig) -> list[str]:
    return list(weight_map(config))


def canonical_views(model: Transformer, skip: Container[str] = frozenset()) -> dict[str, torch.Tensor]:
    """canonical name -> the parameter, or the rows of a fused parameter, that holds that weight
    (leaving out the weights of the modules in `skip`, which are quantized)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[f"{s.module}.weight"][s.lo : s.hi] for name, s in weight_map(model.config).items()
            if s.module not in skip}


def assemble(checkpoint: Checkpoint, device=None, dtype=None, plan=None) -> Transformer:
    """Build on meta, swap in the quantized modules the plan asks for, allocate once, then copy (or
    quantize) each tensor, or this rank's slice of it, into place as it arrives: a 16-bit copy of the
    model never exists. `plan` is a LoadPlan (or a QuantConfig / None, planned here)."""
    from ..quant.plan import LoadPlan, make_plan

    if not isinstance(plan, LoadPlan):
        plan = make_plan(checkpoint.config, plan, checkpoint.formats)
    try:
        return _assemble(checkpoint, torch.device(device or "cpu"), dtype or torch.float32, plan)
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{checkpoint.path}: could not read the weights ({e})") from None


def _assemble(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, plan) -> Transformer:
    from ..quant import plan as quant_plan

    sharding = plan.sharding
    config = local_config(checkpoint.config, sharding.world) if sharding.world > 1 else checkpoint.config
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    modules = quant_plan.install(model, plan.formats, device, dtype, checkpoint.path, plan.rows_kernel)
    _allocate(model, device)
    if config.tie_embeddings and "output" not in modules:
        model.output.weight = model.tok_embeddings.weight  # to_empty unties them
    model.quant_config = plan.quant
    targets = _targets(model, modules, separate_head="output.weight" in checkpoint.formats)
    loaded: set[str] = set()
    bar = tqdm(
        total=checkpoint.n_tensors or None, desc=f"loading {checkpoint.path.name}", unit="tensor",
        file=sys.stderr, disable=None, leave=False,
    )
    slice_of = lambda name: sharding.slice_of(checkpoint.config, name)  # noqa: E731
    read_slice = lambda name: None if name in plan.whole else slice_of(name)  # noqa: E731
    with torch.no_grad(), bar:
        for name, tensor in checkpoint.stream(read_slice, plan.keep):
            bar.update(1)
            if name in plan.whole:  # quantized whole, then cut
                tensor = cut(targets[name][0][0].fmt.quantize(tensor, name), slice_of(name))
            if name == "output.weight" and config.tie_embeddings and name not in targets:
                continue  # some tied checkpoints store the shared matrix twice
            if name not in targets:
                raise ModelLoadError(f"{checkpoint.path}: unexpected tensor {name!r} for this config")
            for target in targets[name]:
                _place(checkpoint.path, name, tensor, target, dtype)
            loaded.add(name)
    missing = [n for n in targets if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{checkpoint.path}: missing tensors {shown}")
    # An inference model: a forward outside no_grad must not build an autograd graph (the eager int8
    # path would keep a dequantized copy of every weight alive per call).
    return model.requires_grad_(False).eval()


def _allocate(model: Transformer, device: torch.device) -> None:
    """`model.to_empty(device)` without its `empty_like` of meta tensors, whose Python meta path
    imports sympy (about a second on a small CPU): plain `torch.empty` of each shape. Like
    `to_empty`, it unties tied parameters."""
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def _targets(model: Transformer, modules: dict, separate_head: bool) -> dict[str, list]:
    """canonical name -> where it goes: dense views of parameters, or (module, lo, hi) row ranges of a
    quantized module. A tied embedding also feeds a quantized head, unless the checkpoint stores that
    head on its own (`separate_head`: a quantized checkpoint of a tied model)."""
    config = model.config
    tied, vocab = config.tie_embeddings, config.vocab_size
    targets = {name: [view] for name, view in canonical_views(model, modules).items()}
    slots = list(weight_map(config).values()) + [head_slot(config)] * (tied and separate_head)
    for slot in slots:
        if slot.module in modules:
            targets[slot.name] = [(modules[slot.module], slot.lo, slot.hi)]
    if tied and "output" in modules and not separate_head:
        targets["tok_embeddings.weight"].append((modules["output"], 0, vocab))
    return targets


def _place(path: Path, name: str, tensor, target, dtype: torch.dtype) -> None:
    """Copy one tensor into a dense view, or into rows of a quantized module: as it is when it arrives
    quantized (the plan kept it), else quantized into the module's format."""
    if isinstance(target, tuple):
        module, lo, hi = target
        shape = (hi - lo, module.in_features)
    else:
        shape = tuple(target.shape)
    if tuple(tensor.shape) != shape:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config implies {shape}"
        )
    from ..quant.qtensor import QuantizedWeight

    quantized = isinstance(tensor, QuantizedWeight)
    if not isinstance(target, tuple):
        target.copy_(tensor.dequantize(dtype) if quantized else tensor)
        return
    module.fill(lo, hi, tensor if quantized else module.fmt.quantize(tensor.to(module.target), name))


def find_format(source: str | Path) -> tuple[str, Path]:
    """(format, path) of a checkpoint: "gguf" (a file), "mistral", "quantized" or "hf" (folders). A
    hub id resolves to its cached folder; a config.json or params.json stands for its folder."""
    from . import hub, quantized

    path = expand_path(source)
    if not path.exists():
        if not hub.looks_like_hub_id(str(source)):
            raise ModelLoadError(f"{path}: no such file or folder")
        path = hub.resolve(str(source))
    if path.is_file():
        if is_gguf(path):
            return "gguf", path
        if path.name not in ("config.json", "params.json"):
            raise ModelLoadError(f"{path}: unknown checkpoint format (expected .gguf, or a folder)")
        path = path.parent
    if (path / "params.json").is_file():
        return "mistral", path
    if (path / "config.json").is_file():
        return ("quantized" if quantized.is_quantized_folder(path) else "hf"), path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise ModelLoadError(
        f"{path}: unknown checkpoint format (no config.json, params.json or single .gguf file in this folder)"
    )


def open_checkpoint(source: str | Path) -> Checkpoint:
    """Recognise the format of `source` (a folder, a file or a hub id) and open it (headers only)."""
    import importlib

    fmt, path = find_format(source)
    checkpoint = importlib.import_module(f"{__name__}.{fmt}").open_checkpoint(path)
    checkpoint.format = fmt
    return checkpoint


def load_model(source: str | Path, device=None, dtype=None, quantize=None) -> Transformer:
    """Load a Transformer from an HF folder, a Mistral folder, a .gguf file or a cached hub id.

    `quantize` (None, "int8", "int4", "none" or a QuantConfig) quantizes the block linears and the head
    while streaming. Without it, a GGUF file's quantized tensors stay quantized in the nearest kernel
    format (`dtype` then sets the activations only) and a quantized checkpoint (`convert --quantize`)
    loads as saved. With it, tensors already in the asked format (a GGUF's Q4 blocks under int4 on
    their own grid of 32) are kept as they are and the others quantized again from their values;
    "none" (or False) dequantizes everything into `dtype`. Unknown methods raise ValueError.
    """
    from ..quant.config import resolve

    quant = resolve(quantize)
    return assemble(open_checkpoint(source), device, dtype, quant)
