"""Checkpoint writers: save_hf / save_mistral round-trip through load_model with identical logits,
and HF transformers reads what save_hf writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from mistral7b.loading import load_model  # noqa: E402
from mistral7b.loading.hf import save as save_hf  # noqa: E402
from mistral7b.loading.mistral import save as save_mistral  # noqa: E402


def hf_mistral(tmp_path, **overrides):
    """A random HF MistralForCausalLM (window + GQA) saved with transformers."""
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=128,
                  sliding_window=7, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs)).eval()
    path = tmp_path / "hf_src"
    model.save_pretrained(path)
    return model, path


def hf_llama_tied(tmp_path):
    """A random HF LlamaForCausalLM: no window, tied embeddings, rope_theta 1e5."""
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                                      num_key_value_heads=3, vocab_size=89, max_position_embeddings=64,
                                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "llama_src"
    model.save_pretrained(path)
    return model, path


def tokens(vocab, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def ours(model, ids):
    with torch.no_grad():
        return model(ids)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def rope_theta_of(config):
    """rope_theta of an HF config (transformers 5 moved it into rope_parameters)."""
    params = getattr(config, "rope_parameters", None)
    return params["rope_theta"] if params else config.rope_theta


def hf_permute(w, n_heads):
    """transformers' convert_mistral_weights_to_hf.py `permute`: Mistral's interleaved q/k rows -> HF's."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.parametrize("build", [hf_mistral, hf_llama_tied], ids=["mistral-window-gqa", "llama-tied"])
def test_round_trips_keep_logits(tmp_path, build):
    hf_model, src = build(tmp_path)
    ids = tokens(hf_model.config.vocab_size)
    reference = hf_logits(hf_model, ids)
    model = load_model(src)
    assert rel_err(ours(model, ids), reference) < 1e-5  # sanity: the source loads right

    mistral_dir = save_mistral(model, tmp_path / "mistral")
    from_mistral = load_model(mistral_dir)
    assert from_mistral.config == model.config
    assert torch.equal(ours(from_mistral, ids), ours(model, ids))

    hf_dir = save_hf(from_mistral, tmp_path / "hf")
    from_hf = load_model(hf_dir)
    assert from_hf.config == model.config
    assert torch.equal(ours(from_hf, ids), ours(model, ids))

    # transformers itself reads save_hf's output and computes the source's logits
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(reloaded).__name__ == type(hf_model).__name__
    assert rel_err(hf_logits(reloaded, ids), reference) < 1e-5
    # and holds the very same weights
    src_state, new_state = hf_model.state_dict(), reloaded.state_dict()
    assert set(src_state) == set(new_state)
    for name, t in src_state.items():
        assert torch.equal(t, new_state[name]), name


def test_mistral_layout_files(tmp_path):
    hf_model, src = hf_mistral(tmp_path)
    cfg = hf_model.config
    out = save_mistral(load_model(src), tmp_path / "mistral")
    params = json.loads((out / "params.json").read_text())
    assert params["rope_theta"] == rope_theta_of(cfg)
    assert params["sliding_window"] == cfg.sliding_window
    assert (params["dim"], params["n_layers"], params["n_heads"], params["n_kv_heads"], params["hidden_dim"]) == (
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
    state = hf_model.state_dict()
    with safe_open(str(out / "consolidated.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert "layers.0.attention.wq.weight" in names and "output.weight" in names
        assert len(names) == len(state)
        # q/k are stored interleaved: transformers' own permute takes them back to the HF rows
        for i in range(cfg.num_hidden_layers):
            wq, wk = f.get_tensor(f"layers.{i}.attention.wq.weight"), f.get_tensor(f"layers.{i}.attention.wk.weight")
            assert torch.equal(hf_permute(wq, cfg.num_attention_heads), state[f"model.layers.{i}.self_attn.q_proj.weight"])
            assert torch.equal(hf_permute(wk, cfg.num_key_value_heads), state[f"model.layers.{i}.self_attn.k_proj.weight"])
            assert torch.equal(f.get_tensor(f"layers.{i}.feed_forward.w1.weight"), state[f"model.layers.{i}.mlp.gate_proj.weight"])
            assert torch.equal(f.get_tensor(f"layers.{i}.feed_forward.w3.weight"), state[f"model.layers.{i}.mlp.up_proj.weight"])
            assert torch.equal(f.get_tensor(f"layers.{i}.attention.wv.weight"), state[f"model.layers.{i}.self_attn.v_proj.weight"])


def test_hf_config_fields(tmp_path):
    hf_model, src = hf_llama_tied(tmp_path)
    out = save_hf(load_model(src), tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert written[key] == source[key], key
    assert written["rope_theta"] == rope_theta_of(hf_model.config) == 100000.0
    assert "sliding_window" not in written
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: HF shares embed_tokens


def test_dtype_is_kept(tmp_path):
    _, src = hf_mistral(tmp_path)
    model = load_model(src, dtype=torch.bfloat16)
    ids = tokens(101)
    for folder, save in (("save_hf", save_hf), ("save_mistral", save_mistral)):
        out = save(model, tmp_path / folder)
        name = "model.safetensors" if save is save_hf else "consolidated.safetensors"
        with safe_open(str(out / name), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        again = load_model(out, dtype=torch.bfloat16)
        assert torch.equal(ours(again, ids), ours(model, ids))
    config = json.loads((tmp_path / "save_hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
