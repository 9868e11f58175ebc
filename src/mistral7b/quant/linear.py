"""Quantized replacements for nn.Linear and nn.Embedding, filled row range by row range while loading.

A module is built empty with its final buffer shapes (so the model can be built on the meta device
and allocated once), then `fill(lo, hi, weight)` copies quantized rows into a staging copy on the
target device. When every row is in, the staging copy is packed into the kernel's layout and freed:
tinygemm's packing mixes rows, so a fused matrix (wqkv, w13) can only be packed whole. All state is
buffers, never parameters, so `next(model.parameters())` stays a norm weight in the activation dtype.
An act-order weight (inputs permuted so that groups are runs of columns) also keeps its permutation,
`in_perm`, and permutes x before the kernel; the parts of a fused matrix share one.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from . import cpu_kernels, kernels
from .config import cuda_rows_kernel
from .qtensor import QuantizedWeight, WeightFormat, pack_pairs, unpack_pairs, unpermute


class QuantModule(nn.Module):
    """Shared staging logic: rows arrive in any order, each exactly once."""

    def __init__(self, out_features: int, in_features: int, fmt: WeightFormat, device: torch.device,
                 rows_kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features, self.fmt = out_features, in_features, fmt
        self.target = torch.device(device)
        self.group_size = fmt.group_size or in_features
        self._staging: QuantizedWeight | None = None
        self._rows_in = 0
        self.rows_kernel = rows_kernel  # few-row CUDA matmuls: kernels.pick_rows_kernel (see use_rows_kernel)
        perm = torch.empty(in_features, dtype=torch.long, device="meta") if fmt.act_order else None
        self.register_buffer("in_perm", perm)

    def fill(self, lo: int, hi: int, weight: QuantizedWeight) -> None:
        weight = self.fmt.conform(weight)
        if weight.nibbles and not (self.packs_rows and weight.perm is None):
            weight = weight.unpacked()  # only the CPU's layout takes GGUF's packed bytes as they are
        if (weight.perm is not None) != self.fmt.act_order:
            raise ValueError(f"an {'un' * (weight.perm is None)}permuted weight for a {self.fmt.label()} matrix")
        if (lo, hi) == (0, self.out_features) and self._staging is None:  # whole: no staging copy
            self._rows_in = hi
            with torch.no_grad():
                self.pack(weight)
                if weight.perm is not None:
                    self.in_perm.copy_(weight.perm)
            return
        if self.packs_rows and weight.perm is None:  # a fused matrix's part straight into its rows
            self._rows_in += hi - lo
            with torch.no_grad():
                self.pack_rows(lo, hi, weight)
            return
        if self._staging is None:
            n, k, g = self.out_features, self.in_features, self.in_features // self.group_size
            on = dict(device=self.target)
            self._staging = QuantizedWeight(
                weight.kind, torch.empty(n, k, dtype=weight.q.dtype, **on), torch.empty(n, g, **on),
                torch.empty(n, g, **on) if weight.zero is not None else None, self.group_size, weight.source,
                weight.perm)
        s = self._staging
        if s.perm is not None and not torch.equal(s.perm, weight.perm):
            raise ValueError("the parts of a fused act-order matrix permute their inputs differently")
        s.q[lo:hi] = weight.q
        s.scale[lo:hi] = weight.scale
        if s.zero is not None:
            s.zero[lo:hi] = weight.zero
        self._rows_in += hi - lo
        if self._rows_in == self.out_features:
            self._staging = None
            with torch.no_grad():
                self.pack(s)
                if s.perm is not None:
                    self.in_perm.copy_(s.perm)

    @property
    def complete(self) -> bool:
        return self._rows_in == self.out_features

    # Whether `pack_rows` can write any rows alone (cpu_kernels' layout: a row of blocks per output), so
    # that a fused matrix's parts need no staging copy: 9 of a 7B Q4_0 GGUF's 30 s of loading were staging.
    packs_rows = False

    def pack(self, weight: QuantizedWeight) -> None:
        raise NotImplementedError

    def pack_rows(self, lo: int, hi: int, weight: QuantizedWeight) -> None:
        raise NotImplementedError

    def unpack_packed(self) -> QuantizedWeight:
        raise NotImplementedError

    def unpack(self) -> QuantizedWeight:
        """The weight in the device-independent form (on the CPU), exactly as packed."""
        weight = self.unpack_packed()
        if self.in_perm is not None:
            weight.perm = self.in_perm.cpu()
        return weight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight [N, K] this module multiplies by (inputs in their order), on its device."""
        return self.unpack().dequantize(dtype).to(self.target)

    def permute_input(self, x: Tensor) -> Tensor:
        return x if self.in_perm is None else x.index_select(-1, self.in_perm)

    def set_rows_kernel(self, setting: str) -> None:
        self.rows_kernel = setting

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.label()}"


