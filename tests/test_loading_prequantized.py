"""Hub-quantized checkpoints (AWQ, GPTQ, compressed-tensors pack-quantized) run on our kernels as stored.

Each test quantizes a random tiny model, packs the integers itself in the format's published layout
(the packers below follow AutoAWQ's, auto-gptq's and compressed-tensors' writers, not our reader) and
checks: (a) every weight read equals the format's dequantization written here, bit for bit; (b) the
checkpoint dequantized generates exactly what our model of those fp32 weights generates, and on the
int4/int8 kernels it stays within the rounding of scales and zeros to bf16; (c) what we do not run is
refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import hf_model
from mistral7b import LLM, SamplingParams, load_model
from mistral7b.loading import open_checkpoint
from mistral7b.loading.quantized import save_quantized
from mistral7b.quant import describe_weights
from mistral7b.quant.linear import QuantModule

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's gemm pack: field i of a word holds column order[i]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) as the int32 the files store."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned -> int32 [R * bits / 32, C]: consecutive rows in one word, low bits first."""
    per = 32 // bits
    words = torch.zeros(values.shape[0] // per, values.shape[1], dtype=torch.int64)
    for i in range(per):
        words |= values[i::per].to(torch.int64) << (bits * i)
    return as_int32(words)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(values.t(), bits).t().contiguous()


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, N] in 0..15 -> int32 [R, N/8] as AutoAWQ's WQLinear_GEMM.from_linear packs them."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for col in range(values.shape[1] // 8):
        for i in range(8):
            words[:, col] |= values[:, col * 8 + AWQ_PACK_ORDER[i]].to(torch.int64) << (4 * i)
    return as_int32(words)


def quantize(w: torch.Tensor, bits: int, group: int, sym: bool, scale_dtype=torch.float16):
    """Asymmetric min/max (or symmetric) integers q [N, K], zeros z [N, G] and scales s [N, G]."""
    n, k = w.shape
    top = 2**bits - 1
    g = w.reshape(n, k // group, group)
    if sym:
        s = (g.abs().amax(-1) / (top // 2)).to(scale_dtype)
        z = torch.full(s.shape, 2 ** (bits - 1), dtype=torch.int64)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / top).to(scale_dtype)
        z = torch.round(-lo / s.float()).clamp(1, top).long()  # >= 1: GPTQ v1's z - 1 stays in range
    q = (torch.round(g / s.float()[..., None]) + z[..., None]).clamp(0, top).long().reshape(n, k)
    return q, z, s


def dequantize(q, z, s, g_idx) -> torch.Tensor:
    """The formats' common definition: w[n, k] = (q[n, k] - z[n, g_idx[k]]) * s[n, g_idx[k]]."""
    return (q - z[:, g_idx]).float() * s.float()[:, g_idx]


# -------------------------------------------------------------------------- the formats' writers


def awq_tensors(q, z, s, g_idx):
    return {"qweight": awq_pack(q.t()), "qzeros": awq_pack(z.t()), "scales": s.t().contiguous()}


def gptq_tensors(q, z, s, bits, v1=True, g_idx=None):
    k = q.shape[1]
    group = k // s.shape[1]
    return {"qweight": pack_rows(q.t(), bits), "qzeros": pack_cols(z.t() - (1 if v1 else 0), bits),
            "scales": s.t().contiguous(),
            "g_idx": (torch.arange(k) // group if g_idx is None else g_idx).to(torch.int32)}


def ct_tensors(q, z, s, bits, sym, g_idx=None):
    out = {"weight_packed": pack_cols(q, bits), "weight_scale": s.contiguous(),
           "weight_shape": torch.tensor(list(q.shape), dtype=torch.int32)}
    if g_idx is not None:  # actorder "group"
        out["weight_g_idx"] = g_idx.to(torch.int32)
    if not sym:  # packed along the output dimension, as signed values + 2^(bits-1): the same unsigned z
        out["weight_zero_point"] = pack_rows(z, bits)
    return out


def qconfig(method, bits, group, sym=False, actorder=None, **extra):
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm", **extra}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
                "checkpoint_format": "gptq", **extra}
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if group > 0 else "channel",
               "group_size": group if group > 0 else None, "dynamic": False, "actorder": actorder}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], **extra,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}


