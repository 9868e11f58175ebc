"""Test helpers: tiny random HF models, and writers that turn their weights into the other checkpoint
formats (Mistral consolidated, GGUF) the way the upstream converters do.

Everything here is written independently of the library's loaders: the q/k permutation is a copy of
llama.cpp's `permute` (convert_hf_to_gguf.py), the name maps follow Mistral's and llama.cpp's layouts,
and the direct HF -> Transformer copy (`ours_from_hf`) bypasses `mistral7b.loading` entirely.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType, GGUFWriter

# --------------------------------------------------------------------------------------------- models


def hf_config(kind="mistral", *, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden=96, vocab=97,
              window=8, rope_theta=10000.0, eps=1e-5, tie=False, max_pos=512):
    from transformers import LlamaConfig, MistralConfig

    common = dict(hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab, rms_norm_eps=eps,
                  rope_theta=rope_theta, max_position_embeddings=max_pos, tie_word_embeddings=tie)
    if kind == "mistral":
        return MistralConfig(sliding_window=window, **common)
    assert kind == "llama"
    return LlamaConfig(**common)


def randomize_(model: torch.nn.Module, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Weights big enough that attention is sharp and every parameter matters (HF's init is nearly flat)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights: not all ones, so a missing/misplaced norm shows
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (1.5 / p.shape[1] ** 0.5))
    return model


def hf_model(kind="mistral", seed=None, **cfg):
    """A random tiny HF causal LM in fp32 with eager attention, in eval mode."""
    from transformers import LlamaForCausalLM, MistralForCausalLM

    config = hf_config(kind, **cfg)
    config._attn_implementation = "eager"
    cls = MistralForCausalLM if kind == "mistral" else LlamaForCausalLM
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    model = cls(config).float().eval()
    randomize_(model, g)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_window(config):
    return getattr(config, "sliding_window", None)


def hf_rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def ours_from_hf(hf, sliding_window="auto"):
    """Build a mistral7b Transformer from an HF model by copying parameters by hand (no loader code)."""
    from mistral7b import ModelConfig, Transformer

    c = hf.config
    config = ModelConfig(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, head_dim=c.head_dim, hidden_dim=c.intermediate_size,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, norm_eps=c.rms_norm_eps,
        vocab_size=c.vocab_size, rope_theta=hf_rope_theta(c),
        sliding_window=hf_window(c) if sliding_window == "auto" else sliding_window,
        max_seq_len=c.max_position_embeddings, tie_embeddings=bool(c.tie_word_embeddings),
    )
    model = Transformer(config).float().eval()
    sd = hf.state_dict()
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(sd["model.embed_tokens.weight"])
        model.norm.weight.copy_(sd["model.norm.weight"])
        if not config.tie_embeddings:
            model.output.weight.copy_(sd["lm_head.weight"])
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.attention_norm.weight.copy_(sd[p + "input_layernorm.weight"])
            layer.ffn_norm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
            layer.attention.wqkv.weight.copy_(torch.cat(
                [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0))
            layer.attention.wo.weight.copy_(sd[p + "self_attn.o_proj.weight"])
            layer.feed_forward.w13.weight.copy_(torch.cat(
                [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], dim=0))
            layer.feed_forward.w2.weight.copy_(sd[p + "mlp.down_proj.weight"])
    return model


# ------------------------------------------------------------------------------------ q/k permutation


def llama_cpp_permute(weights: torch.Tensor | np.ndarray, n_head: int, n_head_kv: int | None = None):
    """Verbatim logic of llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate-half -> interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama_cpp_unpermute(weights, n_head: int):
    """The inverse, as HF's GGUF loader `reverse_permute_weights` does it."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


# --------------------------------------------------------------------------------- Mistral consolidated

_LAYER_MAP = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def mistral_state_dict(hf) -> dict[str, torch.Tensor]:
    """HF state dict -> Mistral consolidated names, q/k rows back in interleaved pairs."""
    c = hf.config
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        for hf_name, name in _LAYER_MAP.items():
            w = sd[f"model.layers.{i}.{hf_name}"]
            if name == "attention.wq.weight":
                w = llama_cpp_permute(w, c.num_attention_heads)
            elif name == "attention.wk.weight":
                w = llama_cpp_permute(w, c.num_attention_heads, c.num_key_value_heads)
            out[f"layers.{i}.{name}"] = w.contiguous()
    return out


def mistral_params(hf, rope_theta: bool = True) -> dict:
    c = hf.config
    params = {
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "head_dim": c.head_dim,
        "hidden_dim": c.intermediate_size, "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
        "norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
    }
    if hf_window(c) is not None:
        params["sliding_window"] = hf_window(c)
    if rope_theta:
        params["rope_theta"] = hf_rope_theta(c)
    if c.tie_word_embeddings:
        params["tied_embeddings"] = True
    return params


def write_mistral(hf, folder: Path, fmt: str = "safetensors", rope_theta: bool = True,
                  state_dict: dict | None = None, params: dict | None = None) -> Path:
    """A Mistral-layout folder: params.json + consolidated.safetensors (or consolidated.00.pth)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = mistral_state_dict(hf) if state_dict is None else state_dict
    (folder / "params.json").write_text(json.dumps(params or mistral_params(hf, rope_theta), indent=2))
    if fmt == "safetensors":
        save_file(sd, str(folder / "consolidated.safetensors"))
    else:
        torch.save(sd, folder / "consolidated.00.pth")
    return folder


