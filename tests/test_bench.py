"""`mistral7b bench` end to end on the CPU at the tiny shape, quantized: its limit table against weight
bytes counted here from the shapes alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mistral7b.bench import TINY

# The CLI's entry point in a fresh interpreter, which then says whether transformers was imported.
ENTRY = ("import sys; from mistral7b.cli import main; rc = main(sys.argv[1:]); "
         "print('transformers imported:', 'transformers' in sys.modules); raise SystemExit(rc)")


def bench(*args, timeout=120):
    result = subprocess.run([sys.executable, "-c", ENTRY, "bench", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    return result


def int4_bytes(config, group: int) -> int:
    """Resident bytes of the tiny model under int4 groups of `group`, from its shapes: each quantized
    matrix n x k holds k/2 bytes per row of codes and a bf16 scale and zero per group of each row;
    the embedding (bf16) and the norms (bf16) stay as they are; the head is quantized."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    matrices = [(q, c.dim), (kv, c.dim), (kv, c.dim), (c.dim, q), (c.hidden_dim, c.dim), (c.hidden_dim, c.dim),
                (c.dim, c.hidden_dim)] * c.n_layers + [(c.vocab_size, c.dim)]
    quantized = sum(n * k // 2 + (k // group) * n * 2 * 2 for n, k in matrices)
    norms = (2 * c.n_layers + 1) * c.dim
    return quantized + 2 * (c.vocab_size * c.dim + norms)


def test_bench_quantized_limit_table(tmp_path, monkeypatch):
    """The limit table from the weights' resident bytes, on torch's int4 layout (`int4_bytes`): the CPU
    default, cpu_kernels, holds float16 scales per block of 32 instead (memory.py counts both)."""
    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "0")
    out = tmp_path / "bench.json"
    result = bench("--device", "cpu", "--preset", "tiny", "--no-hf", "--sections", "decode", "--prefill", "",
                   "--batch", 2, "--prompt-len", 8, "--new-tokens", 6, "--runs", 1, "--quantize", "int4",
                   "--bandwidth-tb-s", 4.3, "--json", out)
    assert result.returncode == 0, result.stderr
    assert "transformers imported: False" in result.stdout  # --no-hf never loads it
    weight_bytes = int4_bytes(TINY, 128)
    figures = json.loads(out.read_text())
    assert figures["weights"] == {"format": "int4 g128", "bytes": weight_bytes}
    limit = figures["limit"]
    assert limit["b1"]["limit_tok_s"] == 4.3e12 / weight_bytes
    assert limit["b2"]["limit_tok_s"] == 2 * 4.3e12 / weight_bytes  # weights read once a step for both rows
    for batch in (1, 2):
        ours = figures["ours"][f"decode_b{batch}_decode_only_tok_s"]
        assert ours > 0 and limit[f"b{batch}"]["ours_tok_s"] == ours
        assert limit[f"b{batch}"]["ours_over_limit"] == ours / limit[f"b{batch}"]["limit_tok_s"]
    # The printed table: a header naming the limit column, and the b1 row's figures.
    lines = result.stdout.splitlines()
    assert "| tok/s | ours | gpt-fast | limit | ours / limit |" in lines
    row = next(line for line in lines if line.startswith("| decode b1 |")).split("|")
    assert row[3].strip() == "-"  # no --peer: no gpt-fast figure
    assert row[4].strip() == f"{4.3e12 / weight_bytes:,.1f}"
    assert row[2].strip() == f"{figures['ours']['decode_b1_decode_only_tok_s']:,.1f}"


