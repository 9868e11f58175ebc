"""Loading every checkpoint format, each compared with HF transformers' logits; the real SmolLM2 GGUF
against HF's own GGUF loader; and every error path raising ModelLoadError that names the file."""

import json
import os
import pickle

import gguf
import numpy as np
import pytest
import torch

import mistral7b
from mistral7b import ModelLoadError, load_model
from mistral7b.loading import half_to_interleaved, interleaved_to_half
from checkpoints import (gguf_tensors, hf_logits, hf_model, hf_with_gguf_roundtrip, llama_cpp_permute,
                         llama_cpp_unpermute, mistral_state_dict, rel_err, write_gguf, write_mistral)

TOL = 1e-4
PARITY = {}  # format -> max relative error, printed after the module's tests (visible with pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report_parity():
    yield
    for k, v in sorted(PARITY.items()):
        print(f"PARITY {k:32s} {v:.3e}")

MODELS = {
    # windowed Mistral with GQA (group 2), rope_theta 10000, W smaller than the test sequence
    "mistral": dict(kind="mistral", n_heads=4, n_kv_heads=2, window=8, rope_theta=10000.0, n_layers=2),
    # Llama, no window, group 4, another theta
    "llama": dict(kind="llama", n_heads=4, n_kv_heads=1, rope_theta=500000.0, n_layers=3),
}


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request):
    spec = dict(MODELS[request.param])
    kind = spec.pop("kind")
    hf = hf_model(kind, **spec)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 30))
    return request.param, hf, tokens, hf_logits(hf, tokens)


def _check(label, model, tokens, want, tol=TOL, ref_config=None):
    with torch.no_grad():
        got = model(tokens)
    err = rel_err(got, want)
    PARITY[label] = max(err, PARITY.get(label, 0.0))
    assert err < tol, (label, err)
    return got


def _check_config(model, hf):
    c, h = model.config, hf.config
    assert (c.dim, c.n_layers, c.head_dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (
        h.hidden_size, h.num_hidden_layers, h.head_dim, h.intermediate_size, h.num_attention_heads,
        h.num_key_value_heads, h.vocab_size)
    assert c.sliding_window == getattr(h, "sliding_window", None)
    assert c.rope_theta == pytest.approx(h.rope_parameters["rope_theta"])


def test_permutations_match_llama_cpp():
    for n_heads, hd, d_in in [(4, 16, 64), (3, 8, 10), (1, 4, 7)]:
        w = torch.randn(n_heads * hd, d_in)
        inter = half_to_interleaved(w, n_heads)
        assert torch.equal(inter, llama_cpp_permute(w, n_heads))
        assert not torch.equal(inter, w)
        assert torch.equal(interleaved_to_half(inter, n_heads), w)
        assert torch.equal(interleaved_to_half(inter, n_heads), llama_cpp_unpermute(inter, n_heads))


# ------------------------------------------------------------------------------------ HF folders

def test_hf_folder_single_file(tiny, tmp_path):
    name, hf, tokens, want = tiny
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = load_model(tmp_path)
    _check_config(model, hf)
    _check(f"hf-safetensors/{name}", model, tokens, want)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model(tokens).requires_grad  # no autograd graph even outside no_grad
    # config.json itself as the source is the same folder
    _check(f"hf-safetensors/{name}", load_model(tmp_path / "config.json"), tokens, want)


def test_hf_folder_sharded(tiny, tmp_path):
    name, hf, tokens, want = tiny
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _check(f"hf-sharded/{name}", load_model(str(tmp_path)), tokens, want)


def test_hf_folder_pytorch_bin(tiny, tmp_path):
    name, hf, tokens, want = tiny
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    _check(f"hf-bin/{name}", load_model(tmp_path), tokens, want)


def test_hf_tied_folder(tmp_path):
    hf = hf_model("llama", n_kv_heads=2, tie=True)
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 20))
    model = load_model(tmp_path)
    assert model.config.tie_embeddings
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    _check("hf-tied/llama", model, tokens, hf_logits(hf, tokens))


