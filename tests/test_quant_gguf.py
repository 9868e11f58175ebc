"""GGUF quantized tensors run quantized: block repacking against the gguf package's own dequantize for
every supported type, tiny GGUF models against their dequantized selves, and the real default model
(SmolLM2 Q4_1 with a Q8_0 tied embedding): memory, logits and greedy tokens against the fp32 path."""

import gguf
import numpy as np
import pytest
import torch

from mistral7b import load_model
from mistral7b.quant import describe_weights, resident_bytes, resolve
from mistral7b.quant import cpu_kernels
from mistral7b.quant.gguf_blocks import FORMATS, repack
from mistral7b.quant.linear import QuantEmbedding, QuantModule
from checkpoints import hf_logits, hf_model, hf_with_gguf_roundtrip, k_quant_model, random_blocks, rel_err, write_gguf


@pytest.mark.parametrize("type_name", sorted(FORMATS))
def test_repack_matches_gguf_dequantize(type_name):
    rng = np.random.default_rng(0)
    rows, cols = 6, 512
    if type_name in ("Q4_0", "Q4_1", "Q8_0"):  # real quantizer output where gguf-py has one
        data = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32),
                                    gguf.GGMLQuantizationType[type_name])
    else:
        data = random_blocks(type_name, rows, cols, rng)
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols)
    weight = repack(data, type_name, rows, cols)
    assert (weight.kind, weight.group_size) == (FORMATS[type_name].kind, FORMATS[type_name].group_size)
    got = weight.dequantize().numpy()
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    print(f"{type_name}: repacked vs gguf dequantize, max error / max |w| = {err:.2e}")
    assert err < 1e-6
    assert np.abs(want).max() > 0


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_q4_blocks_keep_the_files_bytes(type_name, monkeypatch):
    """Q4_0/Q4_1 stay packed as read (no unpack and repack): the CPU layout's bytes are the file's own,
    and every other consumer (torch's kernels, a column cut, int8) sees gguf's values."""
    from mistral7b.loading import Slice, cut
    from mistral7b.quant.linear import Int4Linear

    rng = np.random.default_rng()
    rows, cols = 8, 256
    data = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32),
                                gguf.GGMLQuantizationType[type_name])
    want = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols))
    weight = repack(data, type_name, rows, cols)
    head = 2 if type_name == "Q4_0" else 4
    file_nibbles = torch.from_numpy(data.reshape(-1, data.shape[-1] // (cols // 32))[:, head:].copy())
    assert weight.nibbles and weight.shape == (rows, cols)
    assert weight.q.shape == (rows, cols // 32, 16) and torch.equal(weight.q.reshape(-1, 16), file_nibbles)
    unpacked = weight.unpacked()
    assert not unpacked.nibbles and unpacked.q.shape == (rows, cols) and int(unpacked.q.max()) <= 15
    assert (unpacked.dequantize() - want).abs().max() <= 1e-6 * want.abs().max()
    half = cut(weight, Slice(1, 64, 192))
    assert (half.dequantize() - want[:, 64:192]).abs().max() <= 1e-6 * want.abs().max()
    assert (weight.as_int8().dequantize() - want).abs().max() <= 1e-6 * want.abs().max()
    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "1")
    paths, want_paths = [], [cpu_kernels.available(), False]
    for int8_activations in ("1", "0"):
        monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", int8_activations)
        module = Int4Linear(cols, rows, FORMATS[type_name], "cpu")
        module.to_empty(device="cpu")
        module.fill(0, 3, weight.map_rows(lambda t: t[:3]))
        module.fill(3, rows, weight.map_rows(lambda t: t[3:]))
        paths.append(module.integer)
        if module.integer:
            assert torch.equal(module.qweight.reshape(-1, 16), file_nibbles)
        got = module.dequantize()
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # fp16/bf16 scales
    assert paths == want_paths


def test_q4_k_nibbles_rearranged_by_words_equal_unpacking_and_packing():
    rows, cols = 6, 768
    data = random_blocks("Q4_K", rows, cols, np.random.default_rng())
    weight = repack(data, "Q4_K", rows, cols)
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K).reshape(rows, cols)
    assert weight.nibbles and weight.shape == (rows, cols)
    chunks = torch.from_numpy(data.reshape(-1, 144)[:, 16:].copy())  # 32-byte chunks: low nibbles, then high
    values = cpu_kernels.unpack_nibbles(chunks, 32).reshape(rows, cols)  # 0..15, in order
    assert torch.equal(weight.q.reshape(rows, -1), cpu_kernels.pack_nibbles(values))
    assert np.abs(weight.dequantize().numpy() - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("int8_activations,bound", [("0", 3e-2), ("1", 6e-2)])
def test_tiny_gguf_runs_quantized(tmp_path, qtype, int8_activations, bound, one_thread, monkeypatch):
    """Both CPU paths: torch's kernels (bf16 activations and scales) and cpu_kernels (activations in
    int8 blocks of 32, exact against numpy in test_quant_cpu_kernels.py; 3.9e-2 seen on this sharp
    random model)."""
    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", int8_activations)
    hf = hf_model("llama", n_heads=4, n_kv_heads=2, dim=64, hidden=128, seed=2)
    path = write_gguf(hf, tmp_path / "m.gguf", qtype)
    model = load_model(path)
    labels = describe_weights(model)
    fmt = FORMATS[qtype]
    assert f"{fmt.kind} g32 (from {qtype})" in labels
    assert isinstance(model.layers[0].attention.wqkv, QuantModule)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24))
    want = hf_logits(hf_with_gguf_roundtrip(hf, qtype), tokens)  # HF on the file's dequantized values
    with torch.no_grad():
        got = model(tokens)
        dense = load_model(path, quantize="none")(tokens)
    assert rel_err(dense, want) < 1e-4
    assert rel_err(got, want) < bound


