"""`mistral7b generate PROMPT`: stream a completion to stdout (--json for one object)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .common import add_kv_cache_dtype_option, add_batch_invariant_option, add_compile_option, add_quantize_options, add_speculative_options, CLIError, add_sampling_arguments, load_llm, note, positions_for, print_json, sampling_params, timings_of

NAME = "generate"
HELP = "stream a completion to stdout"
DESCRIPTION = "Stream the completion of PROMPT to stdout (progress and notes go to stderr)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text; - reads it from stdin (one trailing newline dropped)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format as one user turn")
    p.add_argument("--token-ids", action="store_true",
                   help="PROMPT is token ids separated by spaces or commas (for checkpoints without a tokenizer)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token ids, finish_reason, timings (prefill/decode tok/s)")
    p.add_argument("--stats", action="store_true", help="print prefill/decode speed on stderr at the end")
    p.add_argument("--json-schema", metavar="FILE",
                   help="constrain the output to JSON that follows the JSON schema in FILE (structured outputs)")
    add_sampling_arguments(p)
    add_quantize_options(p)
    add_speculative_options(p)
    add_batch_invariant_option(p)
    add_compile_option(p)
    add_kv_cache_dtype_option(p)


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--token-ids: the prompt must be integers separated by spaces or commas, got {text[:40]!r}") from None
    if not ids:
        raise ValueError("--token-ids: the prompt holds no token ids")
    return ids


def with_json_schema(params, path: str | None):
    """`params` constrained to the JSON schema in the file at `path` (CLIError naming what is wrong)."""
    if path is None:
        return params
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except FileNotFoundError:
        raise CLIError(f"--json-schema: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--json-schema: cannot read {path}: {e}") from None
    except ValueError as e:
        raise CLIError(f"--json-schema: {path} is not valid JSON: {e}") from None
    try:
        return dataclasses.replace(params, json_schema=schema)
    except ValueError as e:  # StructuredOutputError: the schema does not compile
        raise CLIError(f"--json-schema: {path}: {e}") from None


def check_prompt(args, prompt: str, chat: bool) -> list[int] | None:
    """What can be said about the prompt before the model loads: its token ids with --token-ids, and
    a CLIError for an empty prompt (a chat turn may be empty: the format still gives the model text)."""
    if args.token_ids and chat:
        raise CLIError("--token-ids cannot be combined with --chat or --safe-prompt")
    if args.token_ids:
        return parse_token_ids(prompt)
    if not prompt and not chat:
        raise CLIError("the prompt is empty: give some text to complete (or - to read it from stdin)")
    return None


def _prompt_ids(args, llm, prompt: str, chat: bool, token_ids: list[int] | None) -> list[int]:
    if token_ids is not None:
        return token_ids
    if llm.tokenizer is None:
        raise CLIError(f"{llm.source}: this checkpoint has no tokenizer; pass the prompt as token ids with "
                       "--token-ids, or put a tokenizer.json or tokenizer.model next to the weights")
    if chat:
        return llm.chat_prompt([{"role": "user", "content": prompt}], safe_prompt=args.safe_prompt)
    return llm.encode_prompt(prompt)


def run(args) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    params = with_json_schema(sampling_params(args), args.json_schema)
    chat = args.chat or args.safe_prompt
    token_ids = check_prompt(args, prompt, chat)
    llm = load_llm(args, max_seq_len=positions_for(prompt, args.max_tokens))  # one request: cache to fit
    request, deltas = llm.stream_request(_prompt_ids(args, llm, prompt, chat, token_ids), params)
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
    _report(args, llm, request, out)
    if interrupted:
        note("interrupted")
        return 130
    return 0


def _report(args, llm, request, out) -> None:
    timings = timings_of(request, llm.load_seconds)
    if args.json:
        print_json({
            "model": str(llm.source),
            "prompt_token_ids": request.prompt_ids,
            "text": request.text,
            "token_ids": request.output_ids,
            "finish_reason": request.finish_reason,
            "usage": {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(request.output_ids)},
            "timings": timings,
        }, indent=None)  # one line: easy to pipe into jq or read line by line
        return
    if llm.tokenizer is None:  # no text to show: the ids are the answer
        out.write(" ".join(map(str, request.output_ids)))
    out.write("\n")
    out.flush()
    if args.stats:
        note(stats_line(request, timings))


def stats_line(request, timings) -> str:
    def rate(x):
        return f"{x:.1f} tok/s" if x else "-"

    return (f"prefill {len(request.prompt_ids)} tokens at {rate(timings['prefill_tok_s'])}, "
            f"decode {len(request.output_ids)} tokens at {rate(timings['decode_tok_s'])} "
            f"(finish: {request.finish_reason}; model loaded in {timings['load_s']:.1f} s)")