def write_checkpoint(hf, folder: Path, qc: dict, pack, bits: int, group: int, sym: bool,
                     orders: dict | None = None) -> tuple[Path, Path]:
    """(prequantized folder, fp32 folder of the same weights dequantized here). `orders` (act-order):
    module -> the order its inputs are quantized in, groups taken along it (GPTQ's desc_act)."""
    import copy

    ref = copy.deepcopy(hf)
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    tensors = {}
    with torch.no_grad():
        for key, w in state.items():
            module = key.removesuffix(".weight")
            if not module.endswith(LINEARS):
                tensors[key] = w
                continue
            k = w.shape[1]
            g = group if group > 0 else k
            order = (orders or {}).get(module, torch.arange(k))
            q_sorted, z, s = quantize(w.float()[:, order], bits, g, sym,
                                      torch.bfloat16 if qc["quant_method"] == "compressed-tensors" else torch.float16)
            q = torch.empty_like(q_sorted)
            q[:, order] = q_sorted
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[order] = torch.arange(k) // g
            tensors.update({f"{module}.{part}": t for part, t in pack(q, z, s, g_idx).items()})
            ref.get_parameter(key).copy_(dequantize(q, z, s, g_idx))
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    ref.save_pretrained(folder.with_name(folder.name + "_fp32"))
    return folder, folder.with_name(folder.name + "_fp32")


CASES = {  # name: (method, bits, group, sym, pack, our format)
    "awq": ("awq", 4, 128, False, awq_tensors, "int4 g128 (from AWQ)"),
    "gptq4": ("gptq", 4, 128, False, lambda q, z, s, i: gptq_tensors(q, z, s, 4), "int4 g128 (from GPTQ)"),
    "gptq4_v2_channel": ("gptq", 4, -1, True, lambda q, z, s, i: gptq_tensors(q, z, s, 4, v1=False),
                         "int4 g128 (from GPTQ)"),
    "gptq8": ("gptq", 8, 64, False, lambda q, z, s, i: gptq_tensors(q, z, s, 8), "int8 g64 (from GPTQ)"),
    "ct_w4a16": ("compressed-tensors", 4, 128, True, lambda q, z, s, i: ct_tensors(q, z, s, 4, True),
                 "int4 g128 (from compressed-tensors)"),
    "ct_w4a16_asym": ("compressed-tensors", 4, 64, False, lambda q, z, s, i: ct_tensors(q, z, s, 4, False),
                      "int4 g64 (from compressed-tensors)"),
    "ct_w8a16": ("compressed-tensors", 8, -1, True, lambda q, z, s, i: ct_tensors(q, z, s, 8, True),
                 "int8 (from compressed-tensors)"),
}


def build(tmp_path, case: str, seed: int):
    method, bits, group, sym, pack, label = CASES[case]
    hf = hf_model("mistral", dim=128, hidden=256, n_heads=4, n_kv_heads=2, head_dim=32, vocab=97, seed=seed)
    qc = qconfig(method, bits, group, sym)
    if case == "gptq4_v2_channel":
        qc["checkpoint_format"] = "gptq_v2"
    return (*write_checkpoint(hf, tmp_path / case, qc, pack, bits, group, sym), label)


def fresh_seed() -> int:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    print(f"seed {seed}")
    return seed