def test_bench_speculative_figures(tmp_path):
    """--speculative ngram: the decode section again through the speculative engine, with tokens per verify
    (accepted + 1, so within [1, k + 1]) and the speed-up over plain decode in the JSON and a table."""
    out, k = tmp_path / "bench.json", 3
    result = bench("--device", "cpu", "--preset", "tiny", "--no-hf", "--sections", "decode", "--prefill", "",
                   "--batch", 2, "--prompt-len", 8, "--new-tokens", 12, "--runs", 1, "--speculative", "ngram",
                   "--num-speculative-tokens", k, "--json", out)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    # no --bandwidth-tb-s: the limit uses this machine's copy bandwidth, measured in the run and named
    limit = figures["limit"]
    assert limit["bandwidth_from"] == "measured copy" and 1e8 < limit["bandwidth_bytes_per_s"] < 1e13
    assert limit["b1"]["limit_tok_s"] == limit["bandwidth_bytes_per_s"] / figures["weights"]["bytes"]
    assert "(measured copy) / weight bytes" in result.stdout
    spec = figures["speculative"]
    assert spec["method"] == "ngram" and spec["num_tokens"] == k
    lines = result.stdout.splitlines()
    assert "| batch | tokens per verify | acceptance | plain tok/s | speculative tok/s | speed-up |" in lines
    for batch in (1, 2):
        row = spec[f"b{batch}"]
        assert 1 <= row["tokens_per_verify"] <= k + 1
        assert 0 <= row["accepted_tokens"] <= row["draft_tokens"]
        assert row["acceptance_rate"] == (row["accepted_tokens"] / row["draft_tokens"] if row["draft_tokens"] else 0)
        plain = figures["ours"][f"decode_b{batch}_decode_only_tok_s"]
        assert row["decode_only_tok_s"] > 0 and row["speedup"] == row["decode_only_tok_s"] / plain
        table = next(line for line in lines if line.startswith(f"| {batch} |")).split("|")
        assert table[2].strip() == f"{row['tokens_per_verify']:,.2f}" and table[6].strip() == f"{row['speedup']:,.2f}x"


def test_bench_bad_flags_are_one_line_errors(capsys):
    """Checked before any work, in-process: exit 1 and one line naming the problem."""
    from mistral7b.cli import main

    for args, message in ((("--quantize", "int8", "--group-size", "64"), "--group-size applies to int4 only"),
                          (("--preset", "nope"), "or tiny"),
                          (("--bandwidth-tb-s", "0"), "--bandwidth-tb-s must be positive"),
                          (("--num-speculative-tokens", "2"), "--num-speculative-tokens needs --speculative"),
                          (("--speculative", "ngram", "--num-speculative-tokens", "17"), "in [1, 16], got 17"),
                          (("--speculative", "self-int4", "--tensor-parallel-size", "2"), "use ngram or draft:SRC")):
        assert main(["bench", "--device", "cpu", *args]) == 1
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and not captured.out, captured
        assert lines[0].startswith("mistral7b: error: ") and message in lines[0]


def test_serve_load_times_per_token_not_per_event():
    """benchmarks/serve_load.py: a stream of one first token then two events of 8 tokens, 0.8 s apart:
    TPOT and ITL are 0.1 s a token (the per-event gap is 0.8 s); with one event per token, ITL is each gap."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from serve_load import per_token, summarize
    finally:
        sys.path.pop(0)
    bursts = {"start": 0.0, "times": [1.0, 1.8, 2.6], "done": 2.6, "usage": {"completion_tokens": 17},
              "finish": "length"}
    tpot, itl, exact = per_token(bursts)
    assert tpot == pytest.approx(0.1) and itl == pytest.approx([0.1, 0.1]) and not exact
    summary = summarize([bursts], wall=2.6, max_tokens=17)
    assert summary["tpot_ms_p50"] == summary["itl_ms_p50"] == 100.0 and summary["itl_event_ms_p50"] == 800.0
    steady = {"start": 0.0, "times": [0.5, 0.6, 0.8], "done": 0.8, "usage": {"completion_tokens": 3}, "finish": "length"}
    tpot, itl, exact = per_token(steady)
    assert tpot == pytest.approx(0.15) and itl == pytest.approx([0.1, 0.2]) and exact


def test_serve_load_engine_process_exits_cleanly():
    """benchmarks/serve_load.py --engine-process: its random-weight LLM stands in for `LLM` in the engine
    process, which closes it on the way out; a missing method there was a traceback at every exit."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    result = subprocess.run([sys.executable, str(script), "--preset", "tiny", "-c", "2", "--prompt-len", "16",
                             "--max-tokens", "4", "--engine-process", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "requests / tokens                        2 / 8" in result.stdout
