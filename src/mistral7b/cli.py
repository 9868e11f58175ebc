"""`mistral7b`: the command line.

    mistral7b generate "The capital of France is"      stream a completion (--json for one object)
    mistral7b chat                                      interactive, multi-turn; /system, /reset, /exit
    mistral7b info                                      config, parameters, bytes, KV cache of a model
    mistral7b memory --seq-len 32768                    KV cache / attention FLOP calculator (the paper's numbers)
    mistral7b convert SRC DST --to hf|mistral           HF <-> Mistral layouts, GGUF -> either
    mistral7b serve                                     OpenAI-compatible HTTP server
    mistral7b fetch                                     download the bundled default model now

stdout carries only the answer (or JSON, or a path); notes and progress bars go to stderr. Exit codes:
0 success, 1 runtime failure (one line `mistral7b: error: ...`; --debug shows the traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

PROG = "mistral7b"
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEFAULT_SEQ_LENS = [4096, 8192, 32768, 131072]


class CLIError(Exception):
    """A runtime failure with a message for the user (exit code 1)."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ---- argparse types: invalid values are usage errors (exit 2) -----------------------------------


def _ranged(kind, ok, expected: str):
    """An argparse type: parse with `kind`, accept when `ok(value)`, else a usage error naming the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


positive_int = _ranged(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _ranged(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _ranged(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
probability = _ranged(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
unit_interval = _ranged(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def window_size(text: str) -> int | str:
    """A window W > 0, or "none" (full attention)."""
    if text.lower() in ("none", "0", "off", "full"):
        return "none"
    return positive_int(text)


def port_number(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {value}")
    return value


# ---- shared helpers -------------------------------------------------------------------------------


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def default_model_note() -> str:
    from .default_model import DESCRIPTION

    return (
        f"no --model given: using the default model {DESCRIPTION}; for Mistral 7B pass --model with a local "
        "HF or Mistral folder, a .gguf file, or a hub id after "
        "`huggingface-cli download mistralai/Mistral-7B-Instruct-v0.2`"
    )


def _model_source(args, download: bool = True):
    """--model, or the bundled default (announced on stderr)."""
    if args.model is not None:
        return args.model
    from .default_model import default_model_path

    _note(default_model_note())
    return default_model_path(download=download)


def _device(args):
    import torch

    if args.device in (None, "auto"):
        return None
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CLIError(f"invalid --device {args.device!r} ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    return device


def _dtype_name(args) -> str | None:
    return None if args.dtype in (None, "auto") else args.dtype


def _load_llm(args, max_batch: int = 1, compile: bool = False, max_seq_len: int | None = None):
    from .llm import LLM

    source = _model_source(args)
    t0 = time.perf_counter()
    llm = LLM(source, device=_device(args), dtype=_dtype_name(args), max_batch=max_batch, compile=compile,
              max_seq_len=max_seq_len)
    llm.load_seconds = time.perf_counter() - t0
    return llm


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        stop=list(args.stop or []),
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )


def _print_json(data, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _timings(request, load_seconds: float | None = None) -> dict:
    n_prompt, n_out = len(request.prompt_ids), len(request.output_ids)
    prefill = (request.first_token_time - request.arrival_time) if request.first_token_time else None
    decode = (request.finish_time - request.first_token_time) if request.first_token_time and request.finish_time else None
    return {
        "load_s": load_seconds,
        "prefill_s": prefill,
        "decode_s": decode,
        # the first output token comes out of the prefill; decode steps make the others
        "prefill_tok_s": n_prompt / prefill if prefill else None,
        "decode_tok_s": (n_out - 1) / decode if decode and n_out > 1 else None,
    }


# ---- generate -----------------------------------------------------------------------------------------


def _parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--token-ids: the prompt must be integers separated by spaces or commas, got {text[:40]!r}") from None
    if not ids:
        raise ValueError("--token-ids: the prompt holds no token ids")
    return ids


def cmd_generate(args) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    params = _sampling(args)
    chat = args.chat or args.safe_prompt
    if args.token_ids and chat:
        raise CLIError("--token-ids cannot be combined with --chat or --safe-prompt")
    llm = _load_llm(args)
    if llm.tokenizer is None and not args.token_ids:
        raise CLIError(f"{llm.source}: this checkpoint has no tokenizer; pass the prompt as token ids with "
                       "--token-ids, or put a tokenizer.json or tokenizer.model next to the weights")
    if args.token_ids:
        ids = _parse_token_ids(prompt)
    elif chat:
        ids = llm.chat_prompt([{"role": "user", "content": prompt}], safe_prompt=args.safe_prompt)
    else:
        ids = llm.encode_prompt(prompt)
    request, deltas = llm.stream_request(ids, params)
    out = sys.stdout
    interrupted = False
    try:
        for delta in deltas:
            if not args.json:
                out.write(delta)
                out.flush()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        deltas.close()  # aborts the request if it is still running
    timings = _timings(request, llm.load_seconds)
    if args.json:
        _print_json({
            "model": str(llm.source),
            "prompt_token_ids": request.prompt_ids,
            "text": request.text,
            "token_ids": request.output_ids,
            "finish_reason": request.finish_reason,
            "usage": {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(request.output_ids)},
            "timings": timings,
        }, indent=None)  # one line: easy to pipe into jq or read line by line
    else:
        if llm.tokenizer is None:  # no text to show: the ids are the answer
            out.write(" ".join(map(str, request.output_ids)))
        out.write("\n")
        out.flush()
    if args.stats and not args.json:
        _note(_stats_line(request, timings))
    if interrupted:
        _note("interrupted")
        return 130
    return 0


def _stats_line(request, timings) -> str:
    def rate(x):
        return f"{x:.1f} tok/s" if x else "-"

    return (f"prefill {len(request.prompt_ids)} tokens at {rate(timings['prefill_tok_s'])}, "
            f"decode {len(request.output_ids)} tokens at {rate(timings['decode_tok_s'])} "
            f"(finish: {request.finish_reason}; model loaded in {timings['load_s']:.1f} s)")


# ---- chat -----------------------------------------------------------------------------------------------

CHAT_HELP = "commands: /system TEXT (set the system prompt), /reset (forget the conversation), /exit; " \
            "Ctrl-C stops an answer, Ctrl-D exits"


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _load_llm(args)
    if llm.tokenizer is None:
        raise CLIError(f"{llm.source}: this checkpoint has no tokenizer, so it has no chat format; "
                       "put a tokenizer.json or tokenizer.model next to the weights")
    tty = sys.stdin.isatty()
    out = sys.stdout
    system: str | None = args.system
    history: list[dict] = []
    if tty:
        _note(f"chatting with {llm.source}; {CHAT_HELP}")
    while True:
        try:
            if tty:
                line = input("> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    break  # end of input
        except EOFError:
            if tty:
                print(file=sys.stderr)
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                break
            if command == "/reset":
                history.clear()
                _note("conversation cleared")
            elif command == "/system":
                system = rest.strip() or None
                _note(f"system prompt {'set' if system else 'cleared'}")
            elif command in ("/help", "/?"):
                _note(CHAT_HELP)
            else:
                _note(f"unknown command {command!r}; {CHAT_HELP}")
            continue
        user = {"role": "user", "content": line}
        messages = ([{"role": "system", "content": system}] if system else []) + history + [user]
        try:
            ids = llm.chat_prompt(messages, safe_prompt=args.safe_prompt)
            request, deltas = llm.stream_request(ids, params)
        except ValueError as e:  # e.g. the conversation outgrew the context: the session goes on
            _note(f"error: {_one_line(e)}; /reset starts a new conversation")
            continue
        interrupted = False
        try:
            for delta in deltas:
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            deltas.close()  # aborts the request if Ctrl-C stopped it
        out.write("\n\n" if tty else "\n")
        out.flush()
        if interrupted:
            _note("answer stopped (Ctrl-C); the part shown is kept in the conversation")
        answer = request.text
        if answer.strip():
            history += [user, {"role": "assistant", "content": answer}]
    return 0


# ---- info -----------------------------------------------------------------------------------------------


def _checkpoint_format(checkpoint) -> str:
    path = Path(checkpoint.path)
    if path.is_file():
        return "gguf"
    return "mistral" if (path / "params.json").is_file() else "hf"


def open_for_info(source):
    """(checkpoint, GGUF reader or None): a .gguf file is parsed once for both the config and the
    tensor headers (parsing its vocabulary is the slow part)."""
    from .loading import Checkpoint, gguf, open_checkpoint

    path = Path(source).expanduser()
    if path.is_file() and (path.suffix == ".gguf" or gguf.is_gguf(path)):
        from .config import from_gguf_metadata

        reader = gguf.read(path)
        names = {t.name for t in reader.tensors}
        config = from_gguf_metadata(path, gguf.metadata(reader), has_output="output.weight" in names)
        return Checkpoint(path, config, None, len(reader.tensors)), reader
    return open_checkpoint(source), None


def stored_tensors(checkpoint, reader=None) -> dict:
    """Parameter count and bytes by storage type, from the weight files' headers (no weights read)."""
    from .loading import gguf, hf

    fmt = _checkpoint_format(checkpoint)
    config = checkpoint.config
    tied_names = ("output.weight", "lm_head.weight")
    entries: list[tuple[str, str, int, int]] = []  # name, type, numel, bytes
    if fmt == "gguf":
        reader = reader or gguf.read(checkpoint.path)
        for t in reader.tensors:
            entries.append((t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)))
    else:
        if fmt == "hf":
            files = hf.weight_files(checkpoint.path)
        else:
            st = checkpoint.path / "consolidated.safetensors"
            files = [st] if st.is_file() else [checkpoint.path / "consolidated.00.pth"]
        for file in files:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        s = f.get_slice(name)
                        numel = 1
                        for d in s.get_shape():
                            numel *= d
                        kind = s.get_dtype()
                        entries.append((name, kind, numel, numel * sizes.get(kind, 0)))
            else:
                import torch

                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for name, t in state.items():
                    kind = str(t.dtype).removeprefix("torch.")
                    entries.append((name, kind, t.numel(), t.numel() * t.element_size()))
    by_type: dict[str, dict[str, int]] = {}
    total = 0
    for name, kind, numel, nbytes in entries:
        if config.tie_embeddings and name in tied_names:
            continue  # a tied head stored a second time is the same parameters
        slot = by_type.setdefault(kind, {"tensors": 0, "params": 0, "bytes": 0})
        slot["tensors"] += 1
        slot["params"] += numel
        slot["bytes"] += nbytes
        total += numel
    return {"params": total, "bytes": sum(v["bytes"] for v in by_type.values()), "by_type": by_type}


