"""Quantized linears against the same matmul on their dequantized weights, the packing round trips,
QuantConfig validation, and load_model(quantize=...) on tiny random checkpoints."""

import tempfile

import pytest
import torch
import torch.nn.functional as F

from mistral7b import ModelLoadError, load_model
from mistral7b.quant import QuantConfig, describe_weights, kernels, resolve
from mistral7b.quant.linear import Int4Linear, Int8Linear, QuantEmbedding, quant_linear
from mistral7b.quant.qtensor import QuantizedWeight, WeightFormat, quantize_int4, quantize_int8
from checkpoints import hf_logits, hf_model, ours_from_hf, rel_err

CPU = torch.device("cpu")


@pytest.fixture
def torch_kernels(monkeypatch):
    """Whole tiny models against their dequantized copies check loading, with torch's kernels: int8
    activations (cpu_kernels, tested on their own in test_quant_cpu_kernels.py) move these random
    models' sharp logits by several percent."""
    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "0")


def _filled(module, weight: QuantizedWeight, parts: int = 1):
    """Fill a module in `parts` row ranges, as the loader does for fused matrices."""
    module.to_empty(device=CPU)
    bounds = torch.linspace(0, weight.shape[0], parts + 1).long().tolist()
    for lo, hi in zip(bounds, bounds[1:]):
        module.fill(lo, hi, weight.map_rows(lambda t: t[lo:hi]))
    assert module.complete
    return module


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_dequantized(group, rows, dtype):
    n, k = 192, 256
    weight = quantize_int4(torch.randn(n, k), group)
    module = _filled(Int4Linear(k, n, WeightFormat("int4", group, True), CPU), weight, parts=3)
    x = torch.randn(2, rows, k).to(dtype)
    want = F.linear(x.double(), weight.dequantize(torch.float64))
    got = module(x)
    assert got.dtype == dtype and got.shape == (2, rows, n)
    # bf16 activations and bf16 scales/zeros, or int8 activations per block of 32 (cpu_kernels; checked
    # exactly against its own numpy reference in test_quant_cpu_kernels.py)
    assert rel_err(got, want) < 3e-2
    assert torch.equal(module.unpack().q, weight.q)


@pytest.mark.parametrize("rows", [1, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [WeightFormat("int8"), WeightFormat("int8", 32), WeightFormat("int8", 32, True),
                                 WeightFormat("int8", 16)])
def test_int8_linear_matches_dequantized(fmt, rows, dtype):
    n, k = 96, 128
    w = torch.randn(n, k)
    if fmt.group_size is None:
        weight = quantize_int8(w)
    else:  # random grouped int8, with zeros when the format has them
        g = k // fmt.group_size
        weight = QuantizedWeight("int8", torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, g) / 50,
                                 torch.randn(n, g) / 10 if fmt.has_zero else None, fmt.group_size)
    module = _filled(quant_linear(k, n, fmt, CPU), weight, parts=2)  # as loading builds it
    x = torch.randn(rows, k).to(dtype)
    want = F.linear(x.double(), weight.dequantize(torch.float64))
    assert rel_err(module(x), want) < 3e-2  # as the int4 test
    back = module.unpack()
    if module.kernel == "integer" and (fmt.group_size or k) < 32:  # requantized onto the CPU kernel's blocks of 32
        assert back.group_size == module.fmt.group_size == 32
        values, want_values = back.dequantize().view(n, -1, 32), weight.dequantize().view(n, -1, 32)
        step = want_values.abs().amax(-1, keepdim=True) / 254  # half a step of each block's int8 grid
        assert ((values - want_values).abs() <= step * 1.01 + 127 * 2**-24).all()  # float16 block scales
        return
    assert torch.equal(back.q, weight.q)
    # Scales are kept in 16 bits: torch.rand can draw one below float16's normal range (1 in about 300 runs
    # failed on rtol alone), where the spacing is 2**-24.
    assert torch.allclose(back.scale, weight.scale, rtol=1e-2, atol=2**-24)


def test_quantizers_error_bounds():
    w = torch.randn(64, 256)
    for group in (32, 128):
        qw = quantize_int4(w, group)
        assert int(qw.q.max()) <= 15
        err = (qw.dequantize() - w).abs().view(64, -1, group)
        assert (err <= qw.scale[..., None] / 2 + 1e-6).all()
    q8 = quantize_int8(w)
    assert ((q8.dequantize() - w).abs() <= q8.scale / 2 + 1e-6).all()