def test_k_quants_and_mixed_fused_matrix(tmp_path, one_thread, monkeypatch):
    """Q4_K, Q5_K and Q6_K tensors (as in a Q4_K_M file), q and k permuted, v in another type than q and k:
    the fused wqkv becomes int8 g16 with zeros, exactly, and the model matches its gguf-dequantized self
    (through torch's kernels: g16 is below cpu_kernels' blocks of 32 for wqkv anyway)."""
    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "0")
    types = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
             "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K",
             "token_embd.weight": "Q4_K", "output.weight": "Q6_K"}
    path = k_quant_model(tmp_path, types, np.random.default_rng(3))
    model = load_model(path)
    assert model.layers[0].attention.wqkv.fmt.label() == "int8 g16 (from Q4_K+Q6_K)"
    assert model.layers[0].feed_forward.w13.fmt.label() == "int4 g32 (from Q4_K)"
    assert isinstance(model.tok_embeddings, QuantEmbedding)
    dense = load_model(path, quantize=False)
    with torch.no_grad():
        # exact weights: every quantized module unpacks to the gguf-dequantized matrix
        for name, module in model.named_modules():
            if isinstance(module, QuantModule) and name != "tok_embeddings":
                w = module.unpack().dequantize()
                ref = dense.get_submodule(name).weight
                assert (w - ref).abs().max() <= 1e-2 * ref.abs().max(), name  # bf16 scales and zeros
        # 8 x 32 tokens: over 2 x 20, the error of bf16 activations into the kernels was 0.006 on average and
        # up to 0.016 over 200 draws (4% of them over 1e-2, which failed CI once); over 8 x 32, at most 0.008
        tokens = torch.randint(0, 96, (8, 32))
        assert torch.equal(model.tok_embeddings(tokens), dense.tok_embeddings(tokens))
        got, want = model(tokens), dense(tokens)
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_q6_k_groups_of_16_run_on_the_cpu_kernel(tmp_path, monkeypatch):
    """Q6_K's groups of 16 have no CPU kernel: the module takes int8 blocks of 32 and requantizes onto them,
    each value within half a step of its block (1/254 of the block's largest |w|) of gguf's dequantize; a
    Q4_K_M-like model (Q4_K, Q6_K, a fused wqkv of both) then runs every matrix on the integer kernel, near
    its dequantized self, its Q4_K parts exact."""
    from mistral7b.quant.linear import Int8Linear, quant_linear
    from mistral7b.quant.qtensor import WeightFormat

    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "1")
    on_blocks = cpu_kernels.available()
    rng = np.random.default_rng()
    rows, cols = 24, 512
    data = random_blocks("Q6_K", rows, cols, rng)
    want = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K).reshape(rows, cols))
    for has_zero in (False, True):  # alone, and as part of a fused matrix with Q4_K parts
        module = quant_linear(cols, rows, WeightFormat("int8", 16, has_zero, "Q6_K"), "cpu")
        module.to_empty(device="cpu")
        module.fill(0, rows, repack(data, "Q6_K", rows, cols))
        assert module.kernel == ("integer" if on_blocks else "dequant")
        got = module.unpack()
        assert got.group_size == module.fmt.group_size == (32 if on_blocks else 16)  # what it holds
        step = want.view(rows, -1, 32).abs().amax(-1, keepdim=True) / 254
        assert ((got.dequantize().view(rows, -1, 32) - want.view(rows, -1, 32)).abs() <= step * 1.01).all()
    types = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
             "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
    path = k_quant_model(tmp_path, types, rng)
    model, dense = load_model(path), load_model(path, quantize=False)
    wqkv = model.layers[0].attention.wqkv
    assert wqkv.fmt.label() == f"int8 g{32 if on_blocks else 16} (from Q4_K+Q6_K)"
    q_rows = model.config.n_heads * model.config.head_dim  # attn_q, Q4_K: widened to int8 exactly
    ref = dense.layers[0].attention.wqkv.weight[:q_rows]
    assert (wqkv.dequantize()[:q_rows] - ref).abs().max() <= 1e-3 * ref.abs().max()  # fp16 scales only
    kernels = {m.kernel for m in model.modules() if isinstance(m, Int8Linear)}
    assert kernels == ({"integer"} if on_blocks else {"dequant"})
    tokens = torch.randint(0, 96, (4, 32))
    with torch.no_grad():
        got, want = model(tokens), dense(tokens)
    assert ((got - want).norm() / want.norm()).item() < 4e-2  # 1.3-1.6% measured