def cmd_info(args) -> int:
    import torch

    from . import memory
    from .llm import default_device, resolve_dtype
    source = _model_source(args)
    checkpoint, reader = open_for_info(source)
    config = checkpoint.config
    try:
        stored = stored_tensors(checkpoint, reader)
    except Exception as e:  # noqa: BLE001 - the header summary is a nicety; the config is the point
        if args.debug:
            raise
        stored = None
        _note(f"could not read the tensor headers ({_one_line(e)}); figures below come from the config")
    device = _device(args) or default_device()
    dtype = resolve_dtype(_dtype_name(args), device)
    element = torch.empty((), dtype=dtype).element_size()
    seq_len = args.seq_len or config.max_seq_len
    windows = config.layer_windows()
    data = {
        "source": str(checkpoint.path),
        "format": _checkpoint_format(checkpoint),
        "config": config.to_dict(),
        "n_params": config.n_params,
        "stored": stored,
        "weight_bytes": memory.weight_bytes(config),
        "load_dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_token": memory.kv_bytes_per_token(config, element),
        "kv_bytes_per_token_by_dtype": {"float32": memory.kv_bytes_per_token(config, 4),
                                        "bfloat16": memory.kv_bytes_per_token(config, 2)},
        "attention_window": config.sliding_window if not isinstance(config.sliding_window, tuple) else list(windows),
        "receptive_field": memory.receptive_field(config),
        "seq_len": seq_len,
        "kv_cache_bytes": {
            "linear": memory.kv_cache_bytes(config, seq_len, 1, element),
            "rolling": memory.kv_cache_bytes(config, seq_len, 1, element, rolling=True),
        },
    }
    if args.json:
        _print_json(data)
        return 0
    fb, fc = memory.format_bytes, memory.format_count
    c = config
    window = c.sliding_window
    window_text = ("none (full attention)" if window is None else
                   f"{window} tokens" if not isinstance(window, tuple) else
                   ", ".join("full" if w is None else str(w) for w in window))
    lines = [
        f"model           {checkpoint.path} ({data['format']})",
        f"name            {c.name}",
        f"architecture    dim {c.dim}, {c.n_layers} layers, head_dim {c.head_dim}, hidden_dim {c.hidden_dim} (SwiGLU)",
        f"attention       {c.n_heads} query heads / {c.n_kv_heads} KV heads "
        f"({'GQA ' + str(c.n_heads // c.n_kv_heads) + ':1' if c.n_kv_heads < c.n_heads else 'MHA'}), "
        f"window {window_text}",
        f"vocab           {c.vocab_size}; rope_theta {c.rope_theta:g}; norm_eps {c.norm_eps:g}; "
        f"context {c.max_seq_len}; tied embeddings {'yes' if c.tie_embeddings else 'no'}",
        f"parameters      {c.n_params:,} ({fc(c.n_params)})",
        "weights         " + ", ".join(f"{k} {fb(v)}" for k, v in data["weight_bytes"].items() if k != "float16"),
    ]
    if stored is not None:
        kinds = ", ".join(f"{k} {v['tensors']} tensors / {fb(v['bytes'])}" for k, v in
                          sorted(stored["by_type"].items(), key=lambda kv: -kv[1]["bytes"]))
        lines.append(f"stored          {stored['params']:,} parameters in {fb(stored['bytes'])}: {kinds}")
    lines += [
        f"KV per token    {fb(data['kv_bytes_per_token'])} in {data['load_dtype']} "
        f"(= 2 x {c.n_layers} layers x {c.n_kv_heads} KV heads x {c.head_dim} x {element} bytes)",
        f"KV cache        at {seq_len} tokens: linear {fb(data['kv_cache_bytes']['linear'])}, "
        f"rolling buffer {fb(data['kv_cache_bytes']['rolling'])}"
        + ("" if window is not None else " (no window: the cache grows with the sequence)"),
    ]
    if data["receptive_field"]:
        lines.append(f"receptive field {data['receptive_field']} tokens (n_layers x W)")
    print("\n".join(lines))
    return 0