def test_dtype_argument(tiny, tmp_path):
    name, hf, tokens, want = tiny
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _check(f"hf-bf16/{name}", model, tokens, want, tol=0.2)


# ------------------------------------------------------------------------------------ Mistral folders

@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_mistral_folder(tiny, tmp_path, fmt):
    name, hf, tokens, want = tiny
    write_mistral(hf, tmp_path, fmt=fmt)
    model = load_model(tmp_path)
    _check_config(model, hf)
    _check(f"mistral-{fmt}/{name}", model, tokens, want)
    # q/k really are stored interleaved: the raw file differs from HF's rows
    sd = mistral_state_dict(hf)
    assert not torch.equal(sd["layers.0.attention.wq.weight"], hf.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_mistral_v01_params_without_rope_theta(tmp_path):
    """A v0.1-like params.json (window, no rope_theta) loads with theta 10000, matching HF's default."""
    hf = hf_model("mistral", n_kv_heads=2, window=8, rope_theta=10000.0)
    write_mistral(hf, tmp_path, rope_theta=False)
    assert "rope_theta" not in json.loads((tmp_path / "params.json").read_text())
    model = load_model(tmp_path)
    assert model.config.rope_theta == 10000.0
    tokens = torch.randint(0, hf.config.vocab_size, (1, 24))
    _check("mistral-v01-params/mistral", model, tokens, hf_logits(hf, tokens))


# ------------------------------------------------------------------------------------ GGUF

def test_gguf_f32(tiny, tmp_path):
    name, hf, tokens, want = tiny
    path = write_gguf(hf, tmp_path / "m.gguf", "F32")
    model = load_model(path)
    _check_config(model, hf)
    _check(f"gguf-F32/{name}", model, tokens, want)
    # a folder holding exactly one .gguf is that file
    _check(f"gguf-F32/{name}", load_model(tmp_path), tokens, want)


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_gguf_quantized(tiny, tmp_path, qtype):
    name, hf, tokens, want = tiny
    path = write_gguf(hf, tmp_path / "m.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    ref = hf_with_gguf_roundtrip(hf, qtype)
    want_q = hf_logits(ref, tokens)
    assert rel_err(want_q, want) > 1e-4  # the quantization really changed the weights
    _check(f"gguf-{qtype}/{name}", load_model(path, quantize=False), tokens, want_q)  # dequantized


def test_gguf_tied(tmp_path):
    hf = hf_model("llama", n_kv_heads=2, tie=True)
    path = write_gguf(hf, tmp_path / "tied.gguf", "Q8_0")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    model = load_model(path, quantize=False)
    assert model.config.tie_embeddings
    tokens = torch.randint(0, hf.config.vocab_size, (1, 20))
    _check("gguf-Q8_0-tied/llama", model, tokens, hf_logits(hf_with_gguf_roundtrip(hf, "Q8_0"), tokens))


def test_gguf_window_key_is_read(tmp_path):
    """Without llama.attention.sliding_window the same weights load as full attention (and differ)."""
    hf = hf_model("mistral", n_kv_heads=2, window=8)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 30))
    want = hf_logits(hf, tokens)
    with_w = load_model(write_gguf(hf, tmp_path / "w.gguf", window=True))
    without = load_model(write_gguf(hf, tmp_path / "n.gguf", window=False))
    assert with_w.config.sliding_window == 8 and without.config.sliding_window is None
    _check("gguf-F32/mistral", with_w, tokens, want)
    with torch.no_grad():
        assert rel_err(without(tokens), want) > 1e-2


# ------------------------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def smollm2(hf_default_dir):
    from transformers import AutoModelForCausalLM

    from mistral7b.default_model import default_model_path

    p = default_model_path()
    ours = load_model(p, quantize=False)  # dequantized to fp32 (tests/test_quant_gguf.py runs it quantized)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_default_dir), dtype=torch.float32).eval()
    return p, ours, hf