def test_int8_planes_are_exact():
    q = torch.arange(-128, 128, dtype=torch.int8).repeat(4, 1)
    hi, lo = kernels.split_int8_planes(q)
    assert int(hi.max()) <= 15 and int(lo.max()) <= 15
    assert torch.equal((hi.to(torch.int16) - 8) * 16 + lo.to(torch.int16), q.to(torch.int16))


@pytest.mark.parametrize("n,k", [(64, 64), (96, 256), (40, 512)])
def test_int4_cpu_unpack_inverts_pack(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    assert torch.equal(kernels.unpack_int4(kernels.pack_int4(q, CPU), n, k), q)


@pytest.mark.parametrize("n", [kernels.CPU_PACK_ROWS * 2 + 48, kernels.CPU_PACK_ROWS + 16])
def test_int4_cpu_pack_in_row_chunks_is_one_whole_pack(n):
    """Loading packs large matrices a few row blocks at a time: the bytes are those of one call of the op."""
    k = 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(kernels.pack_int4(q, CPU), whole)


@pytest.mark.parametrize("n,k", [(8, 32), (16, 64), (24, 384)])
def test_cuda_tile_layout_round_trip(n, k):
    """The tensor-op image of tinygemm's tile layout inverts exactly (the GPU benchmark checks it
    against torch's own `_convert_weight_to_int4pack`)."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = kernels.pack_cuda_tiles_reference(q)
    assert packed.shape == kernels.packed_shape(n, k, torch.device("cuda"))[0]
    assert torch.equal(kernels.unpack_cuda_tiles(packed, n, k), q)


def test_compiled_dequantize_has_a_budget_per_shape(eager_dynamo):
    """Ten matrix shapes (a few models' worth in one process), each dequantized with grad on and off:
    every shape compiles once, past dynamo's recompile limit of 8 per function (one function for all of
    them, later shapes ran uncompiled), and each gives the eager dequantization's weight bit for bit."""
    counters = eager_dynamo
    kernels._compiled_dequantize.cache_clear()
    before = counters["unique_graphs"]
    try:
        for i in range(10):
            n, k, group = 8 * (i + 1), 64, 32
            q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
            packed = kernels.pack_cuda_tiles_reference(q)
            scales_zeros = torch.randn(k // group, n, 2).to(torch.bfloat16)
            want = kernels._dequantize_tiles_eager(packed, scales_zeros, group, n, k)
            for grad in (True, False):
                with torch.set_grad_enabled(grad):
                    assert torch.equal(kernels.dequantize_tiles(packed, scales_zeros, group, n, k), want)
        assert counters["unique_graphs"] - before == 10
    finally:
        kernels._compiled_dequantize.cache_clear()


@pytest.mark.parametrize("fmt", [WeightFormat("int8", 32, False, "Q8_0"), WeightFormat("int4", 32, True, "Q4_K")])
def test_quant_embedding_lookup_is_exact(fmt):
    v, d = 50, 64
    w = torch.randn(v, d)
    weight = quantize_int4(w, 32) if fmt.kind == "int4" else QuantizedWeight(
        "int8", torch.randint(-127, 128, (v, d), dtype=torch.int8), torch.rand(v, 2), None, 32)
    emb = _filled(QuantEmbedding(v, d, fmt, CPU, torch.float32), weight)
    tokens = torch.randint(0, v, (3, 7))
    assert torch.equal(emb(tokens), weight.dequantize()[tokens])


def test_quant_config_validation():
    assert resolve(None) is None
    assert resolve("int4").group_size is None and resolve("int8").group_size is None  # None: the source's grid
    assert resolve("int4").group_size_for(576) == 64 and resolve("int4").group_size_for(576, source_group=32) == 32
    assert resolve("int4", 128).group_size_for(576, source_group=32) == 64  # asked for: the ceiling
    assert resolve(False) == resolve("none") == QuantConfig("none") and QuantConfig("none").dense
    assert resolve("int4", 32, False) == QuantConfig("int4", 32, False)
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        resolve("int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        QuantConfig("int4", 48)
    with pytest.raises(ValueError, match="int4 only"):
        QuantConfig("int8", 32)


def test_argparse_helpers():
    import argparse

    from mistral7b.quant import add_quantize_arguments, quant_config_from_args

    p = argparse.ArgumentParser()
    add_quantize_arguments(p)
    assert quant_config_from_args(p.parse_args([])) is None
    assert quant_config_from_args(p.parse_args(["--quantize", "int4", "--group-size", "64", "--no-quantize-head"])) \
        == QuantConfig("int4", 64, False)
    assert quant_config_from_args(p.parse_args(["--quantize", "none"])) == QuantConfig("none")  # dequantize a GGUF
    with pytest.raises(SystemExit):
        p.parse_args(["--quantize", "int2"])


# ------------------------------------------------------------------------------------ load_model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    hf = hf_model("mistral", n_heads=4, n_kv_heads=2, window=8, dim=64, hidden=96, seed=0)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, folder


def dequantized_copy(model, hf):
    """A dense model (built without the loader) holding exactly the quantized model's weights."""
    from mistral7b.quant.linear import QuantModule

    dense = ours_from_hf(hf)
    if dense.config.tie_embeddings:  # the quantized model has its own quantized head
        dense.output.weight = torch.nn.Parameter(dense.output.weight.detach().clone())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantModule):
                dense.get_submodule(name).weight.copy_(module.unpack().dequantize())
    return dense


@pytest.mark.parametrize("quantize", ["int8", QuantConfig("int4", 32), QuantConfig("int4", 32, quantize_head=False)])
def test_load_quantized_matches_dequantized(tiny_hf, quantize, one_thread, torch_kernels):
    hf, folder = tiny_hf
    model = load_model(folder, quantize=quantize)
    quant = resolve(quantize)
    assert isinstance(model.output, torch.nn.Linear) != quant.quantize_head
    labels = describe_weights(model)
    assert quant.label in labels and labels[quant.label]["params"] > 0
    tokens = torch.randint(0, hf.config.vocab_size, (2, 20))
    with torch.no_grad():
        got = model(tokens)
        exact = dequantized_copy(model, hf)(tokens)
    assert rel_err(got, exact) < 3e-2  # bf16 activations into the kernels
    want = hf_logits(hf, tokens)
    err = ((got - want).norm() / want.norm()).item()
    print(f"{quant.label} head={quant.quantize_head}: logits norm error vs the 32-bit model {err:.4f}")
    # int4 error per matrix is ~8% rms on these Gaussian weights, and sharp random attention amplifies it
    assert 1e-4 < err < (0.05 if quant.method == "int8" else 0.5)


def test_load_tied_quantized_head(tmp_path, one_thread, torch_kernels):
    hf = hf_model("llama", n_kv_heads=2, tie=True, seed=1)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, quantize=QuantConfig("int4", 32))
    assert isinstance(model.tok_embeddings, torch.nn.Embedding)  # the lookup stays exact
    assert isinstance(model.output, Int4Linear)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert rel_err(model(tokens), dequantized_copy(model, hf)(tokens)) < 3e-2


def fake_quant_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """An independent reference: round-to-nearest asymmetric int4, each group's [min, max] onto 0..15,
    dequantized in float32."""
    n, k = w.shape
    x = w.float().reshape(n, k // group, group)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    return (torch.round((x - lo) / step).clamp(0, 15) * step + lo).reshape(n, k)


def test_group_size_is_a_ceiling_per_matrix(tiny_hf, one_thread, torch_kernels):
    """int4 g64 on a model whose w2 is 96 wide: w2 takes groups of 32, every other matrix 64."""
    hf, folder = tiny_hf
    model = load_model(folder, quantize=QuantConfig("int4", 64))
    layer = model.layers[0]
    assert layer.feed_forward.w2.group_size == 32
    assert layer.attention.wqkv.group_size == layer.feed_forward.w13.group_size == model.output.group_size == 64
    labels = describe_weights(model)
    assert labels["int4 g32"]["params"] == hf.config.num_hidden_layers * 64 * 96
    assert labels["int4 g64"]["params"] > 0
    tokens = torch.randint(0, hf.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert rel_err(model(tokens), dequantized_copy(model, hf)(tokens)) < 3e-2


def test_width_576_at_group_128_matches_fake_quantization(one_thread):
    """SmolLM2-135M's widths (dim 576 = 4.5 x 128, hidden 1536) at the default g128: the 576-wide
    matrices fall back to g64, and every linear equals an independent fake quantization of its weight."""
    hf = hf_model("llama", dim=576, n_layers=1, n_heads=9, n_kv_heads=3, head_dim=64, hidden=1536, tie=True, seed=2)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = load_model(folder, quantize="int4")
    attn, mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    weights = {"attention.wqkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
               "attention.wo": attn.o_proj.weight, "feed_forward.w2": mlp.down_proj.weight,
               "feed_forward.w13": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])}
    groups = {"attention.wqkv": 64, "attention.wo": 64, "feed_forward.w13": 64, "feed_forward.w2": 128}
    modules = {name: model.layers[0].get_submodule(name) for name in weights}
    modules["output"], weights["output"], groups["output"] = model.output, hf.lm_head.weight, 64
    assert set(describe_weights(model)) == {"int4 g64", "int4 g128", "float32"}
    for name, module in modules.items():
        assert module.group_size == groups[name], name
        want = fake_quant_int4(weights[name].detach(), groups[name])
        dense = module.dequantize()
        assert rel_err(dense, want) < 4e-3, name  # scales and zeros rounded to bf16
        x = torch.randn(3, module.in_features)
        assert rel_err(module(x), F.linear(x.double(), want.double())) < 2e-2, name


def test_no_group_size_fits_the_width(tmp_path):
    hf = hf_model("mistral", n_heads=4, n_kv_heads=2, dim=64, hidden=80, seed=0)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path, quantize=QuantConfig("int4", 64))  # w2 has 80 inputs: not a multiple of 32
    assert "feed_forward.w2" in str(e.value) and "80" in str(e.value) and "64" in str(e.value)