# ---- memory ---------------------------------------------------------------------------------------------

MEMORY_EPILOG = """\
formulas:
  KV cache   = 2 (K,V) x n_layers x n_kv_heads x head_dim x bytes x tokens x batch
               MHA uses n_kv_heads = n_heads; the rolling buffer keeps min(tokens, W) positions per layer
  attention  = 4 x n_layers x n_heads x head_dim x pairs x batch   (QK^T and PV, 2 FLOPs per multiply-add)
               pairs = sum over queries i < n of the keys it sees:
               full causal: sum min(i+1, n) = n(n+1)/2;  sliding window: sum min(i+1, W)
  receptive field = n_layers x W  (information moves up to W tokens per layer)
"""


def memory_config(args):
    from .config import preset
    from .loading import open_checkpoint

    if args.model is not None:
        base = open_checkpoint(args.model).config
    else:
        base = preset(args.preset)
    overrides = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "hidden_dim": args.hidden_dim, "vocab_size": args.vocab_size,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    if args.window is not None:
        changes["sliding_window"] = None if args.window == "none" else args.window
    if args.dim is not None and args.head_dim is None:  # a new width: heads keep dim / n_heads
        changes["head_dim"] = args.dim // changes.get("n_heads", base.n_heads)
    if changes:
        changes["name"] = f"{base.name} (modified)"
    return base.with_(**changes) if changes else base