# ------------------------------------------------------------------------------------------ (a) weights


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_read_equal_the_formats_dequantization(tmp_path, case):
    pre, ref, label = build(tmp_path, case, fresh_seed())
    checkpoint = open_checkpoint(pre)
    assert len(checkpoint.formats) == 2 * len(LINEARS)  # every block linear; embedding and head dense
    assert {fmt.label() for fmt in checkpoint.formats.values()} == {label}
    want = dict(open_checkpoint(ref).stream())
    got = dict(checkpoint.stream(keep=frozenset(checkpoint.formats)))
    assert set(got) == set(want)
    for name, w in got.items():
        if name in checkpoint.formats:
            assert w.kind == checkpoint.formats[name].kind, name  # kept as integers, not dequantized
            assert torch.equal(w.dequantize(), want[name]), name
        else:
            assert torch.equal(w, want[name]), name
    dense = dict(checkpoint.stream())  # not kept: dequantized by the reader, the same values
    assert all(torch.equal(dense[name], want[name]) for name in want)


# ------------------------------------------------------------------------------------------ (b) generation


def greedy(source, prompt, **load) -> list[int]:
    llm = LLM(source, device="cpu", dtype="float32", max_batch=1, **load)
    return llm.generate([prompt], SamplingParams(max_tokens=12))[0].token_ids


@pytest.mark.parametrize("case", sorted(CASES))
def test_generation_equals_the_fp32_weights(tmp_path, case, one_thread):
    """Dequantized, the checkpoint is the fp32 model exactly (same greedy tokens, same logits); on the
    kernels, each matrix holds its weights up to bf16 scales and zeros, and the logits stay within the
    kernels' bf16 arithmetic (a wrong nibble order, group or zero would be off by order 1)."""
    pre, ref, label = build(tmp_path, case, fresh_seed())
    prompt = [int(t) for t in torch.randint(0, 97, (8,))]
    assert greedy(pre, prompt, quantize="none") == greedy(ref, prompt)
    model, dense, exact = load_model(pre), load_model(pre, quantize="none"), load_model(ref)
    assert set(describe_weights(model)) == {label, "float32"}
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        want = exact(tokens)
        assert torch.equal(dense(tokens), want)
        for name, module in model.named_modules():
            if isinstance(module, QuantModule):  # bf16 scale and zero: 2^-9 of each, relative
                w, held = exact.get_submodule(name).weight, module.dequantize()
                assert ((held - w).abs().max() / w.abs().max()).item() < 2**-7, name
        err = ((model(tokens) - want).norm() / want.norm()).item()
    print(f"{case}: logits on the kernels vs the fp32 weights, norm relative error {err:.2e}")
    assert err < 3e-2  # measured 6e-3 to 1.2e-2: bf16 activations and products, as for GGUF's blocks


# ------------------------------------------------------------------------------------------ (c) refusals

REFUSALS = [  # (case to start from, change to quantization_config, the field named)
    ("awq", {"version": "gemv"}, "version"),
    ("awq", {"version": "exllama"}, "version"),
    ("awq", {"zero_point": False}, "zero_point"),
    ("gptq4", {"bits": 3}, "bits"),
    ("gptq4", {"bits": 2}, "bits"),
    ("gptq4", {"checkpoint_format": "marlin"}, "checkpoint_format"),
    ("gptq4", {"quant_method": "bitsandbytes"}, "quant_method"),
    ("ct_w4a16", {"format": "marlin-24"}, "format"),
    ("ct_w4a16", {"config_groups.weights.num_bits": 2}, "num_bits"),
    ("ct_w4a16", {"config_groups.input_activations": {"num_bits": 8, "type": "int"}}, "input_activations"),
]


def with_config(folder: Path, tmp_path: Path, change: dict) -> Path:
    """A copy of `folder` (weights linked) whose quantization_config has `change` applied."""
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    for key, value in change.items():
        if key.startswith("config_groups."):
            *path, last = key.split(".")[1:]
            target = qc["config_groups"]["group_0"]
            for part in path:
                target = target[part]
            target[last] = value
        else:
            qc[key] = value
    out = tmp_path / "changed"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").symlink_to(folder / "model.safetensors")
    return out


@pytest.mark.parametrize("case, change, field", REFUSALS)
def test_refusals_are_one_line(tmp_path, case, change, field):
    pre, _, _ = build(tmp_path, case, fresh_seed())
    folder = with_config(pre, tmp_path, change)
    with pytest.raises(ValueError) as info:
        load_model(folder)
    message = str(info.value)
    print(message)
    assert "\n" not in message and "quant_method" in message and f"{field}=" in message


