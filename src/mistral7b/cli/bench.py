"""`mistral7b bench`: our engine and HF transformers side by side, in one process on one card
(random weights at a preset's shape; see `mistral7b.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_batch_invariant_option, add_kv_cache_dtype_option, add_quantize_options, add_speculative_options

DECODE_KERNELS = ("flash", "sdpa", "reduction")  # mistral7b.attention.DECODE_KERNELS (a test checks), without torch

NAME = "bench"
HELP = "benchmark the engine against HF transformers (see `mistral7b bench --help`)"
DESCRIPTION = ("Our engine and HF transformers side by side, in one process on one card. Random weights at a "
               "preset's shape (speed does not depend on the values), shared by both engines. Figures are medians "
               "over --runs; the table goes to stdout and everything to --json. --quantize int8|int4 runs ours (and "
               "--peer gpt-fast) on those weights quantized; a second table sets decode against the limit: resident "
               "weight bytes read once per step at the copy bandwidth measured on the device (or --bandwidth-tb-s).")
COMMON = None  # its own --device; no model or dtype


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mistral-7b-v0.1",
                   help="model shape, random bf16 weights: a preset, or 'tiny' (2 layers, dim 256: a quick check)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill", default="4096,16384,32768", help="prompt lengths for prefill tok/s")
    p.add_argument("--context", type=int, default=16384, help="decode speed at this context vs 1024")
    p.add_argument("--long-context", type=int, default=131072, help="prefill this many tokens then decode 128 (0: skip)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--hf-sections", default="decode,prefill,compile", help="which HF figures to measure")
    p.add_argument("--sections", default="decode,prefill,context,long", help="which of ours to run")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PATH",
                   help="also draw decode tok/s against batch size and context length to a PNG: PATH, else --json's "
                        "path with .png, else bench.png (needs matplotlib: the 'plot' extra)")
    p.add_argument("--decode-kernel", choices=DECODE_KERNELS, default=None,
                   help="attention kernel of compiled CUDA decode (Transformer.use_decode_kernel); default: flash")
    p.add_argument("--single-row-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="compile one-row CUDA decode steps with Inductor's coordinate-descent tuning, as gpt-fast "
                        "does (model.SINGLE_ROW_OPTIONS); --no-single-row-tuning measures without it")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard our model over N GPUs (mistral7b.parallel; N processes with gloo on CPU); bf16 only, "
                        "no HF sections, no full-attention prefill variant")
    add_quantize_options(p)
    p.add_argument("--bandwidth-tb-s", type=float, default=None,
                   help="memory bandwidth for the limit column (weight bytes read once per decode step); default: "
                        "the device's copy bandwidth, measured before the table")
    p.add_argument("--peer", nargs=2, metavar=("NAME", "DIR"), default=None, type=str,
                   help="after our figures, run a peer's batch-1 decode, with --quantize's weights: `--peer gpt-fast DIR` (DIR holds "
                        "gpt-fast's model.py and generate.py, fetched into an ignored path); its best figure goes "
                        "into the table's 'best peer' column")
    add_speculative_options(p)  # the decode section again through a speculative engine (mistral7b.bench.speculative)
    add_batch_invariant_option(p)  # every engine of our sections
    add_kv_cache_dtype_option(p)


def peer_of(args):
    """(name, folder) of --peer, checked before any GPU work; a usage-level one-line error otherwise."""
    if args.peer is None:
        return None
    from ..bench.peers import check_gpt_fast_dir
    from .common import CLIError

    name, folder = args.peer
    if name != "gpt-fast":
        raise CLIError(f"--peer {name}: the only peer is gpt-fast")
    try:
        return name, check_gpt_fast_dir(Path(folder))
    except ValueError as e:
        raise CLIError(str(e)) from None


def plot_of(args) -> Path | None:
    """Where --plot draws, or None; checked before any work: without matplotlib, a one-line error."""
    if args.plot is None:
        return None
    from .common import CLIError

    try:
        import matplotlib  # noqa: F401 - present, so that the PNG is not lost after a long benchmark
    except ImportError:
        from ..bench.plot import INSTALL_HINT

        raise CLIError(INSTALL_HINT) from None
    path = Path(args.plot) if args.plot else args.json.with_suffix(".png") if args.json else Path("bench.png")
    if args.json and path.resolve() == args.json.resolve():
        raise CLIError(f"--plot {path} is --json's file too: give --plot another PATH")
    return path


def checked(args):
    """The shape and the quantization of `args`, checked before any work: one-line errors otherwise."""
    from ..bench import bench_config
    from .common import CLIError, quantize_of, speculative_of

    try:
        bench_config(args.preset)
    except ValueError as e:
        raise CLIError(str(e)) from None
    quant = quantize_of(args)
    args.spec = speculative_of(args)
    if args.tensor_parallel_size < 1:
        raise CLIError(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")
    if args.tensor_parallel_size > 1 and quant:
        raise CLIError("--tensor-parallel-size runs bf16 weights only: leave out --quantize")
    if args.batch_invariant and args.tensor_parallel_size > 1:
        raise CLIError("--batch-invariant does not run with tensor parallelism: leave out --tensor-parallel-size")
    if args.spec is not None and args.spec.method == "self-int4" and args.tensor_parallel_size > 1:
        raise CLIError("--speculative self-int4 quantizes the random weights in one process: with "
                       "--tensor-parallel-size use ngram or draft:SRC")
    if args.bandwidth_tb_s is not None and args.bandwidth_tb_s <= 0:
        raise CLIError(f"--bandwidth-tb-s must be positive, got {args.bandwidth_tb_s}")
    return quant or None  # False (--quantize none): the random weights are bf16 already


def run(args) -> int:
    from .. import bench  # torch loads only when the benchmark runs; transformers only with the HF sections

    args.quant = checked(args)
    args.peer = peer_of(args)
    args.plot = plot_of(args)
    return bench.main(args) or 0