def cmd_memory(args) -> int:
    from . import memory

    config = memory_config(args)
    report = memory.report(config, args.seq_len, args.batch, args.dtype_bytes)
    if args.json:
        _print_json(report)
        return 0
    fb, fc = memory.format_bytes, memory.format_count
    c = config
    windows = report["windows"]
    w_text = "no window" if not windows else "window " + "/".join(map(str, windows))
    out = [f"{c.name}: {c.n_layers} layers, {c.n_heads} query heads / {c.n_kv_heads} KV heads x {c.head_dim}, "
           f"{w_text}; {args.dtype_bytes} bytes per element, batch {args.batch}", ""]
    rows = report["seq_lens"]
    width = max(15, *(len(f"{r['seq_len']}") + 2 for r in rows))  # fits "281.48 TFLOP"
    head = f"{'KV cache':34}{'per token':>12}" + "".join(f"{r['seq_len']:>{width}}" for r in rows)
    out.append(head)
    per_token = report["kv_bytes_per_token"]

    def line(label, first, values):
        return f"{label:34}{first:>12}" + "".join(f"{v:>{width}}" for v in values)

    out.append(line(f"  MHA ({c.n_heads} KV heads)", fb(per_token["mha"]), [fb(r["kv_cache_bytes"]["mha"]) for r in rows]))
    out.append(line(f"  GQA ({c.n_kv_heads} KV heads)", fb(per_token["gqa"]), [fb(r["kv_cache_bytes"]["gqa"]) for r in rows]))
    if windows:
        out.append(line(f"  GQA + rolling buffer (W={'/'.join(map(str, windows))})", "-",
                        [fb(r["kv_cache_bytes"]["gqa_rolling"]) for r in rows]))
        out.append(line("  rolling buffer saves", "", [f"{r['rolling_saving']:.3g}x" for r in rows]))
    out.append("")
    out.append(f"{'attention FLOPs, prefill':34}{'':>12}" + "".join(f"{r['seq_len']:>{width}}" for r in rows))
    out.append(line("  full causal attention", "", [fc(r["attention_flops"]["full"]) + "FLOP" for r in rows]))
    if windows:
        out.append(line(f"  sliding {w_text}", "", [fc(r["attention_flops"]["window"]) + "FLOP" for r in rows]))
        out.append(line("  full / window", "", [f"{r['attention_flops_ratio']:.3g}x" for r in rows]))
    out.append(line("  weights' matmuls (2 x params)", "", [fc(r["linear_flops"]) + "FLOP" for r in rows]))
    out.append(f"{'attention FLOPs, last decode step':34}{'':>12}" + "".join(f"{r['seq_len']:>{width}}" for r in rows))
    out.append(line("  full causal attention", "", [fc(r["decode_attention_flops_at_end"]["full"]) + "FLOP" for r in rows]))
    if windows:
        out.append(line(f"  sliding {w_text}", "", [fc(r["decode_attention_flops_at_end"]["window"]) + "FLOP"
                                                      for r in rows]))
    out.append("")
    rf = report["receptive_field"]
    if rf:
        desc = f"{c.n_layers} layers x {windows[0]}" if len(windows) == 1 else "sum of the layers' windows"
        out.append(f"receptive field: {desc} = {rf} tokens")
    else:
        out.append("receptive field: the whole sequence (full attention)")
    p = report["params"]
    out.append(f"parameters: {c.n_params:,} ({fc(c.n_params)}): feed-forward {fc(p['feed_forward'])}, "
               f"attention {fc(p['attention'])}, embeddings {fc(p['embeddings'])}; "
               f"weights {fb(report['weight_bytes']['bfloat16'])} ({report['weight_bytes']['bfloat16'] / 1e9:.2f} GB) in bf16")
    out.append("")
    out.append(MEMORY_EPILOG.rstrip())
    print("\n".join(out))
    return 0


