"""The quantize flags on the command line (cli/common.py, generate, info, memory, convert), each against the
library doing the same thing in-process: LLM(quantize=...), describe_weights of the loaded model,
memory.quantized_weight_bytes, load_model of the written checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from test_cli import one_error_line, run

transformers = pytest.importorskip("transformers")

from mistral7b import memory  # noqa: E402
from mistral7b.config import preset  # noqa: E402
from mistral7b.llm import LLM  # noqa: E402
from mistral7b.loading import load_model  # noqa: E402
from mistral7b.quant import describe_weights, resolve  # noqa: E402
from mistral7b.sampling import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random HF Mistral (width 64: int4 g128 falls back to g64 per matrix), no tokenizer."""
    path = tmp_path_factory.mktemp("hf_q")
    config = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                                        max_position_embeddings=64, sliding_window=7)
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    transformers.MistralForCausalLM(config).eval().save_pretrained(path)
    return path


def test_generate_int8_equals_the_python_api(hf_folder):
    prompt = [int(t) for t in torch.randint(0, 101, (6,))]
    out = run("generate", " ".join(map(str, prompt)), "--token-ids", "--model", hf_folder, "--device", "cpu",
              "--dtype", "float32", "--quantize", "int8", "-n", "12", "--json", check=0)
    record = json.loads(out.stdout)
    llm = LLM(hf_folder, device="cpu", dtype="float32", max_batch=1, quantize="int8")
    want = llm.generate([prompt], SamplingParams(max_tokens=12))[0]
    assert record["token_ids"] == want.token_ids
    dense = LLM(hf_folder, device="cpu", dtype="float32", max_batch=1).model
    assert "int8" in describe_weights(llm.model) and "int8" not in describe_weights(dense)


def test_bad_quantize_flags(hf_folder):
    bad = run("generate", "1 2", "--token-ids", "--model", hf_folder, "--quantize", "int3")
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr and "int8" in bad.stderr
    assert "choose from" in bad.stderr and "int4" in bad.stderr
    bad = run("generate", "1 2", "--token-ids", "--model", hf_folder, "--quantize", "int4", "--group-size", "48")
    assert bad.returncode == 2 and "--group-size" in bad.stderr
    # a width the group size does not divide takes the largest supported size that does (64 here)
    ok = run("generate", "1 2", "--token-ids", "--model", hf_folder, "--device", "cpu", "--quantize", "int4",
             "--group-size", "128", "-n", "2", check=0)
    assert ok.returncode == 0, ok.stderr
    line = one_error_line(run("generate", "1 2", "--token-ids", "--model", hf_folder, "--quantize", "int8",
                              "--group-size", "64"))
    assert "--group-size applies to int4 only" in line


def test_info_reports_the_default_gguf_quantized():
    data = json.loads(run("info", "--json", "--dtype", "float32", "--device", "cpu", check=0).stdout)
    model = LLM(device="cpu", dtype="float32", max_batch=1).model
    loaded, c = describe_weights(model), model.config
    assert set(data["weight_formats"]) == set(loaded) == {"int4 g32 (from Q4_1)", "int8 g32 (from Q8_0)", "float32"}
    for label in ("int4 g32 (from Q4_1)", "float32"):
        assert data["weight_formats"][label]["params"] == loaded[label]["params"]
    # the Q8_0 tensor is the tied embedding; describe_weights counts it again as the (shared) head
    assert c.tie_embeddings and data["weight_formats"]["int8 g32 (from Q8_0)"]["params"] == c.vocab_size * c.dim
    # --quantize int4 follows the file's grid: Q4_1 blocks kept, the tied head quantized anew, both g32
    text = run("info", "--dtype", "float32", "--device", "cpu", "--quantize", "int4", check=0).stdout
    assert "weight format   int4 g32 (from Q4_1) 65%, float32 17%, int4 g32 17% (as loaded with --quantize int4" in text


@pytest.mark.parametrize("flags", [("int4",), ("int4", "--group-size", "64"), ("int8",)])
def test_memory_quantized_bytes(flags):
    data = json.loads(run("memory", "--json", "--quantize", *flags, check=0).stdout)["quantized_weight_bytes"]
    default = 128 if flags[0] == "int4" else None  # no source, so no grid of its own: int4 takes 128
    quant = resolve(flags[0], int(flags[2]) if len(flags) > 2 else default)
    want = memory.quantized_weight_bytes(preset("mistral-7b-v0.1"), quant.method, quant.group_size)
    assert {k: data[k] for k in want} == want and data["format"] == quant.label
    text = run("memory", "--quantize", *flags, check=0).stdout
    assert f"weights {quant.label}: {memory.format_bytes(want['total'])}" in text


def test_convert_quantize_round_trip(hf_folder, tmp_path):
    dst = tmp_path / "q"
    assert run("convert", hf_folder, dst, "--quantize", "int4", "--group-size", "32", check=0).stdout.strip() == str(dst)
    ids = torch.randint(0, 101, (1, 10))
    loaded = load_model(dst, "cpu", torch.float32)
    direct = load_model(hf_folder, "cpu", torch.float32, quantize=resolve("int4", 32))
    assert set(describe_weights(loaded)) == set(describe_weights(direct)) and "int4 g32" in describe_weights(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), direct(ids), rtol=0, atol=0)
    line = one_error_line(run("convert", hf_folder, tmp_path / "x", "--to", "quantized"))
    assert "needs --quantize" in line


def test_bench_peer_table(capsys, tmp_path):
    """The table with synthetic figures: the best peer is the largest of HF default, HF compiled, gpt-fast."""
    import random
    from types import SimpleNamespace

    from mistral7b.bench import print_table
    from mistral7b.cli import build_parser

    hf, hfc, gf, ours = (random.uniform(10, 900) for _ in range(4))
    results = {"device": "card", "torch": "t", "transformers": "x", "date": "d", "ours": {"decode_b1_tok_s": ours},
               "hf": {"decode_b1_tok_s": hf}, "hf_compiled": {"decode_b1_tok_s": hfc},
               "peers": {"gpt-fast": {"tok_s_with_prefill": gf}}}
    print_table(results, SimpleNamespace(prompt_len=128, new_tokens=256, batch=8, prefill="", context=16384))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| decode b1"))
    best = max(hf, hfc, gf)
    assert f"{ours / best:.2f}x" in row.split("|")[-2]
    args = build_parser().parse_args(["bench", "--peer", "gpt-fast", str(tmp_path)])
    assert args.peer == ["gpt-fast", str(tmp_path)]
    line = one_error_line(run("bench", "--peer", "gpt-fast", tmp_path))
    assert "not a gpt-fast folder" in line
