"""What every command shares: errors, argparse types, the common options, loading the model."""

from __future__ import annotations

import argparse
import json
import sys

from ..utils import LOAD_DTYPES

PROG = "mistral7b"
DTYPES = ("auto", *LOAD_DTYPES)


class CLIError(Exception):
    """A runtime failure with a message for the user (exit code 1)."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # A flag's "default" is its destination's value when absent, which reads backwards for a
        # negative flag ("--no-quantize-head ... (default: True)"): flags say what they do, no default.
        return action.help if action.nargs == 0 else super()._get_help_string(action)


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
integer = _ranged(int, lambda v: True, "an integer")
non_negative_int = _ranged(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _ranged(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def sampling_value(name: str, kind=float):
    """An argparse type for the SamplingParams field `name`, checked by SamplingParams itself (the one
    validation the API uses too), so the CLI refuses what the engine would."""

    def parse(text: str):
        from ..sampling import SamplingParams, SamplingParamsError

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            SamplingParams(**{name: value})
        except SamplingParamsError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(name + " ")) from None
        return value

    parse.__name__ = name.replace("_", " ")
    return parse


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


def note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def default_model_note() -> str:
    from ..default_model import DESCRIPTION

    return (
        f"no --model given: using the default model {DESCRIPTION}; for Mistral 7B pass --model with a local "
        "HF or Mistral folder, a .gguf file, or a hub id after "
        "`huggingface-cli download mistralai/Mistral-7B-Instruct-v0.2`"
    )


def model_source(args, download: bool = True):
    """--model, or the bundled default (announced on stderr)."""
    if args.model is not None:
        return args.model
    from ..default_model import default_model_path

    note(default_model_note())
    return default_model_path(download=download)


def device_of(args):
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


def dtype_name(args) -> str | None:
    return None if args.dtype in (None, "auto") else args.dtype


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    """--quantize {int8,int4,none}, --group-size N, --no-quantize-head (the library's flags)."""
    from ..quant import add_quantize_arguments

    add_quantize_arguments(p)


def quantize_of(args):
    """What to pass as quantize= for the flags of `add_quantize_options`: a QuantConfig (method "none"
    for --quantize none: dequantize into --dtype) or None (no flag: a GGUF runs in its own formats)."""
    from ..quant import quant_config_from_args

    try:
        return quant_config_from_args(args)
    except ValueError as e:
        raise CLIError(str(e)) from None


def quantize_label(quantize) -> str | None:
    """"int4 g128", "int8", "none" or None, for JSON records."""
    return quantize.label if quantize is not None else None


def add_speculative_options(p: argparse.ArgumentParser) -> None:
    """--speculative ngram|self-int4|draft:SRC and --num-speculative-tokens K (engine/speculative.py)."""
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", default=None, metavar="METHOD",
                   help="ngram (prompt lookup), self-int4 (the model in int4 drafts) or draft:SRC (a draft model "
                        "with the same tokenizer); the output distribution is unchanged")
    # A plain int: the range is SpeculativeConfig's to check, so k < 1 and k > 16 get the same one line.
    g.add_argument("--num-speculative-tokens", type=integer, default=None, metavar="K",
                   help="tokens proposed per step, 1 to 16 (default 4)")
    g.add_argument("--speculative-suffix-cache", type=integer, default=None, metavar="TOKENS",
                   help="with ngram: also draft from earlier requests' outputs, keeping up to TOKENS of them "
                        "(default 0: off)")
    g.add_argument("--speculative-backoff", action=argparse.BooleanOptionalAction, default=None,
                   help="a request whose drafts do not pay for their verify decodes plainly for a while, "
                        "unless it has a seed (default: on)")


def add_batch_invariant_option(p: argparse.ArgumentParser) -> None:
    """--batch-invariant/--no-batch-invariant: EngineConfig.batch_invariant (None: the device's default)."""
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="a request's answer does not depend on what shares its batch (default: on for CPU, off "
                        "for CUDA, where it runs slower fixed-tile kernels: see the README)")


KV_CACHE_DTYPES = ("auto", "float16")  # engine.config's, without importing torch to build the parser


