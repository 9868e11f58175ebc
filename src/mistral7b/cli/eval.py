"""`mistral7b eval perplexity FILE`: a model's perplexity on a UTF-8 text file.

By default the text goes through the model's cache in one causal pass (exact past a sliding window);
`--context N [--stride S]` asks for HF-style strided windows instead. The modes are defined in
`mistral7b.evaluate` (`mistral7b.perplexity` / `mistral7b.text_perplexity` in Python). The result goes
to stdout (one line, or one JSON object with `--json`); the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import Formatter, add_quantize_options, common_options, load_llm, positive_int, print_json, quantize_label
from .common import quantize_of, _ranged

NAME = "eval"
HELP = "evaluate a model: `eval perplexity FILE`"
DESCRIPTION = "Evaluate a model. Subcommands: perplexity FILE (see `mistral7b eval perplexity --help`)."
COMMON = None  # the subcommand takes --model, --device and --dtype
PERPLEXITY_HELP = "perplexity on a UTF-8 text file (through the cache, or strided windows)"
at_least_two = _ranged(int, lambda v: v >= 2, "an integer >= 2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    ppl = sub.add_parser("perplexity", parents=[common_options()], formatter_class=Formatter,
                         help=PERPLEXITY_HELP, description=__doc__)
    add_perplexity_arguments(ppl)


def add_perplexity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, metavar="FILE", help="the text to score (UTF-8)")
    p.add_argument("--context", type=at_least_two, default=None,
                   help="strided mode: window length in tokens (None: score the whole text through the cache)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="strided mode: how far each window starts after the last (None: the context)")
    p.add_argument("--chunk-size", type=positive_int, default=1024, help="prefill chunk (does not change the result)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="strided windows per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_quantize_options(p)


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


def weight_formats(model) -> dict[str, int]:
    """The formats the weights run in, as `mistral7b info` names them -> parameters held in each
    (`quantize` is only what was asked for: a GGUF runs in its own formats without a flag)."""
    from ..quant import describe_weights

    described = describe_weights(model)
    return {label: d["params"] for label, d in sorted(described.items(), key=lambda kv: -kv[1]["params"])}


def run(args) -> int:
    return run_perplexity(args)  # the only subcommand so far (argparse requires one)


def run_perplexity(args) -> int:
    from ..evaluate import text_perplexity

    text = read_text(args.file)
    if args.stride is not None and args.context is None:
        raise ValueError("--stride needs --context (the window length)")
    quantize = quantize_of(args)  # a bad mix fails before the model loads
    # Evaluation runs its own caches; the engine's is never used, so keep it to one short row.
    llm = load_llm(args, max_seq_len=1)
    result = text_perplexity(llm, text, context=args.context, stride=args.stride, chunk_size=args.chunk_size,
                             batch_size=args.batch_size)
    if args.json:
        print_json({"file": str(args.file), "model": str(llm.source), "device": str(llm.device),
                    "dtype": str(llm.dtype).removeprefix("torch."), "quantize": quantize_label(quantize),
                    "weight_formats": weight_formats(llm.model),
                    **result.to_dict()}, indent=None)
    else:
        how = "one pass through the cache" if result.mode == "cache" else (
            f"{result.n_windows} windows of {result.context}, stride {result.stride}")
        print(f"perplexity {result.ppl:.4f} over {result.n_tokens:,} tokens ({how}; "
              f"mean NLL {result.mean_nll:.5f} nats) in {result.seconds:.1f} s")
    return 0