def test_unknown_quantize_method(tiny_hf):
    with pytest.raises(ValueError, match="unknown quantization method"):
        load_model(tiny_hf[1], quantize="fp4")


def test_rows_kernel_is_read_at_the_load_and_carried_by_each_module(tiny_hf, monkeypatch):
    """MISTRAL7B_CUDA_ROWS_KERNEL is read when a load is planned (engine and tensor-parallel processes
    inherit it) and each quantized module carries it; use_rows_kernel changes it on a loaded model."""
    from mistral7b.quant.linear import QuantModule, use_rows_kernel

    monkeypatch.setenv("MISTRAL7B_CUDA_ROWS_KERNEL", "triton")
    model = load_model(tiny_hf[1], quantize="int8")
    modules = [m for m in model.modules() if isinstance(m, QuantModule)]
    assert modules and {m.rows_kernel for m in modules} == {"triton"}
    use_rows_kernel(model, "torch")
    assert {m.rows_kernel for m in modules} == {"torch"}
    assert kernels.pick_rows_kernel("int8", "auto") == "triton" and kernels.pick_rows_kernel("int4", "auto") == "torch"
    monkeypatch.setenv("MISTRAL7B_CUDA_ROWS_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="MISTRAL7B_CUDA_ROWS_KERNEL must be one of"):
        load_model(tiny_hf[1], quantize="int8")


@pytest.mark.parametrize("fmt", [WeightFormat("int4", 32, True), WeightFormat("int8"), WeightFormat("int8", 32),
                                 WeightFormat("int8", 16, True)])
def test_quantized_linears_trace_in_one_graph(fmt):
    """No data-dependent Python in forward: dynamo traces each kernel path whole (what the engine's
    compiled, CUDA-graphed decode needs), with the same result as eager."""
    n, k = 96, 256
    g = k // (fmt.group_size or k)
    weight = quantize_int4(torch.randn(n, k), 32) if fmt.kind == "int4" else QuantizedWeight(
        "int8", torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, g) / 50,
        torch.randn(n, g) / 10 if fmt.has_zero else None, fmt.group_size or k)
    module = _filled((Int4Linear if fmt.kind == "int4" else Int8Linear)(k, n, fmt, CPU), weight)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, k)
    assert torch.equal(compiled(x), module(x))


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_cuda_forms_match_dequantized_and_avoid_the_int8pack_pattern(rows):
    """The CUDA int8 forms, run on CPU tensors: both equal x @ (q * scale)^T, and under torch.compile
    neither is rewritten by inductor's weight-only pattern into `_weight_int8pack_mm` (slow on CUDA)."""
    from torch._dynamo.utils import counters

    from mistral7b.quant import kernels

    n, k = 48, 96
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n) / 50 + 1e-3).to(torch.bfloat16)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    want = x.float() @ (q.float() * scale.float()[:, None]).t()
    eager = kernels.int8_mm_cuda(x, q, scale)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(kernels.int8_mm_cuda, fullgraph=True)(x, q, scale)
    assert counters["inductor"]["woq_matcher_count"] == 0
    for got in (eager, compiled):
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