def add_kv_cache_dtype_option(p: argparse.ArgumentParser) -> None:
    """--kv-cache-dtype: EngineConfig.kv_cache_dtype."""
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="the KV cache's dtype: auto, the model's; float16 on a CPU halves what a decode step "
                        "reads from the cache, as llama.cpp's default does (1.07x faster decode at 1k positions, "
                        "1.29x at 4k on the default model; perplexity unchanged)")


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """--compile: EngineConfig.compile."""
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step: CUDA graphs on a GPU, Inductor on a CPU (the default model "
                        "decodes ~1.5x faster there); a slower start (seconds to minutes), then faster tokens")


def speculative_of(args):
    """The SpeculativeConfig of `add_speculative_options`' flags, or None."""
    from ..engine import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(getattr(args, "speculative", None), getattr(args, "num_speculative_tokens", None),
                                       getattr(args, "speculative_suffix_cache", None),
                                       getattr(args, "speculative_backoff", None))
    except ValueError as e:
        raise CLIError(str(e).replace("num_speculative_tokens", "--num-speculative-tokens")) from None


TEMPLATE_SLACK = 512  # positions a chat template and BOS may add to a prompt


def positions_for(prompt: str, max_tokens: int) -> int:
    """Cache positions that one request can need, without its tokenizer: a token spells at least one
    byte, plus the template's tokens; rounded up to 256. Sizing the cache to this rather than to the
    model's whole context keeps `generate` small (the default model: ~12 MB of cache, not ~400)."""
    need = len(prompt.encode("utf-8", "surrogatepass")) + TEMPLATE_SLACK + max_tokens
    return -(-need // 256) * 256


def load_llm(args, engine_config=None, **options):
    """The model of --model (or the default) on --device in --dtype (quantized as --quantize asks), with an
    engine set up by `engine_config` (or EngineConfig's fields in `options`)."""
    from ..engine import EngineConfig
    from ..llm import LLM

    quantize = quantize_of(args) if hasattr(args, "quantize") else None
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)  # the engine's CPU decode threads follow torch's count
    source = model_source(args)
    if engine_config is None and hasattr(args, "speculative"):
        options["speculative"] = speculative_of(args)
    if engine_config is None and getattr(args, "batch_invariant", None) is not None:
        options["batch_invariant"] = args.batch_invariant
    if engine_config is None and getattr(args, "compile", False):
        options["compile"] = True
    if engine_config is None and getattr(args, "kv_cache_dtype", "auto") != "auto":
        options["kv_cache_dtype"] = args.kv_cache_dtype
    engine_config = engine_config or EngineConfig.of(None, **{"max_batch": 1, **options})
    return LLM(source, device=device_of(args), dtype=dtype_name(args), engine_config=engine_config,
               quantize=quantize, tensor_parallel_size=getattr(args, "tensor_parallel_size", 1))


def sampling_params(args):
    from ..sampling import SamplingParams

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


def print_json(data, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def timings_of(request, load_seconds: float | None = None) -> dict:
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


def common_options(model: bool = True, model_default_help: str = "the bundled default model",
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
    if model:
        p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="CPU threads (None: torch's count, at most the physical cores for decode)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=sampling_value("max_tokens", int), default=256,
                   help="most tokens to generate")
    g.add_argument("--temperature", "-t", type=sampling_value("temperature"), default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=sampling_value("top_p"), default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--top-k", type=sampling_value("top_k", int), default=0,
                   help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=sampling_value("min_p"), default=0.0,
                   help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=sampling_value("repetition_penalty"), default=1.0,
                   help="> 0; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (None: random)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--safe-prompt", action="store_true",
                   help="put the paper's guardrail system prompt in front (implies --chat for generate)")


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def error_message(e: BaseException) -> str:
    from ..config import ModelLoadError

    text = one_line(e)
    if isinstance(e, ModelLoadError) and "group size" in text:
        text += "; pick a --group-size that divides it"
    elif isinstance(e, ModelLoadError) and "download" not in text:
        text += ("; --model takes an HF or Mistral checkpoint folder, a .gguf file, or a hub id "
                 "downloaded with `huggingface-cli download`")
    elif isinstance(e, FileNotFoundError):
        text += "; check the path"
    return text