# ------------------------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def smollm2():
    from mistral7b.default_model import default_model_path

    path = default_model_path()
    return path, load_model(path), load_model(path, quantize=False)


@pytest.fixture(scope="module")
def smollm2_torch_kernels():
    """The default model quantized on torch's kernels (MISTRAL7B_INT8_ACTIVATIONS=0), not cpu_kernels."""
    from mistral7b.default_model import default_model_path

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "0")
        return load_model(default_model_path())


def test_smollm2_stays_quantized_in_memory(smollm2):
    path, model, _ = smollm2
    labels = describe_weights(model)
    assert set(labels) == {"int4 g32 (from Q4_1)", "int8 g32 (from Q8_0)", "float32"}
    assert isinstance(model.tok_embeddings, QuantEmbedding)  # one int8 table for the lookup and the head
    size = path.stat().st_size
    resident = resident_bytes(model)
    print(f"resident weights {resident / 1e6:.1f} MB for a {size / 1e6:.1f} MB file ({resident / size:.2f}x)")
    assert resident <= 1.5 * size


@pytest.mark.parametrize("kernels,bound", [("int8 activations", 2.5e-2), ("torch", 1e-2)])
def test_smollm2_logits_and_greedy_tokens_match_fp32(smollm2, smollm2_torch_kernels, kernels, bound, one_thread):
    _, model, dense = smollm2
    model = model if kernels == "int8 activations" else smollm2_torch_kernels
    tokens = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(tokens), dense(tokens)
        err = ((got - want).norm() / want.norm()).item()
        print(f"logits: quantized ({kernels}) vs dequantized fp32, norm relative error {err:.2e}")
        assert err < bound
        # greedy decode with the fp32 model, then the quantized model's choices along that sequence
        seq = tokens[:, :12]
        for _ in range(32):
            seq = torch.cat([seq, dense(seq)[:, -1:].argmax(-1)], dim=1)
        chosen = model(seq)[0, 11:-1].argmax(-1)
    agree = (chosen == seq[0, 12:]).float().mean().item()
    print(f"greedy agreement with fp32 over 32 tokens: {agree:.3f}")
    assert agree >= 0.9


def test_smollm2_int4_keeps_the_files_grid(smollm2):
    """--quantize int4 with no group size follows the file's grid: its Q4_1 blocks (groups of 32) go in
    exactly as stored, and only the tied head (from Q8_0) is quantized anew, also in groups of 32. An
    explicit --group-size still wins."""
    path, stored, _ = smollm2
    model = load_model(path, quantize="int4")
    layer, kept = model.layers[0], stored.layers[0]
    for name in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
        got, want = layer.get_submodule(name), kept.get_submodule(name)
        assert (got.fmt.kind, got.group_size) == ("int4", 32), name
        assert torch.equal(got.dequantize(), want.dequantize()), name  # the file's values, not requantized
    assert (model.output.fmt.kind, model.output.group_size) == ("int4", 32)
    assert set(describe_weights(model)) == {"int4 g32 (from Q4_1)", "int4 g32", "float32"}
    coarse = load_model(path, quantize=resolve("int4", 64))
    assert {m.group_size for m in coarse.modules() if isinstance(m, QuantModule)} == {64}