# ---- convert --------------------------------------------------------------------------------------------

_CHECKPOINT_FILES = ("config.json", "params.json", "model.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.safetensors",
                     "consolidated.00.pth", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja")


def _clear_checkpoint_files(dst: Path) -> None:
    """With --force: remove the checkpoint and tokenizer files a loader would read, so nothing stale
    (say an old params.json next to a new config.json) changes what the folder means."""
    stale = [dst / n for n in _CHECKPOINT_FILES]
    stale += list(dst.glob("model-*-of-*.safetensors")) + list(dst.glob("tokenizer.model*"))
    for p in stale:
        if p.is_file() or p.is_symlink():
            p.unlink()


def _source_dtype(checkpoint, fmt: str):
    """The float dtype most of the source's bytes are stored in; GGUF (quantized) loads in float32."""
    import torch

    if fmt == "gguf":
        return torch.float32
    stored = stored_tensors(checkpoint)
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    floats = [(v["bytes"], names[k]) for k, v in stored["by_type"].items() if k in names]
    return max(floats, key=lambda x: x[0])[1] if floats else torch.float32


def cmd_convert(args) -> int:
    import torch

    from .llm import resolve_dtype
    from .loading import open_checkpoint
    from .loading.export import copy_tokenizer_files, save_hf, save_mistral, save_tokenizer

    checkpoint = open_checkpoint(args.src)  # a bad source fails here, before DST is touched
    fmt = _checkpoint_format(checkpoint)
    to = args.to or ("mistral" if fmt == "hf" else "hf")
    dst = Path(args.dst).expanduser()
    src_dir = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    if dst.exists() and not dst.is_dir():
        raise CLIError(f"{dst}: exists and is not a folder; DST must be a folder")
    if dst.exists() and dst.resolve() == src_dir.resolve():
        raise CLIError(f"{dst}: DST is the source's own folder; choose a new folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not args.force:
            raise CLIError(f"{dst}: folder is not empty; choose another DST or pass --force to replace "
                           "the checkpoint files in it")
        _clear_checkpoint_files(dst)
    dtype = resolve_dtype(_dtype_name(args), torch.device("cpu")) if _dtype_name(args) else _source_dtype(checkpoint, fmt)
    _note(f"converting {checkpoint.path} ({fmt}) to the {to} layout in {str(dtype).removeprefix('torch.')}")
    model = _assemble(checkpoint, dtype)
    dst.mkdir(parents=True, exist_ok=True)
    if to == "hf":
        extra = {}
        if fmt == "hf":  # keep the special token ids the source declared
            source_config = json.loads((checkpoint.path / "config.json").read_text())
            extra = {k: source_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source_config}
        save_hf(model, dst, **extra)
    else:
        save_mistral(model, dst)
    if fmt == "gguf":
        written = []
        try:
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_gguf(checkpoint.path)
            written = save_tokenizer(tokenizer, dst) if tokenizer is not None else []
        except Exception as e:  # noqa: BLE001 - the weights are converted; the tokenizer is a bonus
            if args.debug:
                raise
            _note(f"note: could not rebuild the tokenizer ({_one_line(e)})")
        if written:
            _note(f"tokenizer: rebuilt from the GGUF vocabulary as {', '.join(written)}")
        else:
            _note("note: the GGUF's tokenizer is not converted; copy tokenizer files into "
                  f"{dst} to use it with text prompts")
    else:
        copied = copy_tokenizer_files(src_dir, dst)
        _note(f"tokenizer files copied: {', '.join(copied)}" if copied else
              "note: the source folder has no tokenizer files to copy")
    if args.verify:
        _verify(model, dst, dtype)
    del model
    print(dst)
    return 0


def _assemble(checkpoint, dtype):
    """`load_model` on a checkpoint already opened (a GGUF is parsed once), with its error wrapping."""
    from .config import ModelLoadError
    from .loading import assemble

    try:
        return assemble(checkpoint, "cpu", dtype)
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{checkpoint.path}: could not read the weights ({e})") from None


def _verify(model, dst: Path, dtype) -> None:
    """Load the written checkpoint and compare its logits with the source model's on a few tokens."""
    import torch

    from .loading import load_model

    converted = load_model(dst, device="cpu", dtype=dtype)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(tokens), converted(tokens)
    if not torch.equal(a, b):
        raise RuntimeError(f"{dst}: the converted model's logits differ from the source's "
                           f"(max abs diff {(a - b).abs().max().item():.3g})")
    _note("verified: the converted model gives identical logits")


# ---- serve / fetch --------------------------------------------------------------------------------------


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as e:
        raise CLIError(f"the HTTP server is not available ({e}); install the server dependencies "
                       "with `pip install fastapi uvicorn`") from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("MISTRAL7B_API_KEY") or None
    llm = _load_llm(args, max_batch=args.max_batch, compile=args.compile, max_seq_len=args.max_seq_len)
    serve(llm, host=args.host, port=args.port, api_key=api_key, model_name=args.model_name,
          max_queue=args.max_queue, log_level=args.log_level)
    return 0


def cmd_fetch(args) -> int:
    from .default_model import DESCRIPTION, default_model_path

    path = default_model_path(download=True)
    _note(f"default model: {DESCRIPTION}")
    print(path)
    return 0


# ---- bench: owned by mistral7b/bench.py ------------------------------------------------------------------
# bench.py provides `add_arguments(parser)` and `main(args) -> int`. It is listed in the help here but
# parsed by its own parser in `run_bench`, so no other command imports it (or what it imports).


def register_bench(subparsers) -> None:
    import importlib.util

    try:
        present = importlib.util.find_spec("mistral7b.bench") is not None
    except (ImportError, ValueError):
        present = False
    if present:
        subparsers.add_parser("bench", help="benchmark the engine against HF transformers (see `mistral7b bench --help`)",
                              add_help=False)


def run_bench(argv: list[str]) -> int:
    from . import bench

    parser = argparse.ArgumentParser(prog=f"{PROG} bench", description=bench.__doc__, formatter_class=_Formatter)
    bench.add_arguments(parser)
    if not any("--debug" in a.option_strings for a in parser._actions):
        parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    return bench.main(args) or 0


# ---- the parser -----------------------------------------------------------------------------------------


def _common(model: bool = True, model_default_help: str = "the bundled default model",
            dtype_help: str = "auto = bfloat16 on cuda, float32 on cpu",
            device_help: str = "cpu, cuda, cuda:N; auto = cuda when a GPU is present, else cpu") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    if model:
        p.add_argument("--model", "-m", default=None, metavar="SOURCE",
                       help=f"HF or Mistral checkpoint folder, .gguf file, or hub id in the local HF cache "
                            f"(None: {model_default_help})")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help=f"weights and cache dtype; {dtype_help}")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=positive_int, default=256, help="most tokens to generate")
    g.add_argument("--temperature", "-t", type=non_negative_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=unit_interval, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=non_negative_float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (None: random)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--safe-prompt", action="store_true",
                   help="put the paper's guardrail system prompt in front (implies --chat for generate)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=_Formatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common()

    p = sub.add_parser("generate", parents=[common], formatter_class=_Formatter, help="stream a completion to stdout",
                       description="Stream the completion of PROMPT to stdout (progress and notes go to stderr).")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text; - reads it from stdin (one trailing newline dropped)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format as one user turn")
    p.add_argument("--token-ids", action="store_true",
                   help="PROMPT is token ids separated by spaces or commas (for checkpoints without a tokenizer)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token ids, finish_reason, timings (prefill/decode tok/s)")
    p.add_argument("--stats", action="store_true", help="print prefill/decode speed on stderr at the end")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=[common], formatter_class=_Formatter, help="interactive multi-turn chat",
                       description="Multi-turn chat that streams answers and keeps the history.\n" + CHAT_HELP +
                       ".\nWith stdin not a terminal, each input line is one user message.")
    p.add_argument("--system", default=None, help="system prompt (also settable with /system TEXT)")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", parents=[common], formatter_class=_Formatter,
                       help="config, parameter count, bytes and KV cache of a model (reads no weights)",
                       description="The model's config and parameter count, bytes by dtype, KV bytes per token, "
                                   "attention window, and the KV cache at --seq-len (rolling and linear). "
                                   "Reads only the config and tensor headers.")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="sequence length for the cache figures (None: the model's context length)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("memory", parents=[_common(model=True, model_default_help="use --preset")],
                       formatter_class=_Formatter, epilog=MEMORY_EPILOG,
                       help="KV cache and attention FLOP calculator for any config",
                       description="KV cache bytes (MHA, GQA, GQA + rolling buffer), attention FLOPs (full vs "
                                   "sliding window) and the receptive field, for a preset, a checkpoint's config "
                                   "(--model), or explicit sizes (which override either).")
    p.add_argument("--preset", default="mistral-7b-v0.1", help="base config (mistral-7b-v0.1, -v0.2, -v0.3)")
    for flag, help_ in (("--dim", "model width"), ("--n-layers", "layers"), ("--n-heads", "query heads"),
                        ("--n-kv-heads", "key/value heads"), ("--head-dim", "head size (None: dim / n_heads when --dim is given)"),
                        ("--hidden-dim", "SwiGLU hidden size"), ("--vocab-size", "vocabulary size")):
        p.add_argument(flag, type=positive_int, default=None, help=f"{help_} (None: from the base config)")
    p.add_argument("--window", type=window_size, default=None,
                   help="sliding window W, or 'none' for full attention (None: from the base config)")
    p.add_argument("--seq-len", type=positive_int, nargs="+", default=DEFAULT_SEQ_LENS, metavar="N",
                   help="sequence length(s)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences")
    p.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per cached element (2 = bf16/fp16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("convert", parents=[_common(model=False, dtype_help="auto = the source's (float32 for GGUF)",
                                                   device_help="accepted for uniformity; conversion runs on cpu")],
                       formatter_class=_Formatter,
                       help="convert between HF and Mistral layouts (and from GGUF)",
                       description="Convert a checkpoint between the HF folder layout (config.json + "
                                   "model.safetensors) and Mistral's (params.json + consolidated.safetensors); "
                                   "GGUF files (F32, F16, BF16, Q8_0 and other supported types, dequantized) "
                                   "convert to either. Tokenizer files are copied along.")
    p.add_argument("src", metavar="SRC", help="source checkpoint: folder, .gguf file or cached hub id")
    p.add_argument("dst", metavar="DST", help="destination folder (new or empty, unless --force)")
    p.add_argument("--to", choices=("hf", "mistral"), default=None,
                   help="target layout (None: the other one of the source's; hf for GGUF)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST, replacing checkpoint files")
    p.add_argument("--verify", action="store_true",
                   help="load the result and check that its logits equal the source's")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", parents=[common], formatter_class=_Formatter, help="OpenAI-compatible HTTP server",
                       description="Serve the model over HTTP (OpenAI-compatible API).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require this bearer token (None: the MISTRAL7B_API_KEY environment variable, if set)")
    p.add_argument("--model-name", default=None, help="model name the API reports (None: from the checkpoint)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="sequences decoded together, each with its own preallocated cache row")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="cache positions per sequence for layers without a sliding window, and so the longest "
                        "prompt + completion (None: the model's context); windowed layers always keep W")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with CUDA graphs (GPU; slow start, fast decode)")
    p.add_argument("--max-queue", type=positive_int, default=256, help="requests waiting before the server answers 429")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("fetch", formatter_class=_Formatter, help="download the default model now and print its path",
                       description="Download the bundled default model (once) and print its path.")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.set_defaults(func=cmd_fetch)

    register_bench(sub)
    return parser


# ---- entry point ------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _error_message(e: BaseException) -> str:
    from .config import ModelLoadError

    text = _one_line(e)
    if isinstance(e, ModelLoadError) and "download" not in text:
        text += ("; --model takes an HF or Mistral checkpoint folder, a .gguf file, or a hub id "
                 "downloaded with `huggingface-cli download`")
    elif isinstance(e, FileNotFoundError):
        text += "; check the path"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    debug = "--debug" in argv or os.environ.get("MISTRAL7B_DEBUG") == "1"
    if argv[:1] == ["bench"]:
        run = lambda: run_bench(argv[1:])  # noqa: E731
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        debug = debug or getattr(args, "debug", False)
        args.debug = debug
        run = lambda: args.func(args)  # noqa: E731
    from .config import ModelLoadError

    try:
        return int(run() or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, and keep Python from complaining at exit
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (CLIError, ModelLoadError, ValueError, OSError, RuntimeError, ImportError) as e:
        if debug:
            raise
        print(f"{PROG}: error: {_error_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
