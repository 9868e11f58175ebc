"""gemlite's int4 layout (quant/gemlite_mm.py), checked on the CPU against the layout as gemlite documents it
(`bitpack.pack_weights_over_cols_torch`: word [n, c] ORs input 8c + i shifted by 4i, then transposed) and
against our dequantization; its kernels run only on a GPU (benchmarks/gpu_smoke.py, method int4-gemlite)."""

import sys
import types

import pytest
import torch

from mistral7b.quant import gemlite_mm, kernels
from mistral7b.quant.qtensor import quantize_int4


def reference_words(q: torch.Tensor) -> torch.Tensor:
    """gemlite's packing, one input column at a time as its torch packer does, in int64 then wrapped."""
    n, k = q.shape
    words = torch.zeros(n, k // 8, dtype=torch.int64)
    for j in range(k):
        words[:, j // 8] |= q[:, j].to(torch.int64) << (4 * (j % 8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).t()


@pytest.mark.parametrize("n,k", [(8, 32), (40, 256), (24, 384)])
def test_pack_is_gemlite_layout_and_unpack_inverts_it(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = gemlite_mm.pack(q)
    assert packed.shape == gemlite_mm.packed_shape(n, k)[0] and packed.is_contiguous()
    assert torch.equal(packed, reference_words(q))
    assert torch.equal(gemlite_mm.unpack(packed, n), q)
    assert torch.equal(gemlite_mm.unpack(packed, n - 3), q[: n - 3])


@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_matches_our_int4_weight(group):
    """q s + (z - 8 s) with bf16 s and offsets: our (q - 8) s + z to the bf16 rounding of the offset and of
    the weight."""
    n, k = 48, 512
    weight = quantize_int4(torch.randn(n, k), group)
    sz = gemlite_mm.pack_scales_zeros(weight.scale, weight.zero, torch.device("cpu"))
    assert sz.shape == gemlite_mm.scales_shape(n, k, group) and sz.dtype == torch.bfloat16
    got = gemlite_mm.dequantize(gemlite_mm.pack(weight.q), sz, group, n).float()
    s = weight.scale.to(torch.bfloat16).float().repeat_interleave(group, 1)
    z = weight.zero.float().repeat_interleave(group, 1)
    want = (weight.q.float() - 8) * s + z
    offset = (z - 8 * s).abs()  # each bf16 rounding is at most 2^-8 of its value: the offset's and the weight's
    assert ((got - want).abs() <= (offset + got.abs()) * 2**-8 + 1e-6).all()
    scale, zero = gemlite_mm.unpack_scales_zeros(sz, n)
    assert torch.equal(scale, weight.scale.to(torch.bfloat16).float())
    assert ((zero - z[:, ::group]).abs() <= offset[:, ::group] * 2**-8 + 1e-6).all()


def test_layout_is_chosen_by_the_setting_and_needs_gemlite(monkeypatch):
    cuda = torch.device("cuda")  # the choice reads the device type only: no GPU needed
    monkeypatch.setattr(gemlite_mm, "available", lambda: True)
    native_atomics = []  # a stand-in for gemlite: the choice asks it for float32 split-K sums
    fake = types.SimpleNamespace(set_native_atomic_bfp16=native_atomics.append)
    monkeypatch.setitem(sys.modules, "gemlite", fake)
    assert kernels.int4_layout(4096, 128, cuda, "gemlite") == "gemlite"
    assert native_atomics == [False]
    assert kernels.int4_layout(4096, 8, cuda, "gemlite") == "tiles"  # groups below gemlite's 16
    assert kernels.pick_rows_kernel("int8", "gemlite") == kernels.MEASURED_ROWS_KERNEL["int8"]
    assert kernels.int4_layout(4096, 128, torch.device("cpu"), "gemlite") == "cpu"
    monkeypatch.setattr(gemlite_mm, "available", lambda: False)
    with pytest.raises(ValueError, match="needs the gemlite package"):
        kernels.int4_layout(4096, 128, cuda, "gemlite")


def test_scales_zeros_shapes_per_layout():
    cuda = torch.device("cuda")
    assert kernels.scales_zeros_shape(100, 256, 32, cuda, "tiles") == (8, 104, 2)
    assert kernels.scales_zeros_shape(100, 256, 32, cuda, "gemlite") == (2, 8, 104)
    assert kernels.packed_shape(100, 256, cuda, "gemlite") == ((32, 104), torch.int32)



@pytest.mark.parametrize("layout, shape", [("tiles", (4, 16, 2)), ("gemlite", (2, 4, 16))])
def test_scales_zeros_pack_pads_rows_and_unpacks_per_layout(layout, shape):
    """kernels.pack_scales_zeros pads the rows to the device's block (16 on a CPU) with zeros in either form,
    and kernels.unpack_scales_zeros reads each form back (gemlite's offsets to their bf16 rounding)."""
    scale, zero = torch.rand(13, 4) + 0.1, torch.randn(13, 4)
    sz = kernels.pack_scales_zeros(scale, zero, torch.device("cpu"), layout)
    assert sz.shape == shape and sz.dtype == torch.bfloat16
    rows = sz[:, 13:] if layout == "tiles" else sz[:, :, 13:]
    assert not rows.any()
    got_scale, got_zero = kernels.unpack_scales_zeros(sz, 13, layout)
    assert torch.equal(got_scale, scale.to(torch.bfloat16).float())
    bound = (zero.abs() + 8 * scale) * 2**-8 if layout == "gemlite" else zero.abs() * 2**-8
    assert ((got_zero - zero).abs() <= bound + 1e-6).all()