def test_smollm2_config_matches_spec(smollm2):
    p, ours, hf = smollm2
    c = ours.config
    assert (c.dim, c.n_layers, c.head_dim, c.hidden_dim, c.n_heads, c.n_kv_heads) == (576, 30, 64, 1536, 9, 3)
    assert c.sliding_window is None and c.rope_theta == 100000.0 and c.vocab_size == 49152
    assert c.norm_eps == pytest.approx(1e-5) and c.tie_embeddings
    assert c.n_params == sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_smollm2_logits_match_hf(smollm2):
    p, ours, hf = smollm2
    tokens = torch.randint(0, 49152, (1, 64))
    with torch.no_grad():
        got = ours(tokens)
        want = hf(input_ids=tokens, use_cache=False).logits.float()
    err = ((got - want).norm() / want.norm()).item()
    PARITY["smollm2-Q4_1 (norm rel)"] = err
    PARITY["smollm2-Q4_1"] = rel_err(got, want)
    assert err < 1e-3


def test_smollm2_greedy_tokens_match_hf(smollm2):
    """32 greedy tokens from ours (KV cache, one token at a time) are HF's greedy tokens: HF's greedy choice
    after each prefix is the argmax of its causal logits there, so one teacher-forced HF forward over the
    whole sequence checks all 32 choices (and costs one forward instead of 32)."""
    p, ours, hf = smollm2
    prompt = torch.randint(0, 49152, (1, 12))
    t, n_new = prompt.shape[1], 32
    with torch.no_grad():
        cache = mistral7b.KVCache(ours.config, 1, max_seq_len=64)
        logits = ours(prompt, torch.arange(t)[None], cache, kv_len=t)
        out = []
        for i in range(n_new):
            nxt = logits[0, -1].argmax()
            out.append(int(nxt))
            if i + 1 < n_new:
                logits = ours(nxt.view(1, 1), torch.tensor([[t + i]]), cache, kv_len=t + i + 1)
        seq = torch.cat([prompt, torch.tensor([out])], dim=1)
        ref = hf(input_ids=seq, use_cache=False).logits[0, t - 1:-1].argmax(-1)
    assert len(out) == n_new
    assert out == ref.tolist()


# ------------------------------------------------------------------------------------ errors

def _raises(source, *words):
    with pytest.raises(ModelLoadError) as e:
        load_model(source)
    msg = str(e.value)
    for w in words:
        assert str(w) in msg, (w, msg)
    return msg


@pytest.fixture(scope="module")
def small_hf():
    return hf_model("mistral", n_kv_heads=2, window=8)


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope", tmp_path / "nope")


def test_unrecognized_folder(tmp_path):
    (tmp_path / "README.txt").write_text("hello")
    (tmp_path / "weights.npy").write_bytes(os.urandom(100))
    _raises(tmp_path, tmp_path)
    _raises(tmp_path / "README.txt", tmp_path / "README.txt")


def test_hf_folder_without_weights(tmp_path, small_hf):
    small_hf.config.save_pretrained(tmp_path)
    _raises(tmp_path, tmp_path)


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated_safetensors(tmp_path, small_hf, where):
    small_hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(20 if where == "header" else size - 1000)
    _raises(tmp_path, f)


def test_truncated_consolidated(tmp_path, small_hf):
    write_mistral(small_hf, tmp_path)
    f = tmp_path / "consolidated.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    _raises(tmp_path, f)