def integer_kernel(in_features: int, group_size: int, device: torch.device) -> bool:
    """Whether a CPU matrix runs on cpu_kernels (int8 activations) rather than torch's kernels."""
    return device.type == "cpu" and cpu_kernels.supports(in_features, group_size)


def register_blocks(module: nn.Module, n: int, k: int, q_shape, q_dtype, has_min: bool) -> None:
    """The buffers of cpu_kernels' layout: stored q, and per block of 32 `d` and `m` (w = d * q + m)."""
    module.register_buffer("qweight", torch.empty(q_shape, dtype=q_dtype, device="meta"))
    blocks = dict(size=(n, k // cpu_kernels.BLOCK), dtype=torch.float16, device="meta")
    module.register_buffer("block_scale", torch.empty(**blocks))
    module.register_buffer("block_min", torch.empty(**blocks) if has_min else None)


def regrouped(weight: QuantizedWeight, group_size: int) -> QuantizedWeight:
    """A weight read back in blocks of 32, in its own groups again (each group's blocks share one scale)."""
    step = group_size // weight.group_size
    keep = (lambda t: None if t is None else t[:, ::step].contiguous())
    return QuantizedWeight(weight.kind, weight.q, keep(weight.scale), keep(weight.zero), group_size, weight.source)


class Int4Linear(QuantModule):
    """int4 groups, `w = (q - 8) * scale + zero`, run by cpu_kernels on a CPU (int8 activations), else by
    torch's tinygemm, triton_mm's kernel or gemlite's, each on its own layout (`kernels.int4_layout`, from
    rows_kernel)."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, device, name: str = "weight",
                 rows_kernel: str = "auto"):
        super().__init__(out_features, in_features, fmt, device, rows_kernel)
        self.integer = integer_kernel(in_features, self.group_size, self.target)
        if self.integer:
            register_blocks(self, out_features, in_features, (out_features, in_features // 2), torch.uint8, True)
            return
        kernels.check_int4_shape(out_features, in_features, self.group_size, self.target)
        self.layout = kernels.int4_layout(in_features, self.group_size, self.target, rows_kernel)
        self.register_buffer("packed", None)
        self.register_buffer("scales_zeros", None)
        self._allocate("meta")

    def _allocate(self, device) -> None:
        """Empty buffers of this layout's shapes on `device`."""
        n, k = self.out_features, self.in_features
        shape, dtype = kernels.packed_shape(n, k, self.target, self.layout)
        self.packed = torch.empty(shape, dtype=dtype, device=device)
        sz_shape = kernels.scales_zeros_shape(n, k, self.group_size, self.target, self.layout)
        self.scales_zeros = torch.empty(sz_shape, dtype=torch.bfloat16, device=device)

    @property
    def packs_rows(self) -> bool:
        return self.integer

    def set_rows_kernel(self, setting: str) -> None:
        """Also moves a loaded weight to the layout of the new kernel (exact, but for gemlite's offsets
        z - 8 s rounded to bf16)."""
        self.rows_kernel = setting
        if self.integer:
            return
        layout = kernels.int4_layout(self.in_features, self.group_size, self.target, setting)
        if layout == self.layout:
            return
        weight = None if self.packed.is_meta else self.unpack_packed()
        self.layout = layout
        self._allocate("meta" if weight is None else self.target)
        if weight is not None:
            with torch.no_grad():
                self.pack(weight)

    def pack_rows(self, lo: int, hi: int, weight: QuantizedWeight) -> None:
        if weight.nibbles:  # GGUF's Q4 bytes are this layout already: a copy, no unpack and repack
            self.qweight[lo:hi].view(weight.q.shape).copy_(weight.q)
        else:
            cpu_kernels.pack_nibbles(weight.q, out=self.qweight[lo:hi])
        d, m = cpu_kernels.block_params(weight.scale, weight.zero, self.group_size, offset=8)
        self.block_scale[lo:hi] = d
        self.block_min[lo:hi] = m

    def pack(self, weight: QuantizedWeight) -> None:
        if self.integer:
            self.pack_rows(0, self.out_features, weight)
            return
        zero = weight.zero if weight.zero is not None else torch.zeros_like(weight.scale)
        self.packed.copy_(kernels.pack_int4(weight.q, self.target, self.layout))
        self.scales_zeros.copy_(kernels.pack_scales_zeros(weight.scale, zero, self.target, self.layout))

    def unpack_packed(self) -> QuantizedWeight:
        if self.integer:
            q, scale, mn = cpu_kernels.unpack_nibbles(self.qweight), self.block_scale.float(), self.block_min.float()
            return regrouped(QuantizedWeight("int4", q, scale.clone(), mn + 8 * scale, cpu_kernels.BLOCK,
                                             self.fmt.source), self.group_size)
        q = kernels.unpack_int4(self.packed, self.out_features, self.in_features).cpu()
        scale, zero = kernels.unpack_scales_zeros(self.scales_zeros, self.out_features, self.layout)
        return QuantizedWeight("int4", q, scale, zero, self.group_size, self.fmt.source)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.target.type != "cuda":
            return super().dequantize(dtype)
        w = kernels.dense_int4(self.packed, self.scales_zeros, self.group_size, self.out_features, self.in_features)
        return unpermute(w, self.in_perm).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.permute_input(x)
        if self.integer:
            return cpu_kernels.linear(x, self.qweight, 4, self.block_scale, self.block_min, self.out_features)
        return kernels.int4_mm(x, self.packed, self.group_size, self.scales_zeros, self.out_features,
                               self.rows_kernel == kernels.INVARIANT)


def int8_kernel(fmt: WeightFormat, in_features: int, device: torch.device) -> str:
    """"integer" (cpu_kernels), "int8pack" (per channel, no zeros), "planes" (CPU groups the int4 kernel
    takes) or "dequant"."""
    group = fmt.group_size or in_features
    if integer_kernel(in_features, group, device):
        return "integer"
    if not fmt.has_zero and fmt.group_size is None:
        return "int8pack"
    if device.type == "cpu" and group in kernels.KERNEL_GROUP_SIZES:
        return "planes"
    return "dequant"


class Int8Linear(QuantModule):
    """int8 per channel or in groups, `w = q * scale (+ zero)`."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, device, name: str = "weight",
                 rows_kernel: str = "auto"):
        super().__init__(out_features, in_features, fmt, device, rows_kernel)
        self.kernel = int8_kernel(fmt, in_features, self.target)
        n, k, g = out_features, in_features, in_features // self.group_size
        meta = dict(device="meta")
        if self.kernel == "integer":
            register_blocks(self, n, k, (n, k), torch.int8, fmt.has_zero)
            return
        if self.kernel == "planes":
            shape, dtype = kernels.packed_shape(n, k, self.target)
            for plane in ("hi", "lo"):
                self.register_buffer(f"packed_{plane}", torch.empty(shape, dtype=dtype, **meta))
                rows = kernels.padded_rows(n, self.target)
                self.register_buffer(f"scales_zeros_{plane}", torch.empty(g, rows, 2, dtype=torch.bfloat16, **meta))
            return
        self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, **meta))
        scale_dtype = torch.bfloat16 if self.kernel == "int8pack" else torch.float32
        self.register_buffer("scales", torch.empty(n, g, dtype=scale_dtype, **meta))
        self.register_buffer("zeros", torch.empty(n, g, **meta) if fmt.has_zero else None)

    @property
    def packs_rows(self) -> bool:
        return self.kernel == "integer"

    def pack_rows(self, lo: int, hi: int, weight: QuantizedWeight) -> None:
        self.qweight[lo:hi] = weight.q
        d, m = cpu_kernels.block_params(weight.scale, weight.zero, weight.group_size, offset=0)
        self.block_scale[lo:hi] = d
        if self.block_min is not None:
            self.block_min[lo:hi] = m

    def pack(self, weight: QuantizedWeight) -> None:
        if self.kernel == "integer":
            self.pack_rows(0, self.out_features, weight)
            return
        if self.kernel == "planes":
            hi, lo = kernels.split_int8_planes(weight.q)
            (hs, hz), (ls, lz) = kernels.plane_qparams(weight.scale, weight.zero)
            self.packed_hi.copy_(kernels.pack_int4(hi, self.target))
            self.packed_lo.copy_(kernels.pack_int4(lo, self.target))
            self.scales_zeros_hi.copy_(kernels.pack_scales_zeros(hs, hz, self.target))
            self.scales_zeros_lo.copy_(kernels.pack_scales_zeros(ls, lz, self.target))
            return
        self.qweight.copy_(weight.q)
        self.scales.copy_(weight.scale)
        if self.zeros is not None:
            self.zeros.copy_(weight.zero)

    def unpack_packed(self) -> QuantizedWeight:
        if self.kernel == "integer":
            zero = None if self.block_min is None else self.block_min.float()
            return regrouped(QuantizedWeight("int8", self.qweight.clone(), self.block_scale.float(), zero,
                                             cpu_kernels.BLOCK, self.fmt.source), self.group_size)
        if self.kernel == "planes":
            n, k = self.out_features, self.in_features
            hi = kernels.unpack_int4(self.packed_hi, n, k).to(torch.int16) - 8
            lo = kernels.unpack_int4(self.packed_lo, n, k).to(torch.int16)
            sz = self.scales_zeros_lo[:, :n].float().cpu()
            scale, lo_zero = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()
            zero = (lo_zero - 8 * scale) if self.fmt.has_zero else None
            return QuantizedWeight("int8", (16 * hi + lo).to(torch.int8).cpu(), scale, zero, self.group_size,
                                   self.fmt.source)
        zero = None if self.zeros is None else self.zeros.float().cpu()
        return QuantizedWeight("int8", self.qweight.cpu(), self.scales.float().cpu(), zero, self.group_size,
                               self.fmt.source)

    def forward(self, x: Tensor) -> Tensor:
        x = self.permute_input(x)
        if self.kernel == "integer":
            q = self.qweight.view(torch.uint8)
            return cpu_kernels.linear(x, q, 8, self.block_scale, self.block_min, self.out_features)
        if self.kernel == "planes":
            n, g = self.out_features, self.group_size
            return (kernels.int4_mm(x, self.packed_hi, g, self.scales_zeros_hi, n)
                    + kernels.int4_mm(x, self.packed_lo, g, self.scales_zeros_lo, n))
        if self.kernel == "int8pack":
            return kernels.int8_mm(x, self.qweight, self.scales.view(-1), self.rows_kernel)
        return kernels.dequant_mm(x, self.qweight, self.scales, self.zeros, self.group_size,
                                  self.rows_kernel == kernels.INVARIANT)


def use_rows_kernel(model: nn.Module, setting: str) -> None:
    """Run few CUDA rows of every quantized module of `model` through `setting` ("auto", "torch", "triton")."""
    setting = cuda_rows_kernel(setting)
    for module in model.modules():
        if isinstance(module, QuantModule):
            module.set_rows_kernel(setting)


def runnable_format(fmt: WeightFormat, in_features: int, device: torch.device) -> WeightFormat:
    """`fmt`, but on a CPU whose integer kernel runs the matrix, int8 groups under its blocks of 32 (GGUF's
    Q6_K: 16) widened to 32: requantized as they arrive (`WeightFormat.conform`), where torch's kernels
    dequantized the whole matrix every call (311 ms for one 7B ffn_down at one row, 6.6 on the blocks)."""
    small = fmt.kind == "int8" and (fmt.group_size or in_features) < cpu_kernels.BLOCK and not fmt.act_order
    if small and integer_kernel(in_features, cpu_kernels.BLOCK, torch.device(device)):
        return replace(fmt, group_size=cpu_kernels.BLOCK)
    return fmt


def quant_linear(in_features: int, out_features: int, fmt: WeightFormat, device, name: str = "weight",
                 rows_kernel: str = "auto") -> QuantModule:
    fmt = runnable_format(fmt, in_features, device)
    cls = Int4Linear if fmt.kind == "int4" else Int8Linear
    return cls(in_features, out_features, fmt, device, name, rows_kernel)


class QuantEmbedding(QuantModule):
    """An embedding table kept in its quantized form (a GGUF Q8_0 or Q4_K table): rows are
    dequantized on lookup, exactly (float32 scales), then cast to the activation dtype."""

    def __init__(self, num_embeddings: int, dim: int, fmt: WeightFormat, device, dtype: torch.dtype):
        super().__init__(num_embeddings, dim, fmt, device)
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, dim, dtype
        g = dim // self.group_size
        q_shape = (num_embeddings, dim // 2) if fmt.kind == "int4" else (num_embeddings, dim)
        q_dtype = torch.uint8 if fmt.kind == "int4" else torch.int8
        self.register_buffer("qweight", torch.empty(q_shape, dtype=q_dtype, device="meta"))
        self.register_buffer("scales", torch.empty(num_embeddings, g, device="meta"))
        has_zero = fmt.has_zero or fmt.kind == "int4"
        self.register_buffer("zeros", torch.empty(num_embeddings, g, device="meta") if has_zero else None)

    def pack(self, weight: QuantizedWeight) -> None:
        self.qweight.copy_(pack_pairs(weight.q) if weight.kind == "int4" else weight.q)
        self.scales.copy_(weight.scale)
        if self.zeros is not None:
            self.zeros.copy_(weight.zero if weight.zero is not None else torch.zeros_like(weight.scale))

    def unpack_packed(self) -> QuantizedWeight:
        q = self.qweight.cpu()
        if self.fmt.kind == "int4":
            q = unpack_pairs(q)
        zero = None if self.zeros is None else self.zeros.cpu()
        return QuantizedWeight(self.fmt.kind, q, self.scales.cpu(), zero, self.group_size, self.fmt.source)

    def forward(self, tokens: Tensor) -> Tensor:
        q = self.qweight[tokens]
        if self.fmt.kind == "int4":
            q = unpack_pairs(q).float() - 8
        w = q.float().unflatten(-1, (-1, self.group_size)) * self.scales[tokens][..., None]
        if self.zeros is not None:
            w = w + self.zeros[tokens][..., None]
        return w.flatten(-2).to(self.dtype)
