"""benchmarks/bench_gguf.py: the random-weight GGUF that cpu_peer.py runs both engines on, at a tiny shape."""

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import bench_gguf
finally:
    sys.path.pop(0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return bench_gguf.ensure("tiny", directory=tmp_path_factory.mktemp("bench"))


def test_blocks_are_valid_q4_0_and_q8_0():
    rng = np.random.default_rng(0)
    for qtype, sigma, element_std in (("Q4_0", 0.01, 4.6), ("Q8_0", 0.001, 73.0)):
        raw = bench_gguf.random_blocks(rng, 64, 256, qtype, sigma)
        assert raw.shape == (64, 256 // 32 * bench_gguf.BLOCK_BYTES[qtype])
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
        assert values.shape == (64, 256) and np.isfinite(values).all()
        assert abs(values.mean()) < 0.1 * sigma * element_std  # random-sign scales: mean zero
        assert values.std() == pytest.approx(sigma * element_std, rel=0.25)


def test_file_matches_the_plan_and_keeps_the_tokenizer(tiny):
    reader = bench_gguf.read(tiny)
    shape = bench_gguf.SHAPES["tiny"]
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    plan = bench_gguf.tensor_plan(shape, vocab)
    assert [t.name for t in reader.tensors] == [name for name, _, _ in plan]
    for t, (_, dims, qtype) in zip(reader.tensors, plan):
        assert t.tensor_type.name == qtype and tuple(int(n) for n in t.shape[::-1]) == dims
    assert reader.fields["llama.block_count"].contents() == shape.n_layers
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert bench_gguf.weight_bytes_per_token(tiny) == sum(int(t.n_bytes) for t in reader.tensors) - int(embd.n_bytes)
    assert bench_gguf.ensure("tiny", directory=tiny.parent) == tiny  # cached: found, not written again


def test_our_loader_reads_it_with_finite_logits(tiny):
    from mistral7b import Tokenizer
    from mistral7b.loading import load_model

    model = load_model(tiny, device="cpu", dtype=torch.float32)
    ids = Tokenizer.from_source(tiny).encode("a message in a bottle", bos=True)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.1