def test_missing_shard(tmp_path, small_hf):
    small_hf.save_pretrained(tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _raises(tmp_path, shard)


def test_random_bytes_gguf(tmp_path):
    f = tmp_path / "junk.gguf"
    f.write_bytes(os.urandom(4096))
    _raises(f, f)
    g = tmp_path / "magic.gguf"  # right magic, garbage after
    g.write_bytes(b"GGUF" + os.urandom(4096))
    _raises(g, g)


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_gguf(tmp_path, small_hf, keep):
    f = write_gguf(small_hf, tmp_path / "t.gguf", "Q8_0")
    with open(f, "r+b") as fh:
        fh.truncate(int(f.stat().st_size * keep))
    _raises(f, f)


def _edit_hf_folder(tmp_path, hf, edit):
    from safetensors.torch import save_file

    hf.config.save_pretrained(tmp_path)
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    edit(sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_wrong_shape(tmp_path, small_hf):
    name = "model.layers.1.self_attn.k_proj.weight"
    d = _edit_hf_folder(tmp_path, small_hf, lambda sd: sd.update({name: torch.randn(16, 64)}))
    _raises(d, d, "layers.1.attention.wk.weight", "(16, 64)")


def test_missing_tensor(tmp_path, small_hf):
    d = _edit_hf_folder(tmp_path, small_hf, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    _raises(d, d, "layers.1.feed_forward.w3.weight")


def test_extra_tensor(tmp_path, small_hf):
    d = _edit_hf_folder(tmp_path, small_hf, lambda sd: sd.update({"model.layers.5.extra.weight": torch.randn(4)}))
    _raises(d, d, "model.layers.5.extra.weight")


def test_mistral_wrong_shape_and_missing(tmp_path, small_hf):
    sd = mistral_state_dict(small_hf)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:-16].contiguous()
    write_mistral(small_hf, tmp_path / "a", state_dict=sd)
    _raises(tmp_path / "a", tmp_path / "a", "layers.0.attention.wq.weight")
    sd = mistral_state_dict(small_hf)
    del sd["norm.weight"]
    write_mistral(small_hf, tmp_path / "b", fmt="pth", state_dict=sd)
    _raises(tmp_path / "b", tmp_path / "b", "norm.weight")


def test_gguf_wrong_shape_and_missing(tmp_path, small_hf):
    t = gguf_tensors(small_hf)
    t["blk.0.ffn_up.weight"] = t["blk.0.ffn_up.weight"][:64]
    f = write_gguf(small_hf, tmp_path / "shape.gguf", tensors=t)
    _raises(f, f, "feed_forward.w3")
    t = gguf_tensors(small_hf)
    del t["blk.1.attn_v.weight"]
    f = write_gguf(small_hf, tmp_path / "missing.gguf", tensors=t)
    _raises(f, f, "layers.1.attention.wv.weight")


def test_gguf_unsupported_architecture(tmp_path, small_hf):
    f = write_gguf(small_hf, tmp_path / "gpt2.gguf", arch="gpt2")
    _raises(f, f, "gpt2")


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_gguf_unsupported_tensor_type(tmp_path, small_hf, qtype):
    f = write_gguf(small_hf, tmp_path / "q5.gguf", "F32", overrides={"blk.1.ffn_down.weight": qtype})
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(f)).tensors}["blk.1.ffn_down.weight"] == qtype
    _raises(f, f, qtype, "blk.1.ffn_down.weight")


class _Payload:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("layout", ["mistral", "hf"])
def test_malicious_pickle_is_not_executed(tmp_path, small_hf, layout):
    victim = tmp_path / "pwned.txt"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    sd = {"tok_embeddings.weight": torch.zeros(2), "evil": _Payload(victim)}
    if layout == "mistral":
        (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96,
                                                          "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97}))
        f = folder / "consolidated.00.pth"
    else:
        small_hf.config.save_pretrained(folder)
        f = folder / "pytorch_model.bin"
    torch.save(sd, f)
    _raises(folder, f)
    assert not victim.exists()
    # the payload is live: an unsafe load would have created the file
    with open(f, "rb") as fh:
        torch.load(fh, weights_only=False)
    assert victim.exists()


def test_hub_id_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    empty = tmp_path / "hub"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.chdir(tmp_path)
    repo = "someone-test/not-a-cached-model"
    _raises(repo, repo, "huggingface-cli download")