def act_orders(config, fused_alike: bool = True) -> dict:
    """A random input order per matrix, shared by the matrices that read one input (q/k/v, gate/up), as
    GPTQ's desc_act derives it from that input's statistics; `fused_alike=False` breaks that for k."""
    orders = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn, mlp = torch.randperm(config.hidden_size), torch.randperm(config.hidden_size)
        orders.update({p + "self_attn.q_proj": attn, p + "self_attn.k_proj": attn if fused_alike else attn.flip(0),
                       p + "self_attn.v_proj": attn, p + "mlp.gate_proj": mlp, p + "mlp.up_proj": mlp,
                       p + "self_attn.o_proj": torch.randperm(config.num_attention_heads * config.head_dim),
                       p + "mlp.down_proj": torch.randperm(config.intermediate_size)})
    return orders


ACT_ORDER = {  # name: (quantization_config, bits, group, pack, our format)
    "gptq4": (qconfig("gptq", 4, 128, desc_act=True), 4, 128,
              lambda q, z, s, i: gptq_tensors(q, z, s, 4, g_idx=i), "int4 g128 act-order (from GPTQ)"),
    "gptq8": (qconfig("gptq", 8, 64, desc_act=True), 8, 64,
              lambda q, z, s, i: gptq_tensors(q, z, s, 8, g_idx=i), "int8 g64 act-order (from GPTQ)"),
    "ct_w4a16": (qconfig("compressed-tensors", 4, 64, True, "group"), 4, 64,
                 lambda q, z, s, i: ct_tensors(q, z, s, 4, True, i), "int4 g64 act-order (from compressed-tensors)"),
}


@pytest.mark.parametrize("case", sorted(ACT_ORDER))
def test_act_order_runs_on_inputs_sorted_by_group(tmp_path, case, one_thread):
    """desc_act / actorder "group": every weight read equals the spec's dequantization, the dense load
    generates what the fp32 weights do, and the kernels (on inputs permuted once at load) stay close."""
    qc, bits, group, pack, label = ACT_ORDER[case]
    hf = hf_model("mistral", dim=128, hidden=256, n_heads=4, n_kv_heads=2, head_dim=32, vocab=97, seed=fresh_seed())
    pre, ref = write_checkpoint(hf, tmp_path / case, qc, pack, bits, group, case != "gptq4", act_orders(hf.config))
    checkpoint = open_checkpoint(pre)
    assert "desc_act" in checkpoint.quantization or "actorder group" in checkpoint.quantization
    labels = {fmt.label() for fmt in checkpoint.formats.values()}  # a matrix of one group needs no order
    assert label in labels and labels <= {label, label.replace(" act-order", "")}
    want = dict(open_checkpoint(ref).stream())
    for name, w in checkpoint.stream(keep=frozenset(checkpoint.formats)):
        assert torch.equal(w.dequantize() if name in checkpoint.formats else w, want[name]), name
    prompt = [int(t) for t in torch.randint(0, 97, (8,))]
    assert greedy(pre, prompt, quantize="none") == greedy(ref, prompt)
    model, exact = load_model(pre), load_model(ref)
    assert label in describe_weights(model)
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        want_logits = exact(tokens)
        err = ((model(tokens) - want_logits).norm() / want_logits.norm()).item()
    print(f"{case} act-order: logits on the kernels vs the fp32 weights {err:.2e}")
    assert err < 3e-2
    if case == "gptq8":  # asked for int8 per channel, the values are quantized again, in input order
        assert set(describe_weights(load_model(pre, quantize="int8"))) == {"int8", "float32"}
        with pytest.raises(ValueError, match="act-order"):
            save_quantized(model, tmp_path / "ours")


