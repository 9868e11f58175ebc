"""The config readers of each checkpoint format (loading/mistral.py, loading/hf.py): fields, defaults,
SPEC's rope_theta rule, and clear errors naming the file."""

import json

import pytest
import torch

from mistral7b import ModelLoadError, preset
from mistral7b.loading.hf import read_config as from_hf_config
from mistral7b.loading.mistral import read_config as from_params_json
from test_config import SPEC_TABLE


# ------------------------------------------------------------------------------------ params.json

def _params(**over):
    p = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5, vocab_size=97)
    p.update(over)
    return {k: v for k, v in p.items() if v is not None}


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_params_json_rope_theta_rule(tmp_path):
    w = int(torch.randint(2, 5000, ()))
    # v0.1: no rope_theta, a window -> 10000
    cfg = from_params_json(_write(tmp_path, "params.json", _params(sliding_window=w)))
    assert cfg.rope_theta == 10000.0 and cfg.sliding_window == w
    # no rope_theta, no window -> 1e6
    cfg = from_params_json(_write(tmp_path, "params.json", _params()))
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None
    # present -> its value, window or not
    theta = float(torch.randint(100, 10 ** 7, ()))
    for window in (w, None):
        cfg = from_params_json(_write(tmp_path, "params.json", _params(rope_theta=theta, sliding_window=window)))
        assert cfg.rope_theta == theta


def test_params_json_fields(tmp_path):
    cfg = from_params_json(_write(tmp_path, "params.json", _params(rope_theta=5e5, sliding_window=8, norm_eps=1e-6)))
    assert (cfg.dim, cfg.n_layers, cfg.head_dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
        64, 2, 16, 96, 4, 2, 97)
    assert cfg.norm_eps == 1e-6 and cfg.sliding_window == 8 and not cfg.tie_embeddings


def test_real_v01_params_json(tmp_path):
    """The published params.json of Mistral-7B-v0.1 gives the v0.1 preset."""
    v01 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
           "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}
    cfg = from_params_json(_write(tmp_path, "params.json", v01))
    ref = preset("mistral-7b-v0.1")
    for f in SPEC_TABLE["mistral-7b-v0.1"]:
        assert getattr(cfg, f) == getattr(ref, f), f


# ------------------------------------------------------------------------------------ config.json

@pytest.mark.parametrize("kind", ["mistral", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_hf_config_round_trip(tmp_path, kind, tie):
    from transformers import LlamaConfig, MistralConfig

    g = lambda lo, hi: int(torch.randint(lo, hi, ()))  # noqa: E731
    n_kv = g(1, 4)
    n_heads = n_kv * g(1, 5)
    kw = dict(hidden_size=n_heads * g(4, 100), intermediate_size=g(10, 500), num_hidden_layers=g(1, 40),
              num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=2 * g(4, 64),
              vocab_size=g(100, 60000), rms_norm_eps=float(10.0 ** -g(4, 7)), rope_theta=float(g(1000, 10 ** 6)),
              max_position_embeddings=g(512, 100000), tie_word_embeddings=tie)
    window = g(16, 5000)
    hf = MistralConfig(sliding_window=window, **kw) if kind == "mistral" else LlamaConfig(**kw)
    hf.save_pretrained(tmp_path)
    cfg = from_hf_config(tmp_path / "config.json")
    assert cfg.dim == kw["hidden_size"] and cfg.n_layers == kw["num_hidden_layers"]
    assert cfg.head_dim == kw["head_dim"] and cfg.hidden_dim == kw["intermediate_size"]
    assert cfg.n_heads == kw["num_attention_heads"] and cfg.n_kv_heads == n_kv
    assert cfg.vocab_size == kw["vocab_size"] and cfg.norm_eps == kw["rms_norm_eps"]
    assert cfg.rope_theta == kw["rope_theta"] and cfg.max_seq_len == kw["max_position_embeddings"]
    assert cfg.tie_embeddings == tie
    assert cfg.sliding_window == (window if kind == "mistral" else None)


def test_hf_config_mistral_without_window(tmp_path):
    from transformers import MistralConfig

    MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, sliding_window=None,
                  num_hidden_layers=2, intermediate_size=96, vocab_size=97).save_pretrained(tmp_path)
    assert from_hf_config(tmp_path / "config.json").sliding_window is None


def test_hf_config_rope_scaling_is_refused(tmp_path):
    """A config whose RoPE is scaled (llama3 / yarn) would load with wrong positions: it must be refused."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96, vocab_size=97,
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    with pytest.raises(ModelLoadError) as e:
        from_hf_config(path)
    assert str(path) in str(e.value) and "linear" in str(e.value)
    # the pre-v5 spelling too
    c = json.loads(path.read_text())
    c["rope_parameters"] = None
    c["rope_theta"] = 10000.0
    c["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    path.write_text(json.dumps(c))
    with pytest.raises(ModelLoadError) as e:
        from_hf_config(path)
    assert str(path) in str(e.value) and "yarn" in str(e.value)
    # an explicit default rope_type is plain RoPE and loads
    c["rope_scaling"] = None
    del c["rope_theta"]
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    path.write_text(json.dumps(c))
    assert from_hf_config(path).rope_theta == 123.0


# ------------------------------------------------------------------------------------ bad configs

@pytest.mark.parametrize("reader", [from_params_json, from_hf_config])
def test_bad_configs_name_the_file(tmp_path, reader):
    hf_ok = dict(model_type="mistral", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    ok = _params() if reader is from_params_json else hf_ok
    n_heads = "n_heads" if reader is from_params_json else "num_attention_heads"
    n_kv = "n_kv_heads" if reader is from_params_json else "num_key_value_heads"
    name = "params.json" if reader is from_params_json else "config.json"
    cases = [
        ("not json {", "JSON"),
        ("[1, 2, 3]", "object"),
        ({k: v for k, v in ok.items() if k != "vocab_size"}, "vocab_size"),
        ({**ok, n_heads: 6, n_kv: 4}, "multiple"),
        ({**ok, "vocab_size": -3}, "vocab_size"),
    ]
    for i, (content, word) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        path = _write(folder, name, content)
        with pytest.raises(ModelLoadError) as e:
            reader(path)
        assert str(path) in str(e.value)
        assert word in str(e.value)
    missing = tmp_path / "nowhere" / name
    with pytest.raises(ModelLoadError) as e:
        reader(missing)
    assert str(missing) in str(e.value)


def test_hf_config_unsupported_model_type(tmp_path):
    path = _write(tmp_path, "config.json", {"model_type": "gpt2", "n_embd": 64})
    with pytest.raises(ModelLoadError) as e:
        from_hf_config(path)
    assert str(path) in str(e.value) and "gpt2" in str(e.value)