# ------------------------------------------------------------------------------------------------ GGUF

_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensors(hf) -> dict[str, np.ndarray]:
    """HF state dict -> GGUF names (llama arch), q/k permuted as llama.cpp's converter does; fp32 numpy."""
    c = hf.config
    sd = {k: v.detach().float().numpy().copy() for k, v in hf.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        for hf_name, name in _GGUF_LAYER.items():
            w = sd[f"model.layers.{i}.{hf_name}"]
            if hf_name.startswith("self_attn.q_proj"):
                w = llama_cpp_permute(w, c.num_attention_heads, c.num_attention_heads)
            elif hf_name.startswith("self_attn.k_proj"):
                w = llama_cpp_permute(w, c.num_attention_heads, c.num_key_value_heads)
            out[f"blk.{i}.{name}"] = np.ascontiguousarray(w)
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def encode_gguf_tensor(array: np.ndarray, qtype: str):
    """(data, raw_dtype) as convert_hf_to_gguf passes them to add_tensor; 1-D tensors stay F32."""
    if array.ndim == 1 or qtype == "F32":
        return array.astype(np.float32), None
    if qtype == "F16":
        return array.astype(np.float16), None
    t = GGMLQuantizationType[qtype]
    return gguf.quants.quantize(array.astype(np.float32), t), t


def gguf_roundtrip(array: np.ndarray, qtype: str) -> np.ndarray:
    """What a reader gets back for `array` stored as `qtype` (independent of the library's reader)."""
    data, raw = encode_gguf_tensor(array, qtype)
    if raw is None:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, raw).reshape(array.shape).astype(np.float32)


def write_gguf(hf, path: Path, qtype: str = "F32", arch: str = "llama", window: bool = True,
               tensors: dict[str, np.ndarray] | None = None, overrides: dict[str, str] | None = None) -> Path:
    """A GGUF file written like llama.cpp's convert_hf_to_gguf.py for the llama architecture.

    `overrides` maps tensor names to a per-tensor type (to plant e.g. a Q5_0 tensor); a `tensors` value
    may also be (raw block bytes, type name), for the K-quants that gguf-py cannot quantize."""
    c = hf.config
    path = Path(path)
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(hf_rope_theta(c))
    w.add_vocab_size(c.vocab_size)
    if window and hf_window(c) is not None:
        w.add_sliding_window(hf_window(c))
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}.get(qtype, 0))
    for name, array in (gguf_tensors(hf) if tensors is None else tensors).items():
        if isinstance(array, tuple):  # (raw block bytes [rows, bytes per row], type name), written as is
            data, raw = array[0], GGMLQuantizationType[array[1]]
        else:
            data, raw = encode_gguf_tensor(array, (overrides or {}).get(name, qtype))
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_with_gguf_roundtrip(hf, qtype: str):
    """A copy of `hf` whose weights are what a `qtype` GGUF stores (quantized on the permuted q/k rows,
    exactly as written), so it is the exact reference for a model loaded from that GGUF."""
    import copy

    c = hf.config
    ref = copy.deepcopy(hf)
    sd = ref.state_dict()
    with torch.no_grad():
        for name, p in sd.items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            a = p.float().numpy()
            if ".q_proj." in name or ".k_proj." in name:
                n = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
                back = llama_cpp_unpermute(gguf_roundtrip(llama_cpp_permute(a, n), qtype), n)
            else:
                back = gguf_roundtrip(a, qtype)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    return ref


# K-quant GGUF test files: random blocks of each type, and small models that mix them (as Q4_K_M does)

F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,)}


def random_blocks(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """Valid random bytes of a [rows, cols] tensor: random integers and sub-scales, and small positive
    f16 super-scales (random bytes there could be inf or NaN)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    n = rows * cols // block
    data = rng.integers(0, 256, (n, size), dtype=np.uint8)
    size_of_scale = 1e-4 if type_name.endswith("_K") else 2e-3  # weights of order 0.05: a tame model
    for offset in F16_FIELDS[type_name]:
        scale = (rng.uniform(0.5, 1.0, n) * size_of_scale).astype(np.float16)
        data[:, offset:offset + 2] = scale.view(np.uint8).reshape(n, 2)
    return data.reshape(rows, -1)


def k_quant_model(tmp_path, types: dict, rng):
    """A small llama GGUF whose matrices are random blocks of `types` (by kind, e.g. "attn_v", or by
    tensor name); the rest as written from the HF model."""
    hf = hf_model("llama", n_heads=4, n_kv_heads=2, head_dim=64, dim=256, hidden=512, vocab=96, seed=3)
    tensors = gguf_tensors(hf)
    for name, array in list(tensors.items()):
        t = types.get(name, types.get(name.split(".")[-2]))
        if t is not None:
            tensors[name] = (random_blocks(t, *array.shape, rng), t)
    return write_gguf(hf, tmp_path / "k.gguf", tensors=tensors)
