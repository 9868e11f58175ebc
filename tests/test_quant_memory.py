"""Weight bytes per quantized format: the formula against a model built quantized, and the 7B target."""

import pytest

from mistral7b import load_model
from mistral7b.config import preset
from mistral7b.memory import quantized_weight_bytes, report
from mistral7b.quant import QuantConfig, resident_bytes
from checkpoints import hf_model


def test_mistral_7b_int4_g128_fits_target():
    got = quantized_weight_bytes(preset("mistral-7b-v0.1"), "int4", 128)
    assert got["total"] <= 4.2 * 2**30
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


@pytest.mark.parametrize("quant", [QuantConfig("int4", 128), QuantConfig("int4", 64, False), QuantConfig("int8")])
def test_formula_matches_a_built_model(tmp_path, quant, one_thread):
    hf = hf_model("mistral", dim=256, hidden=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab=100, seed=7)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, quantize=quant)
    config = model.config
    want = quantized_weight_bytes(config, quant.method, quant.group_size, quant.quantize_head,
                                  dtype_bytes=4, device="cpu")
    assert resident_bytes(model) == want["total"]
    shown = report(config, [16], dtype_bytes=4, quant=quant)["quantized_weight_bytes"]
    assert shown["format"] == quant.label
