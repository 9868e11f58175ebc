"""The `mistral7b` command line, run as the installed executable in subprocesses.

Each check compares the command's output with an independent computation: the same thing done
in-process through the Python API, transformers, or the tensors themselves. Runs of the bundled
default model cost a model load each, so there are few of them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.loading import load_model  # noqa: E402
from mistral7b.sampling import SamplingParams  # noqa: E402

EXE = Path(sys.executable).parent / "mistral7b"
if not EXE.exists():  # not installed as a console script: run the module
    COMMAND = [sys.executable, "-m", "mistral7b.cli"]
else:
    COMMAND = [str(EXE)]
KiB, GiB = 2**10, 2**30


def run(*args, input=None, timeout=300, check=None):
    result = subprocess.run([*COMMAND, *map(str, args)], input=input, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert result.returncode == check, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def one_error_line(result) -> str:
    """A runtime failure: exit 1 and exactly one line `mistral7b: error: ...` on stderr, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mistral7b: error: ")
    return lines[0]


# ---- fixtures: the default model in-process, small random checkpoints ---------------------------------


@pytest.fixture(scope="module")
def llm():
    return LLM(max_batch=1)


def _hf_mistral(path: Path, dtype=torch.float32, seed=0, **overrides) -> transformers.PreTrainedModel:
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
                  sliding_window=7, rope_theta=10000.0, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs)).to(dtype).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def hf_mistral(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_mistral")
    return _hf_mistral(path), path


@pytest.fixture(scope="module")
def hf_llama_short(tmp_path_factory):
    """A random Llama with a 32-token context, tied embeddings, no tokenizer."""
    path = tmp_path_factory.mktemp("hf_llama")
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=77, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model, path


def logits(model, n=24, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


# ---- generate / chat on the default model ---------------------------------------------------------------


def test_generate_streams_the_greedy_completion(llm):
    prompt = "The capital of France is"
    expected = llm.generate(prompt, SamplingParams(max_tokens=12))[0]
    result = run("generate", prompt, "--max-tokens", 12, check=0)
    assert result.stdout == expected.text + "\n"
    # no --model: one line on stderr names the default model and how to use Mistral 7B instead
    notes = [line for line in result.stderr.splitlines() if "default model" in line]
    assert len(notes) == 1
    assert "SmolLM2" in notes[0] and "huggingface-cli download mistralai/Mistral-7B-Instruct-v0.2" in notes[0]


def test_generate_json_chat_prompt_from_stdin(llm):
    question = "Name a colour."
    messages = [{"role": "user", "content": question}]
    expected = llm.chat(messages, SamplingParams(max_tokens=6))
    result = run("generate", "-", "--chat", "--json", "--max-tokens", 6, input=question + "\n", check=0)
    data = json.loads(result.stdout)
    assert data["prompt_token_ids"] == llm.chat_prompt(messages)
    assert data["token_ids"] == expected.token_ids
    assert data["text"] == expected.text
    assert data["finish_reason"] == expected.finish_reason
    assert llm.tokenizer.decode(data["token_ids"]) == data["text"]
    if data["finish_reason"] == "length":
        assert len(data["token_ids"]) == 6
    assert data["usage"] == {"prompt_tokens": len(data["prompt_token_ids"]), "completion_tokens": len(data["token_ids"])}
    timings = data["timings"]
    assert timings["prefill_tok_s"] > 0 and timings["decode_tok_s"] > 0
    assert timings["prefill_tok_s"] == pytest.approx(len(data["prompt_token_ids"]) / timings["prefill_s"])
    assert timings["decode_tok_s"] == pytest.approx((len(data["token_ids"]) - 1) / timings["decode_s"])


def test_generate_json_schema_output_validates(tmp_path):
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["colour", "count"],
              "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 99}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    result = run("generate", "Pick a colour and a number.", "--chat", "--json-schema", path, "--json",
                 "--temperature", 1.0, "--max-tokens", 40, check=0)
    data = json.loads(result.stdout)
    assert data["finish_reason"] == "stop"
    jsonschema.validate(json.loads(data["text"]), schema)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text('{"type": "object", "minProperties": "two"}')
    for name, message in (("missing.json", "no such file"), ("bad.json", "not valid JSON"), ("wrong.json", "json_schema")):
        assert message in one_error_line(run("generate", "hi", "--json-schema", tmp_path / name))


def test_chat_piped_keeps_history(llm):
    system, q1, q2, q3 = "Answer briefly.", "What is the capital of France?", "And of Germany?", "What is 2+2?"
    params = SamplingParams(max_tokens=6)
    sys_msg = {"role": "system", "content": system}
    a1 = llm.chat([sys_msg, {"role": "user", "content": q1}], params).text
    a2 = llm.chat([sys_msg, {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                   {"role": "user", "content": q2}], params).text
    a3 = llm.chat([sys_msg, {"role": "user", "content": q3}], params).text  # after /reset: no history
    session = f"/system {system}\n{q1}\n\n{q2}\n/reset\n{q3}\n/exit\nnever read\n"
    result = run("chat", "--max-tokens", 6, input=session, check=0)
    assert result.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "> " not in result.stdout  # no prompt marker when stdin is not a terminal


def test_chat_ctrl_c_stops_the_answer_not_the_session():
    """Ctrl-C cuts the first answer short; the session takes the next message, whose answer is cut too.

    stdout is read in this thread, non-blocking: the chat writes an answer's closing newline to stdout
    before its "answer stopped" note to stderr, so once the note is seen, everything the first answer
    wrote is already in the pipe, and reading what is there takes all of it. (A reader thread could
    still be holding those bytes; then the late newline looked like the start of the second answer,
    the second Ctrl-C landed while the chat waited for input, and the chat exited with 130.)
    """
    import threading

    proc = subprocess.Popen([*COMMAND, "chat", "--max-tokens", "400"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.set_blocking(proc.stdout.fileno(), False)
    out, err = bytearray(), []

    def read_stdout():
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            out.extend(chunk)

    def drain_stderr():
        for line in proc.stderr:
            err.append(line.decode())

    stderr_thread = threading.Thread(target=drain_stderr, daemon=True)
    stderr_thread.start()

    def wait_for(condition, what):
        deadline = time.monotonic() + 120
        while True:
            read_stdout()
            if condition():
                return
            assert proc.poll() is None and time.monotonic() < deadline, f"waiting for {what}: {''.join(err)}"
            time.sleep(0.05)

    def stopped():
        return sum("answer stopped" in line for line in err)

    try:
        proc.stdin.write(b"Write a very long story about a dragon.\n")
        proc.stdin.flush()
        wait_for(lambda: len(out) > 0, "the first answer")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: stopped() == 1, "the first answer to stop")
        read_stdout()  # the note came after the answer's last byte: all of it is in the pipe now
        first = bytes(out)
        proc.stdin.write(b"Tell me about the sea.\n")
        proc.stdin.flush()
        wait_for(lambda: len(out) > len(first), "the second answer")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: stopped() == 2, "the second answer to stop")
        proc.stdin.close()
        proc.wait(timeout=60)
        read_stdout()
        stderr_thread.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(err)
    assert "Traceback" not in "".join(err)
    text = bytes(out).decode()
    assert first.decode().endswith("\n") and text.endswith("\n") and len(text) > len(first)
    assert len(text) < 1500  # both answers cut well short of 400 tokens


# ---- generate on small random checkpoints (no tokenizer: --token-ids) -----------------------------------


def test_generate_token_ids_matches_in_process(hf_llama_short):
    _, path = hf_llama_short
    prompt = [5, 17, 3, 60, 2]
    expected = LLM(path, max_batch=1).generate(prompt, SamplingParams(max_tokens=6))[0]
    data = json.loads(run("generate", "--model", path, "--token-ids", "5,17,3,60,2", "-n", 6, "--json", check=0).stdout)
    assert data["token_ids"] == expected.token_ids
    assert data["finish_reason"] == "length" and len(data["token_ids"]) == 6
    plain = run("generate", "--model", path, "--token-ids", "5 17 3 60 2", "-n", 6, check=0)
    assert plain.stdout.split() == [str(t) for t in expected.token_ids]
    assert "default model" not in plain.stderr


def test_prompt_too_long_is_a_runtime_error(hf_llama_short):
    _, path = hf_llama_short
    ids = ",".join(str(i % 70) for i in range(30))
    line = one_error_line(run("generate", "--model", path, "--token-ids", ids, "-n", 8))
    assert "30" in line and str(30 + 8) in line and "32" in line  # prompt, prompt + max_tokens, context


def test_text_prompt_without_tokenizer_says_what_to_do(hf_llama_short):
    _, path = hf_llama_short
    assert "--token-ids" in one_error_line(run("generate", "--model", path, "hello"))


# ---- info ------------------------------------------------------------------------------------------------


def test_info_json_random_checkpoints(hf_mistral, hf_llama_short):
    for model, path in (hf_mistral, hf_llama_short):
        data = json.loads(run("info", "--model", path, "--json", "--seq-len", 100, "--device", "cpu", check=0).stdout)
        n_params = sum(p.numel() for p in model.parameters())
        assert data["n_params"] == n_params
        assert data["stored"]["params"] == n_params
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            assert data["stored"]["bytes"] == sum(f.get_tensor(k).nbytes for k in f.keys()
                                                  if not (model.config.tie_word_embeddings and k == "lm_head.weight"))
        c = model.config
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
        assert data["kv_bytes_per_token"] == per_token  # float32 on cpu
        assert data["kv_cache_bytes"]["linear"] == 100 * per_token
        window = getattr(c, "sliding_window", None) if c.model_type == "mistral" else None
        assert data["attention_window"] == window
        assert data["kv_cache_bytes"]["rolling"] == (min(100, window) if window else 100) * per_token
        assert data["config"]["vocab_size"] == c.vocab_size and data["config"]["n_layers"] == c.num_hidden_layers


def test_info_default_model(llm):
    result = run("info", check=0)
    n_params = llm.model.config.n_params  # the model runs quantized: its weights are buffers, not parameters
    assert f"{n_params:,}" in result.stdout
    assert "SmolLM2" in result.stderr  # the default-model note


# ---- memory ----------------------------------------------------------------------------------------------


def test_memory_json_v01_32k():
    data = json.loads(run("memory", "--preset", "mistral-7b-v0.1", "--seq-len", 32768, "--json", check=0).stdout)
    (row,) = data["seq_lens"]
    assert row["seq_len"] == 32768
    assert row["kv_cache_bytes"]["gqa"] == 4 * 2**30
    assert row["kv_cache_bytes"]["gqa_rolling"] == 2**29
    assert row["kv_cache_bytes"]["mha"] == 16 * 2**30
    assert data["kv_bytes_per_token"] == {"gqa": 128 * KiB, "mha": 512 * KiB}
    assert data["receptive_field"] == 32 * 4096
    # attention FLOPs from the closed forms, independently: 4 x L x H x hd x pairs
    n, w, per_pair = 32768, 4096, 4 * 32 * 32 * 128
    assert row["attention_flops"]["full"] == per_pair * n * (n + 1) // 2
    assert row["attention_flops"]["window"] == per_pair * (w * (w + 1) // 2 + (n - w) * w)


def test_memory_human_output_and_explicit_config():
    out = run("memory", "--seq-len", 4096, 8192, 32768, 131072, check=0).stdout
    gqa = next(line for line in out.splitlines() if line.strip().startswith("GQA (8"))
    # SPEC.md's table: 128 KiB per token; 0.5, 1, 4, 16 GiB at 4k, 8k, 32k, 128k
    assert gqa.split()[4:] == ["128", "KiB", "512", "MiB", "1", "GiB", "4", "GiB", "16", "GiB"]
    rolling = next(line for line in out.splitlines() if "rolling buffer (W=4096)" in line)
    assert rolling.split()[-8:] == ["512", "MiB"] * 4
    assert "32 layers x 4096 = 131072" in out
    data = json.loads(run("memory", "--dim", 256, "--n-layers", 4, "--n-heads", 8, "--n-kv-heads", 2, "--window", 16,
                          "--seq-len", 100, "--batch", 3, "--dtype-bytes", 4, "--json", check=0).stdout)
    assert data["config"]["head_dim"] == 32 and data["config"]["sliding_window"] == 16
    row = data["seq_lens"][0]
    assert row["kv_cache_bytes"]["gqa"] == 3 * 2 * 4 * 2 * 32 * 4 * 100
    assert row["kv_cache_bytes"]["gqa_rolling"] == 3 * 2 * 4 * 2 * 32 * 4 * 16
    none = json.loads(run("memory", "--window", "none", "--seq-len", 8192, "--json", check=0).stdout)
    assert none["seq_lens"][0]["kv_cache_bytes"]["gqa_rolling"] == GiB and none["receptive_field"] is None


def test_memory_of_a_checkpoint(hf_mistral):
    model, path = hf_mistral
    data = json.loads(run("memory", "--model", path, "--seq-len", 50, "--json", check=0).stdout)
    c = model.config
    assert data["seq_lens"][0]["kv_cache_bytes"]["gqa_rolling"] == 2 * c.num_hidden_layers * 2 * 16 * 2 * 7


# ---- convert ---------------------------------------------------------------------------------------------


def test_convert_hf_mistral_hf_round_trip(tmp_path):
    src = tmp_path / "src"
    hf_model = _hf_mistral(src, dtype=torch.bfloat16, seed=5)
    (src / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    mistral, back = tmp_path / "mistral", tmp_path / "back"
    result = run("convert", src, mistral, check=0)  # HF -> the other layout: Mistral
    assert result.stdout.strip() == str(mistral)
    assert (mistral / "params.json").is_file() and (mistral / "consolidated.safetensors").is_file()
    assert (mistral / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    run("convert", mistral, back, check=0)  # Mistral -> HF
    assert (back / "config.json").is_file()
    with safe_open(str(mistral / "consolidated.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # the source's dtype
    source = load_model(src, dtype=torch.bfloat16)
    for converted in (mistral, back):
        assert torch.equal(logits(load_model(converted, dtype=torch.bfloat16)), logits(source))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    for name, t in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], t), name

    # a non-empty DST is refused without --force
    line = one_error_line(run("convert", mistral, back))
    assert "--force" in line
    run("convert", mistral, back, "--force", "--dtype", "float32", "--verify", check=0)
    assert torch.equal(logits(load_model(back)), logits(load_model(src, dtype=torch.float32)))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF q/k rows -> GGUF's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf_model, kind: str) -> None:
    import gguf

    c = hf_model.config
    state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("random")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)

    def add(name, array, norm=False):
        if norm or kind == "F32":
            writer.add_tensor(name, array.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"], norm=True)
    add("output.weight", state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], norm=True)
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], norm=True)
        add(f"blk.{i}.attn_q.weight", llama_cpp_permute(state[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", llama_cpp_permute(state[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0"])
def test_convert_gguf(tmp_path, hf_mistral, kind):
    hf_model, _ = hf_mistral
    src = tmp_path / f"model-{kind}.gguf"
    write_gguf(src, hf_model, kind)
    to = "mistral" if kind == "F16" else "hf"
    dst = tmp_path / "out"
    result = run("convert", src, dst, *(["--to", to] if to == "mistral" else []), check=0)
    assert "tokenizer is not converted" in result.stderr
    assert (dst / ("params.json" if to == "mistral" else "config.json")).is_file()
    assert torch.equal(logits(load_model(dst)), logits(load_model(src, quantize=False)))  # the GGUF's own (dequantized) values
    if kind == "F32":  # exact weights: transformers on the converted folder reproduces the HF source
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
        ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a, b = reloaded(ids).logits, hf_model(ids).logits
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_fetch_prints_the_default_model_path():
    from mistral7b.default_model import default_model_path

    result = run("fetch", check=0)
    assert Path(result.stdout.strip()) == default_model_path(download=False)


# ---- bad inputs ------------------------------------------------------------------------------------------


def test_missing_model_path(tmp_path):
    line = one_error_line(run("info", "--model", tmp_path / "nope"))
    assert str(tmp_path / "nope") in line


def test_corrupt_files(tmp_path, hf_mistral):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert str(bad) in one_error_line(run("info", "--model", bad))
    _, good = hf_mistral
    folder = tmp_path / "truncated"
    folder.mkdir()
    (folder / "config.json").write_bytes((good / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:5000])
    assert "model.safetensors" in one_error_line(run("generate", "--model", folder, "--token-ids", "1 2 3", "-n", 2))


def test_unknown_preset():
    result = run("memory", "--preset", "mistral-9b")
    assert result.returncode in (1, 2) and "mistral-9b" in result.stderr and "Traceback" not in result.stderr


def test_negative_max_tokens_is_a_usage_error():
    result = run("generate", "hi", "--max-tokens", "-5")
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr
    assert "--max-tokens" in result.stderr.splitlines()[-1] and "-5" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("args", [["generate", "hi", "--top-p", "1.5"], ["generate", "hi", "--temperature", "-1"],
                                  ["memory", "--seq-len", "0"], ["chat", "--top-k", "x"], ["serve", "--port", "70000"],
                                  ["convert", "a", "b", "--to", "gguf"], ["frobnicate"], [],
                                  ["generate", "hi", "--threads", "0"]])
def test_bad_usage_exits_2(args, capsys):
    """In-process (argparse fails before any model work), to spare a process start per case."""
    from mistral7b import cli

    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_lists_every_flag_with_its_default(capsys):
    """In-process: every subcommand's --help names each of its options, and the default of each."""
    from mistral7b import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        if name == "bench":
            continue
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for action in sub._actions:
            if not action.option_strings or action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.option_strings[-1] in text, (name, action.option_strings)
            if action.dest != "version" and action.nargs != 0:  # flags say what they do, with no default
                assert f"(default: {action.default})" in text, (name, action.dest)
        if "--no-quantize-head" in text:
            assert "(default: True)" not in text.split("--no-quantize-head", 1)[1][:120], name


def _parses(argv) -> tuple[bool, str]:
    """(whether argparse accepts `argv`, its error text)."""
    from mistral7b import cli

    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli.build_parser().parse_args(argv)
        return True, ""
    except SystemExit:
        return False, err.getvalue()


def test_sampling_flags_share_the_engine_check():
    """argparse refuses exactly what SamplingParams (the check the API's requests go through) refuses,
    in its words: --repetition-penalty 0 is a usage error, as is 1e-40."""
    from mistral7b.sampling import SamplingParamsError

    rng = random.Random()
    cases = [("--repetition-penalty", "repetition_penalty", float, t) for t in ("0", "1e-40", "-1", "nan", "1.3", "4e38")]
    cases += [("--temperature", "temperature", float, t) for t in ("-0.5", "inf", "0", "1e-50")]
    cases += [("--top-p", "top_p", float, t) for t in ("0", "1.5", "1", "x")] + [("--top-k", "top_k", int, t) for t in ("-1", "2.5")]
    cases += [(flag, field, float, f"{rng.uniform(-1.5, 2.5):.3f}") for flag, field in
              (("--temperature", "temperature"), ("--top-p", "top_p"), ("--min-p", "min_p"),
               ("--repetition-penalty", "repetition_penalty")) for _ in range(3)]
    cases += [("--max-tokens", "max_tokens", int, str(rng.randint(-3, 3))), ("--top-k", "top_k", int, str(rng.randint(-3, 3)))]
    for flag, field, kind, text in cases:
        try:
            SamplingParams(**{field: kind(text)})
            problem = None
        except SamplingParamsError as e:
            problem = str(e).removeprefix(field + " ")
        except ValueError:
            problem = "expected "  # not a number of that kind at all
        accepted, err = _parses(["generate", "hi", flag, text])
        assert accepted == (problem is None), (flag, text, err)
        if problem is not None:
            assert problem in err and "Traceback" not in err, (flag, text, err)


def test_empty_prompt_is_refused_before_the_model_loads(monkeypatch, capsys):
    from mistral7b import cli
    from mistral7b.cli import generate

    monkeypatch.setattr(generate, "load_llm", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["generate", ""]) == 1
    assert "the prompt is empty" in capsys.readouterr().err
    assert cli.main(["generate", " , ", "--token-ids"]) == 1
    assert "no token ids" in capsys.readouterr().err


def test_serve_answers_with_the_api_key(hf_llama_short):
    import socket
    import urllib.error
    import urllib.request

    _, path = hf_llama_short
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    max_seq_len = random.randint(8, 31)  # below the model's context of 32
    proc = subprocess.Popen([*COMMAND, "serve", "--model", str(path), "--port", str(port), "--api-key", "k3y",
                             "--model-name", "tiny", "--log-level", "warning", "--max-seq-len", str(max_seq_len)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/models"
    try:
        body, deadline = None, time.monotonic() + 120
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer k3y"})) as r:
                    body = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert body is not None, "the server did not come up"
        assert [m["id"] for m in body["data"]] == ["tiny"]
        assert body["data"][0]["max_model_len"] == max_seq_len  # the cache budget reached the engine
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url)
        assert denied.value.code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_threads_sets_torch_threads(capsys):
    """--threads N is torch's thread count for the run (CPU decode then uses at most the physical cores)."""
    import torch

    from mistral7b import cli

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cli.main(["generate", "hi", "--threads", "1", "--max-tokens", "2", "--device", "cpu"]) in (0, None)
        assert torch.get_num_threads() == 1 and capsys.readouterr().out.strip()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flag, want", [([], False), (["--compile"], True)])
def test_compile_flag_reaches_the_engine_config(monkeypatch, flag, want):
    """generate and chat build their engine with --compile (Inductor on a CPU); serve reads it too."""
    from mistral7b import cli, llm
    from mistral7b.cli.common import load_llm

    seen = []
    monkeypatch.setattr(llm, "LLM", lambda *a, engine_config=None, **k: seen.append(engine_config))
    for command in (["generate", "hi"], ["chat"]):
        load_llm(cli.build_parser().parse_args([*command, "--device", "cpu", *flag]))
    assert [config.compile for config in seen] == [want, want]
    assert cli.build_parser().parse_args(["serve", *flag]).compile is want


@pytest.mark.parametrize("flag, want", [([], "auto"), (["--kv-cache-dtype", "float16"], "float16")])
def test_kv_cache_dtype_flag_reaches_the_engine_config(monkeypatch, flag, want):
    """generate and chat build their engine with --kv-cache-dtype; serve and bench read it; its choices are
    the engine's."""
    from mistral7b import cli, llm
    from mistral7b.cli.common import KV_CACHE_DTYPES, load_llm
    from mistral7b.engine import config

    seen = []
    monkeypatch.setattr(llm, "LLM", lambda *a, engine_config=None, **k: seen.append(engine_config))
    for command in (["generate", "hi"], ["chat"]):
        load_llm(cli.build_parser().parse_args([*command, "--device", "cpu", *flag]))
    assert [c.kv_cache_dtype for c in seen] == [want, want]
    for command in ("serve", "bench"):
        assert cli.build_parser().parse_args([command, *flag]).kv_cache_dtype == want
    assert KV_CACHE_DTYPES == config.KV_CACHE_DTYPES
    assert not _parses(["generate", "hi", "--kv-cache-dtype", "bfloat16"])[0]