def test_act_order_refusals(tmp_path):
    """Fused parts ordering one input differently, and groups of the wrong size, are refused at open."""
    hf = hf_model("mistral", dim=128, hidden=256, n_heads=4, n_kv_heads=2, head_dim=32, vocab=97, seed=fresh_seed())
    qc, bits, group, pack, _ = ACT_ORDER["gptq8"]  # groups of 64: two in each 128-wide input
    apart, _ = write_checkpoint(hf, tmp_path / "apart", qc, pack, bits, group, False, act_orders(hf.config, False))
    with pytest.raises(ValueError, match=r"quant_method 'gptq': g_idx='layers.0.attention.wqkv' .* differently"):
        open_checkpoint(apart)

    def uneven(q, z, s, g_idx):
        g_idx = g_idx.clone()
        g_idx[g_idx == 0] = 1 if len(g_idx) > 128 else 0  # group 0 empty, group 1 doubled
        return gptq_tensors(q, z, s, 4, g_idx=g_idx)

    qc, bits, group, _, _ = ACT_ORDER["gptq4"]
    bad, _ = write_checkpoint(hf, tmp_path / "uneven", qc, uneven, bits, group, False, act_orders(hf.config))
    with pytest.raises(ValueError, match=r"quant_method 'gptq': g_idx=.* other than 128") as info:
        open_checkpoint(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["awq", "gptq8 act-order"])
def test_tensor_parallel_ranks_read_their_slices(tmp_path, case):
    """Each of 2 ranks holds the slices of the same weights: row splits stay quantized (an act-order
    matrix keeps its permutation), a column split off the groups (AWQ's 128-wide wo in halves, any
    act-order wo/w2) is read dense."""
    from mistral7b.parallel.loading import load_shard

    hf = hf_model("mistral", dim=128, hidden=256, n_heads=4, n_kv_heads=2, head_dim=32, vocab=97, seed=fresh_seed())
    if case == "awq":
        pre, ref = write_checkpoint(hf, tmp_path / "awq", qconfig("awq", 4, 128), awq_tensors, 4, 128, False)
    else:
        qc, bits, group, pack, _ = ACT_ORDER["gptq8"]
        pre, ref = write_checkpoint(hf, tmp_path / "act", qc, pack, bits, group, False, act_orders(hf.config))
    for rank in range(2):
        shard, _ = load_shard(pre, rank, 2)
        dense = dict(load_shard(ref, rank, 2)[0].named_modules())
        kinds = {}
        for name, module in shard.named_modules():
            if isinstance(module, QuantModule):
                w, held = dense[name].weight, module.dequantize()
                assert ((held - w).abs().max() / w.abs().max()).item() < 2**-7, name
                kinds[name.split(".", 2)[-1]] = module.fmt.label()
            elif isinstance(module, torch.nn.Linear):
                assert torch.equal(module.weight, dense[name].weight), name
                kinds[name.split(".", 2)[-1]] = "dense"
        want = ({"attention.wqkv": "int4 g128 (from AWQ)", "attention.wo": "dense",
                 "feed_forward.w13": "int4 g128 (from AWQ)", "feed_forward.w2": "int4 g128 (from AWQ)"}
                if case == "awq" else
                {"attention.wqkv": "int8 g64 act-order (from GPTQ)", "attention.wo": "dense",
                 "feed_forward.w13": "int8 g64 act-order (from GPTQ)", "feed_forward.w2": "dense"})
        assert {k: v for k, v in kinds.items() if k in want} == want


def test_info_names_the_format(tmp_path):
    from mistral7b.cli import build_parser
    from mistral7b.cli.info import describe, report
    from mistral7b.config import ModelConfig

    pre, _, label = build(tmp_path, "awq", fresh_seed())
    data = report(build_parser().parse_args(["info", "--model", str(pre), "--device", "cpu"]))
    assert data["quantization"] == "AWQ 4-bit g128 (GEMM)"
    assert label in data["weight_format"]
    lines = describe({**data, "element_bytes": 4}, ModelConfig.from_dict(data["config"]))
    assert lines[0].endswith("(hf, AWQ 4-bit g128 (GEMM))")
