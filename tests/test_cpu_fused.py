"""cpu_fused: RoPE bit for bit torch's ops, RMSNorm against a float64 reference, each row alone; and the
model's calls taking this path only where it applies (float32 on a CPU, outside torch.compile)."""

import pytest
import torch

from mistral7b import cpu_fused, model
from mistral7b.native import cpu_variant

VARIANTS = {"vnni": ["portable", "avx2", "vnni"], "avx2": ["portable", "avx2"], "portable": ["portable"]}[cpu_variant()]


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    lib = cpu_fused.open_variant(request.param)
    monkeypatch.setattr(cpu_fused, "library", lambda: lib)
    return request.param


def torch_rope(x, cos, sin):
    return model.apply_rope.__wrapped__(x, cos, sin)


def torch_norm(x, weight, eps):
    return model.rms_norm.__wrapped__(x, weight, eps)


@pytest.mark.parametrize("batch,tokens", [(1, 1), (3, 5), (2, 17)])
def test_rope_is_torchs_bit_for_bit(variant, batch, tokens):
    heads, kv_heads, dim = 6, 2, 64
    qkv = torch.randn(batch, tokens, heads + 2 * kv_heads, dim).transpose(1, 2)  # the model's strided view
    x = qkv[:, : heads + kv_heads]
    positions = torch.randint(0, 40_000, (batch, tokens))
    cos, sin = model.rope_cos_sin(positions, dim, 1e6)
    got = cpu_fused.apply_rope(x, cos, sin)
    assert got is not None and got.is_contiguous()
    assert torch.equal(got, torch_rope(x, cos, sin))
    assert torch.equal(model.apply_rope(x, cos, sin), got)


def test_rms_norm_against_float64_and_row_by_row(variant):
    x = torch.randn(4, 7, 576) * torch.rand(4, 7, 1) * 10
    weight, eps = torch.randn(576), 1e-5
    got = cpu_fused.rms_norm(x, weight, eps)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 5e-7
    assert ((got - torch_norm(x, weight, eps)).abs().max() / want.abs().max()).item() < 5e-7
    for b in range(4):  # prefill, decode and a verify normalise a token alike
        for t in range(7):
            assert torch.equal(cpu_fused.rms_norm(x[b, t : t + 1].contiguous(), weight, eps)[0], got[b, t])
    odd = torch.randn(3, 67)  # not a multiple of the 4 partial sums
    odd_want = torch_norm(odd, torch.ones(67), eps)
    assert (cpu_fused.rms_norm(odd, torch.ones(67), eps) - odd_want).abs().max() < 1e-6


def test_other_calls_take_torchs_ops(variant):
    x = torch.randn(2, 3, 64)
    assert cpu_fused.rms_norm(x.bfloat16(), torch.ones(64), 1e-5) is None
    strided = x.transpose(0, 1)  # the head's last-token rows of a batch: the same sums as contiguous rows
    assert torch.equal(cpu_fused.rms_norm(strided, torch.ones(64), 1e-5), cpu_fused.rms_norm(x, torch.ones(64), 1e-5).transpose(0, 1))
    assert cpu_fused.rms_norm(x, torch.ones(32), 1e-5) is None  # a weight of another width
    got = model.rms_norm(x.bfloat16(), torch.ones(64).bfloat16(), 1e-5)
    assert torch.equal(got, torch_norm(x.bfloat16(), torch.ones(64).bfloat16(), 1e-5))
    q = torch.randn(1, 4, 2, 64)
    cos, sin = model.rope_cos_sin(torch.tensor([[3, 4]]), 64, 1e4)
    assert cpu_fused.apply_rope(q, cos[:, :, :1], sin[:, :, :1]) is None  # tables of another length
    assert cpu_fused.apply_rope(q.double(), cos, sin) is None


def test_compiled_steps_trace_torchs_ops(variant):
    """Under torch.compile the ctypes call is never traced: the graph holds the ops themselves."""
    traced = []

    def backend(gm, inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    x, weight = torch.randn(2, 64), torch.randn(64)
    got = torch.compile(lambda x: model.rms_norm(x, weight, 1e-5), backend=backend, fullgraph=True)(x)
    assert any("rsqrt" in t for t in traced), traced
    assert torch.equal(got, torch_norm(x, weight, 1e-5))
