"""`mistral7b eval perplexity` (mistral7b/cli/eval.py): its JSON equals mistral7b.perplexity on the same tokens,
through the real parser; quantize flags reach the loader; bad input gives one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mistral7b
import mistral7b.llm
from mistral7b.cli import build_parser
from mistral7b.quant import resolve

TEXT = Path(__file__).parent / "data" / "licenses.txt"


def parse(*argv: str):
    return build_parser().parse_args(["eval", "perplexity", *argv])


def run(*argv: str) -> int:
    args = parse(*argv)
    return args.func(args)


@pytest.fixture(scope="module")
def smollm2():
    from mistral7b.default_model import default_model_path

    return mistral7b.LLM(default_model_path(), device="cpu", dtype="float32", max_batch=1, max_seq_len=1)


def test_json_equals_the_python_function(smollm2, tmp_path, capsys):
    llm = smollm2
    text = TEXT.read_text()[:1500]
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert run(str(f), "--model", str(llm.source), "--dtype", "float32", "--device", "cpu",
               "--context", "128", "--stride", "96", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    want = mistral7b.perplexity(llm.model, llm.tokenizer.encode(text, bos=True), context=128, stride=96, progress=False)
    assert record["ppl"] == pytest.approx(want.ppl, rel=1e-9) and record["n_tokens"] == want.n_tokens
    assert (record["mode"], record["context"], record["stride"], record["quantize"]) == ("strided", 128, 96, None)
    assert run(str(f), "--model", str(llm.source), "--dtype", "float32", "--device", "cpu") == 0
    line = capsys.readouterr().out
    cache = mistral7b.text_perplexity(llm, text, progress=False)
    assert line.startswith(f"perplexity {cache.ppl:.4f} ") and "one pass through the cache" in line


def test_quantize_reaches_the_loader(smollm2, tmp_path, monkeypatch, capsys):
    """quantize= is None without the flag (a GGUF runs in its own formats), the QuantConfig of the flags
    otherwise, and QuantConfig("none") for --quantize none."""
    seen = []

    def recording_llm(source, device=None, dtype=None, engine_config=None, quantize=None, tensor_parallel_size=1):
        assert tensor_parallel_size == 1  # eval has no --tensor-parallel-size
        seen.append(quantize)
        return smollm2

    f = tmp_path / "t.txt"
    f.write_text(TEXT.read_text()[:300])
    monkeypatch.setattr(mistral7b.llm, "LLM", recording_llm)
    assert run(str(f), "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["quantize"] is None  # no flag; the formats the GGUF runs in are reported as used:
    from mistral7b.quant import QuantModule

    labels = {m.fmt.label() for m in smollm2.model.modules() if isinstance(m, QuantModule)}
    formats = record["weight_formats"]
    assert labels and labels <= set(formats) and all(v > 0 for v in formats.values()), record
    assert next(iter(formats)).startswith("int4"), record  # most weights are Q4_1, held as int4
    assert run(str(f), "--quantize", "int4", "--group-size", "64", "--json") == 0
    assert json.loads(capsys.readouterr().out)["quantize"] == "int4 g64"
    assert run(str(f), "--quantize", "int8", "--no-quantize-head") == 0
    assert run(str(f), "--quantize", "none") == 0
    assert seen == [None, resolve("int4", 64), resolve("int8", None, False), resolve("none")]


def test_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ok \xff\xfe")
    for argv, message in [
        ((str(tmp_path / "missing.txt"),), "missing.txt: no such file"),
        ((str(empty),), "empty.txt: the file is empty"),
        ((str(binary),), "b.txt: not UTF-8 text"),
        ((str(tmp_path),), "is a folder"),
        ((str(TEXT), "--stride", "8"), "--stride needs --context"),
        ((str(TEXT), "--group-size", "64"), "a group size was given without a quantization method"),
    ]:
        with pytest.raises((ValueError, mistral7b.cli.CLIError), match=message):
            run(*argv)
    for argv, message in ((("x", "--context", "1"), "an integer >= 2"), (("x", "--stride", "0"), "a positive integer"),
                          (("x", "--quantize", "int3"), "invalid choice: 'int3'")):
        with pytest.raises(SystemExit) as exit_:
            parse(*argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
