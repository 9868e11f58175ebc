"""Quantized checkpoints: save_quantized -> load gives identical logits with no quantizing (the stored
integers are the ones loaded), for 16-bit and GGUF sources; corrupt or mismatched files fail clearly."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mistral7b import ModelLoadError, load_model
from mistral7b.loading.quantized import save_quantized
from mistral7b.quant import QuantConfig, describe_weights
from mistral7b.quant import qtensor
from mistral7b.quant.linear import QuantModule
from checkpoints import hf_model, write_gguf


def _modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}


def _round_trip(model, folder, monkeypatch):
    save_quantized(model, folder)
    calls = []
    for fn in ("quantize_int4", "quantize_int8"):  # loading back must not quantize anything
        original = getattr(qtensor, fn)
        monkeypatch.setattr(qtensor, fn, lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))
    loaded = load_model(folder)
    assert not calls
    assert describe_weights(loaded) == describe_weights(model)
    for name, module in _modules(model).items():
        a, b = module.unpack(), _modules(loaded)[name].unpack()
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale), name
        assert (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero)), name
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    return loaded


@pytest.mark.parametrize("quant", [QuantConfig("int4", 32), QuantConfig("int8"), QuantConfig("int4", 32, False)])
def test_round_trip_from_16_bit(tmp_path, quant, monkeypatch, one_thread):
    hf = hf_model("mistral", n_kv_heads=2, window=8, hidden=128, seed=4)
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src", quantize=quant)
    _round_trip(model, tmp_path / "q", monkeypatch)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == quant.method and qc["group_size"] == quant.group_size
    assert qc["quantize_head"] == quant.quantize_head


def test_round_trip_tied_and_gguf(tmp_path, monkeypatch, one_thread):
    hf = hf_model("llama", n_kv_heads=2, tie=True, hidden=128, seed=5)
    hf.save_pretrained(tmp_path / "src")
    _round_trip(load_model(tmp_path / "src", quantize=QuantConfig("int4", 32)), tmp_path / "a", monkeypatch)
    gguf_model = load_model(write_gguf(hf, tmp_path / "m.gguf", "Q4_1", overrides={"token_embd.weight": "Q8_0"}))
    loaded = _round_trip(gguf_model, tmp_path / "b", monkeypatch)
    assert "int4 g32 (from Q4_1)" in describe_weights(loaded)


@pytest.fixture
def saved(tmp_path):
    hf = hf_model("mistral", n_kv_heads=2, window=8, hidden=128, seed=6)
    hf.save_pretrained(tmp_path / "src")
    return save_quantized(load_model(tmp_path / "src", quantize=QuantConfig("int4", 32)), tmp_path / "q")


def _rewrite(folder, edit):
    f = folder / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        metadata, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    edit(tensors)
    save_file(tensors, str(f), metadata=metadata)
    return f


def _raises(folder, *words):
    with pytest.raises(ModelLoadError) as e:
        load_model(folder)
    for w in words:
        assert str(w) in str(e.value), (w, str(e.value))


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    _raises(saved, f)


def test_wrong_shape(saved):
    name = "layers.1.feed_forward.w13.scales"
    f = _rewrite(saved, lambda t: t.update({name: t[name][:, :1].contiguous()}))
    _raises(saved, f, name, "(256, 1)")


def test_missing_scales(saved):
    name = "layers.0.attention.wo.scales"
    f = _rewrite(saved, lambda t: t.pop(name))
    _raises(saved, f, name)


def test_missing_norm(saved):
    _rewrite(saved, lambda t: t.pop("layers.1.ffn_norm.weight"))
    _raises(saved, "layers.1.ffn_norm.weight")


def test_bad_metadata(saved):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    _raises(saved, "99")
