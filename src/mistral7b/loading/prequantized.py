"""Quantized checkpoints from the Hugging Face hub, run on our int4/int8 kernels with no re-quantizing:
AWQ (GEMM layout), GPTQ (4 and 8 bits) and compressed-tensors `pack-quantized` (w4a16, w8a16).

An HF folder whose `config.json` has a `quantization_config` opens here (`hf.open_checkpoint`). Each
quantized matrix [N, K] (N outputs, K inputs) stores unsigned integers q, and per group of g inputs a
scale s and an integer zero z, with `w = (q - z) * s`; that is rewritten exactly into our formats:

| format | stored | ours |
|---|---|---|
| AWQ GEMM, 4-bit | `qweight` int32 [K, N/8], 8 values per word along N in the order 0,2,4,6,1,3,5,7; `qzeros` int32 [K/g, N/8] the same; `scales` [K/g, N] | int4: q, s, zero (8 - z) s |
| GPTQ, 4-bit | `qweight` int32 [K/8, N] along K; `qzeros` int32 [G, N/8] along N; `scales` [G, N]; `g_idx` [K] | int4: q, s, zero (8 - z) s |
| GPTQ, 8-bit | the same with 4 values per word | int8 with zeros: q - 128, s, zero (128 - z) s |
| compressed-tensors, 4-bit | `weight_packed` int32 [N, K/8] along K holding q + 8 (q signed); `weight_scale` [N, G]; `weight_zero_point` (asymmetric) int32 [N/8, G] along N, also + 8 | int4: q + 8, s, zero -z s |
| compressed-tensors, 8-bit | the same with 4 values per word, + 128 | int8: q, s (zero -z s when asymmetric) |

Words hold their values low bits first. GPTQ's classic format (`checkpoint_format` "gptq", written by
auto-gptq and optimum; also the default) stores z - 1, "gptq_v2" (GPTQModel) stores z; `sym` changes
no arithmetic, only which zeros occur. A zero term like (8 - z) s is an integer of at most 9 bits
times a 16-bit float, exact in float32, so the weights read equal the format's own dequantization to
the last bit; the kernels then round scales and zeros to bf16 as they do for a GGUF's. int4 per
output channel (GPTQ `group_size` -1) is read in groups of 128 (each scale repeated: exact), as the
int4 kernels take groups of 32 to 256; int4 groups they do not take become int8 groups with zeros.

Act-order (GPTQ `desc_act`, compressed-tensors `actorder` "group"): when `g_idx` does not keep each
group a run of inputs, the inputs are sorted by group once at load (`input_order`), the integers'
columns permuted alike, and the module permutes x the same way before its kernel (`in_perm`); the
parts of a fused matrix (q/k/v, gate/up) share their input, so they must share that order (GPTQ
derives it from the input's statistics, the same for each). Our own quantized layout does not store
a permutation: `convert --to quantized` refuses such a model.

Refused, with a one-line ValueError naming quant_method and the field: other methods, AWQ's GEMV,
Marlin and exllama layouts and AWQ without zero points, bits other than 4 and 8, GPTQ checkpoint
formats other than gptq/gptq_v2, a `g_idx` with groups of other than group_size inputs or that orders
the parts of a fused matrix differently, and compressed-tensors formats other than pack-quantized,
activation quantization, non-int types and more than one config group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig, ModelLoadError
from ..quant.config import DEFAULT_GROUP_SIZE, GROUP_SIZES, fitting_group_size
from ..quant.qtensor import QuantizedWeight, WeightFormat
from . import Checkpoint, cut

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column j*8 + AWQ_ORDER[i] sits in bits 4i.. of word j
_AWQ_COLUMNS = tuple(AWQ_ORDER.index(c) for c in range(8))  # the field that holds column c
PARTS = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx"),
         "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")}
SOURCES = {"awq": "AWQ", "gptq": "GPTQ", "compressed-tensors": "compressed-tensors"}


class UnsupportedQuantization(ModelLoadError, ValueError):
    """A quantization_config this reader does not run (one line: quant_method and the field)."""


def _refuse(method, field: str, value, why: str = "") -> UnsupportedQuantization:
    return UnsupportedQuantization(f"quant_method {method!r}: {field}={value!r} is not supported" + (f" ({why})" if why else ""))


@dataclass(frozen=True)
class Scheme:
    """How one checkpoint stores its matrices: `zeros` is "stored" (AWQ, gptq_v2), "minus_one"
    (GPTQ's classic z - 1), "signed" (compressed-tensors, asymmetric) or "none" (symmetric)."""

    method: str
    bits: int
    group_size: int | None  # None: one group per output channel
    zeros: str
    act_order: bool = False
    detail: str = ""

    @property
    def source(self) -> str:
        return SOURCES[self.method]

    def describe(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per channel"
        return f"{self.source} {self.bits}-bit {group}" + (f" ({self.detail})" if self.detail else "")

    def weight_format(self, k: int) -> WeightFormat:
        """Ours for a matrix `k` inputs wide: int4 on a grid the kernels take, else int8 with zeros."""
        group = self.group_size or k
        if self.bits == 4:
            stored = self.group_size in GROUP_SIZES  # else per channel, or groups too wide: split them
            fits = group if stored else fitting_group_size(group, DEFAULT_GROUP_SIZE)
            if fits:
                return WeightFormat("int4", fits, True, self.source)
        return WeightFormat("int8", self.group_size, self.zeros != "none", self.source)


def _group(method: str, field: str, value) -> int | None:
    if value == -1:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _refuse(method, field, value)
    return value


def _awq(qc: dict) -> Scheme:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse("awq", "version", version, "only the GEMM layout")
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise _refuse("awq", "bits", bits, "AWQ is read at 4 bits")
    if not qc.get("zero_point", True):
        raise _refuse("awq", "zero_point", qc.get("zero_point"))
    group = _group("awq", "group_size", qc.get("group_size", qc.get("q_group_size", 128)))
    return Scheme("awq", 4, group, "stored", detail="GEMM")


def _gptq(qc: dict) -> Scheme:
    bits = qc.get("bits")
    if bits not in (4, 8):
        raise _refuse("gptq", "bits", bits, "4 and 8 are")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse("gptq", "checkpoint_format", fmt, "gptq and gptq_v2 are")
    group = _group("gptq", "group_size", qc.get("group_size", 128))
    act = bool(qc.get("desc_act", False))
    detail = ", ".join([fmt] + ["desc_act"] * act)
    return Scheme("gptq", bits, group, "minus_one" if fmt == "gptq" else "stored", act, detail)


def _compressed(qc: dict) -> Scheme:
    m = "compressed-tensors"
    if qc.get("format") != "pack-quantized":
        raise _refuse(m, "format", qc.get("format"), "pack-quantized is")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise _refuse(m, "config_groups", len(groups), "one group for every quantized Linear")
    if groups[0].get("input_activations") is not None:
        raise _refuse(m, "input_activations", "set", "weight-only w4a16/w8a16 are")
    w = groups[0].get("weights") or {}
    if w.get("num_bits") not in (4, 8):
        raise _refuse(m, "num_bits", w.get("num_bits"), "4 and 8 are")
    if w.get("type", "int") != "int" or w.get("dynamic", False):
        raise _refuse(m, "weights.type", w.get("type"), "static int weights are")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        raise _refuse(m, "strategy", strategy, "group and channel are")
    group = _group(m, "group_size", w.get("group_size")) if strategy == "group" else None
    zeros = "none" if w.get("symmetric", True) else "signed"
    act = w.get("actorder") == "group"
    detail = "pack-quantized, " + ("symmetric" if zeros == "none" else "asymmetric") + ", actorder group" * act
    return Scheme(m, w["num_bits"], group, zeros, act, detail)


def scheme_of(qc) -> Scheme:
    """The Scheme of a config.json `quantization_config`, or a one-line UnsupportedQuantization."""
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    parse = {"awq": _awq, "gptq": _gptq, "compressed-tensors": _compressed}.get(method)
    if parse is None:
        raise _refuse(method, "quant_method", method, "awq, gptq and compressed-tensors are")
    return parse(qc)


# ------------------------------------------------------------------------------------------ decoding


def unpack_words(words: Tensor, bits: int, dim: int) -> Tensor:
    """int32 words -> their 32/bits unsigned fields, low bits first, laid out along `dim` (int16)."""
    rows, cols = words.shape
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    fields = ((words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.int16)
    if dim == 1:
        return fields.reshape(rows, cols * fields.shape[-1])
    return fields.permute(0, 2, 1).reshape(rows * fields.shape[-1], cols)


def _expect(name: str, part: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ModelLoadError(f"tensor {name}.{part} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _integers(scheme: Scheme, name: str, t: dict, n: int, k: int, g: int):
    """(q [N, K], z [N, G] or None) as unsigned integers with w = (q - z) * s, from a module's tensors."""
    b, per, groups = scheme.bits, 32 // scheme.bits, k // g
    if scheme.method == "awq":
        _expect(name, "qweight", t["qweight"], (k, n // per))
        _expect(name, "qzeros", t["qzeros"], (groups, n // per))
        reorder = lambda x: x.view(x.shape[0], -1, 8)[..., list(_AWQ_COLUMNS)].reshape(x.shape[0], -1)  # noqa: E731
        return reorder(unpack_words(t["qweight"], 4, 1)).t(), reorder(unpack_words(t["qzeros"], 4, 1)).t()
    if scheme.method == "gptq":
        _expect(name, "qweight", t["qweight"], (k // per, n))
        _expect(name, "qzeros", t["qzeros"], (groups, n // per))
        z = unpack_words(t["qzeros"], b, 1).t()
        return unpack_words(t["qweight"], b, 0).t(), z + 1 if scheme.zeros == "minus_one" else z
    _expect(name, "weight_packed", t["weight_packed"], (n, k // per))
    if "weight_shape" in t and [int(v) for v in t["weight_shape"]] != [n, k]:
        raise ModelLoadError(f"tensor {name}.weight_shape is {t['weight_shape'].tolist()}, expected {[n, k]}")
    offset = 1 << (b - 1)  # compressed-tensors stores signed values plus this offset
    if scheme.zeros == "none":
        return unpack_words(t["weight_packed"], b, 1), None
    zp = t.get("weight_zero_point")
    if zp is None:
        raise ModelLoadError(f"missing tensor {name}.weight_zero_point (an asymmetric scheme)")
    # packed along N (int32) by compressed-tensors >= 0.10; earlier ones wrote the signed values as they are
    z = unpack_words(zp, b, 0) if zp.dtype == torch.int32 else zp.to(torch.int16) + offset
    _expect(name, "weight_zero_point", z, (n, groups))
    return unpack_words(t["weight_packed"], b, 1), z


def input_order(scheme: Scheme, name: str, g_idx: Tensor, k: int, g: int) -> Tensor | None:
    """None when `g_idx` keeps groups as runs of inputs, else the permutation that makes them so
    (act-order: GPTQ's desc_act, compressed-tensors' actorder "group"); every group holds g inputs."""
    g_idx = g_idx.long()
    if torch.equal(g_idx, torch.arange(k) // g):
        return None
    if g_idx.shape != (k,) or not torch.equal(torch.bincount(g_idx, minlength=k // g), torch.full((k // g,), g)):
        raise _refuse(scheme.method, "g_idx", name, f"groups of other than {g} inputs")
    return torch.argsort(g_idx, stable=True)


def decode(scheme: Scheme, name: str, t: dict, n: int, k: int, perm: Tensor | None = None) -> QuantizedWeight:
    """One module's stored tensors (their names without the module prefix) as a QuantizedWeight in the
    stored groups, `w = (q - z) * s` rewritten exactly (see the table above); `perm` (act-order, from
    `input_order`) sorts the inputs by group."""
    g = scheme.group_size or k
    if k % g:
        raise ModelLoadError(f"{name}: group size {g} does not divide the input width {k}")
    q, z = _integers(scheme, name, t, n, k, g)
    g_idx = t.get("g_idx", t.get("weight_g_idx"))
    order = torch.arange(k) if perm is None else perm
    if g_idx is not None and not torch.equal(g_idx.long()[order], torch.arange(k) // g):
        raise ModelLoadError(f"{name}: g_idx does not match the input order read at open")
    if perm is not None:  # column j now holds input perm[j]: groups are runs again, scales unchanged
        q = q[:, perm]
    s = t["scales"].t() if "scales" in t else t["weight_scale"]
    _expect(name, "scales" if "scales" in t else "weight_scale", s, (n, k // g))
    s = s.float().contiguous()
    mid = 1 << (scheme.bits - 1)  # 8 for int4 (tinygemm's q - 8), 128 for int8
    zero = None if z is None else (mid - z.float()) * s  # exact: a small integer times a 16-bit float
    if scheme.bits == 4:
        return QuantizedWeight("int4", q.to(torch.uint8).contiguous(), s,
                               torch.zeros_like(s) if zero is None else zero.contiguous(), g, scheme.source, perm)
    return QuantizedWeight("int8", (q - mid).to(torch.int8).contiguous(), s,
                           None if zero is None else zero.contiguous(), g, scheme.source, perm)


def to_format(weight: QuantizedWeight, fmt: WeightFormat) -> QuantizedWeight:
    """A decoded weight in the format its module runs (regrouped or widened, both exact)."""
    if fmt.kind == "int4":
        return fmt.conform(weight.regroup(fmt.group_size))
    return fmt.conform(weight)


# ------------------------------------------------------------------------------------------ reading


def _shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    from ..weights import head_slot, weight_map

    slots = [*weight_map(config).values(), head_slot(config)]
    return {s.name: (s.hi - s.lo, s.cols) for s in slots if s.quantizable}


def _modules(files: list[Path], scheme: Scheme) -> tuple[dict, set[str]]:
    """{module prefix: {part: (file, key)}} of the quantized modules, and every key they use."""
    from safetensors import safe_open

    modules: dict[str, dict[str, tuple[Path, str]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                prefix, _, part = key.rpartition(".")
                if part in PARTS[scheme.method]:
                    modules.setdefault(prefix, {})[part] = (path, key)
    main = PARTS[scheme.method][0]
    for prefix, parts in modules.items():
        if main not in parts:
            raise ModelLoadError(f"{files[0].parent}: {prefix} has {', '.join(sorted(parts))} but no {main}")
    return modules, {key for parts in modules.values() for _, key in parts.values()}


def _perms(scheme: Scheme, modules: dict, names: dict, shapes: dict, config: ModelConfig) -> dict:
    """canonical name -> its act-order permutation or None, from the g_idx tensors (small: read at open).
    The parts of a fused matrix share its input, so they must share one permutation."""
    from ..weights import weight_map
    from .safetensors_io import read_tensor

    perms, fused = {}, {}
    for prefix, name in names.items():
        k = shapes[name][1]
        key = modules[prefix].get("g_idx", modules[prefix].get("weight_g_idx"))
        perms[name] = None if key is None else input_order(scheme, prefix, read_tensor(*key), k, scheme.group_size or k)
        slot = weight_map(config).get(name)
        fused.setdefault(slot.module if slot else name, []).append(name)
    for module, parts in fused.items():
        if all(perms[n] is None for n in parts):
            continue
        k = shapes[parts[0]][1]
        orders = [torch.arange(k) if perms[n] is None else perms[n] for n in parts]
        if not all(torch.equal(o, orders[0]) for o in orders):
            raise _refuse(scheme.method, "g_idx", module, "the parts of a fused matrix order their inputs differently")
        perms.update({n: orders[0] for n in parts})
    return perms


def open_checkpoint(path: Path, config: ModelConfig, qc: dict, files: list[Path]) -> Checkpoint:
    """An HF folder of `scheme_of(qc)`: quantized modules yield QuantizedWeight when kept (else their
    dequantized values), every other tensor is read as `hf` reads it."""
    from . import hf
    from .safetensors_io import read_tensor, safetensors_reader

    try:
        scheme = scheme_of(qc)
    except UnsupportedQuantization as e:
        raise UnsupportedQuantization(f"{path}: {e}") from None
    if files[0].suffix != ".safetensors":
        raise _refuse(scheme.method, "weights", files[0].name, "safetensors files are")
    modules, used = _modules(files, scheme)
    shapes = _shapes(config)
    names = {}
    for prefix in modules:
        name = hf.to_canonical(prefix + ".weight")
        if name not in shapes:
            raise ModelLoadError(f"{path}: unexpected quantized module {prefix!r} for this config")
        names[prefix] = name
    formats = {name: scheme.weight_format(shapes[name][1]) for name in names.values()}
    dense, count = safetensors_reader(files, hf.to_canonical, skip=used)

    def load(prefix):
        return {part: read_tensor(file, key) for part, (file, key) in modules[prefix].items()}

    perms = _perms(scheme, modules, names, shapes, config)
    formats = {name: replace(fmt, act_order=True) if perms[name] is not None else fmt for name, fmt in formats.items()}

    def tensors(slice_of, keep):
        yield from dense(slice_of, keep)
        for prefix, name in names.items():
            try:
                weight = to_format(decode(scheme, prefix, load(prefix), *shapes[name], perms[name]), formats[name])
            except ModelLoadError as e:
                raise type(e)(f"{path}: {e}") from None
            yield name, cut(weight if name in keep else weight.dequantize(), slice_of(name))

    return Checkpoint(path, config, n_tensors=count + len(names), formats=formats, reader=tensors,
                      quantization=scheme.describe())
