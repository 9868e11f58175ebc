"""`mistral7b eval perplexity FILE`: a model's perplexity on a UTF-8 text file.

By default the text goes through the model's cache in one causal pass (exact past a sliding window);
`--context N [--stride S]` asks for HF-style strided windows instead. The modes are defined in
`mistral7b.evaluate`. The result goes to stdout (one line, or one JSON object with `--json`); the
progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

QUANTIZE_CHOICES = ("int8", "int4")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the text to score (UTF-8)")
    p.add_argument("--model", default=None, help="a folder, a .gguf file or a cached hub id (default: the bundled model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help="quantize the weights at load")
    p.add_argument("--group-size", type=_int_at_least(1), default=None, help="int4 group size (default: 128)")
    p.add_argument("--no-quantize-head", dest="quantize_head", action="store_false",
                   help="with --quantize: keep the output head in the activation dtype")
    p.add_argument("--context", type=_int_at_least(2), default=None,
                   help="strided mode: window length in tokens (default: score the whole text through the cache)")
    p.add_argument("--stride", type=_int_at_least(1), default=None,
                   help="strided mode: how far each window starts after the last (default: the context)")
    p.add_argument("--chunk-size", type=_int_at_least(1), default=1024, help="prefill chunk (does not change the result)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1, help="strided windows per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty: there is nothing to score")
    return text


def quantize_options(args) -> dict:
    """`{"quantize": QuantConfig}` for --quantize/--group-size/--no-quantize-head, or {} when none is
    given (a GGUF then runs in its own formats); a clear error when this build cannot quantize."""
    from .generate import LLM

    if args.quantize is None:
        if args.group_size is not None or not args.quantize_head:
            raise ValueError("--group-size and --no-quantize-head need --quantize")
        return {}
    try:
        from .quant import resolve
    except ImportError:
        resolve = None
    if resolve is None or "quantize" not in inspect.signature(LLM).parameters:
        raise ValueError("--quantize is not supported by this build of mistral7b (its loader has no quantization)")
    return {"quantize": resolve(args.quantize, args.group_size, args.quantize_head)}


def run(args) -> int:
    from .evaluate import text_perplexity
    from .generate import LLM

    text = read_text(args.file)
    if args.stride is not None and args.context is None:
        raise ValueError("--stride needs --context (the window length)")
    options = quantize_options(args)
    # Evaluation runs its own caches; the engine's is never used, so keep it to one short row.
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_batch=1, max_seq_len=1, **options)
    result = text_perplexity(llm, text, context=args.context, stride=args.stride, chunk_size=args.chunk_size,
                             batch_size=args.batch_size)
    if args.json:
        quant = options.get("quantize")
        record = {"file": str(args.file), "model": str(llm.source), "device": str(llm.device),
                  "dtype": str(llm.dtype).removeprefix("torch."), "quantize": quant.label if quant else None,
                  **result.to_dict()}
        print(json.dumps(record))
    else:
        how = "one pass through the cache" if result.mode == "cache" else (
            f"{result.n_windows} windows of {result.context}, stride {result.stride}")
        print(f"perplexity {result.ppl:.4f} over {result.n_tokens:,} tokens ({how}; "
              f"mean NLL {result.mean_nll:.5f} nats) in {result.seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m mistral7b.cli_eval FILE`) with the CLI's one-line errors."""
    import sys

    from .config import ModelLoadError

    parser = argparse.ArgumentParser(prog="mistral7b eval perplexity", description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (ValueError, ModelLoadError, OSError) as e:
        print(f"mistral7b eval perplexity: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
