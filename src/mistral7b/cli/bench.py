"""`mistral7b bench`: our engine and HF transformers side by side, in one process on one card
(random weights at a preset's shape; see `mistral7b.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..attention import DECODE_KERNELS

NAME = "bench"
HELP = "benchmark the engine against HF transformers (see `mistral7b bench --help`)"
DESCRIPTION = ("Our engine and HF transformers side by side, in one process on one card. Random weights at a "
               "preset's shape (speed does not depend on the values), shared by both engines. Figures are medians "
               "over --runs; the table goes to stdout and everything to --json.")
COMMON = None  # its own --device; no model or dtype


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mistral-7b-v0.1", help="model shape, random bf16 weights")
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
    p.add_argument("--decode-kernel", choices=DECODE_KERNELS, default=None,
                   help="attention kernel of compiled CUDA decode (mistral7b.attention.decode_kernel); default: flash")
    p.add_argument("--peer", nargs=2, metavar=("NAME", "DIR"), default=None, type=str,
                   help="after our figures, run a peer's batch-1 bf16 decode: `--peer gpt-fast DIR` (DIR holds "
                        "gpt-fast's model.py and generate.py, fetched into an ignored path); its best figure goes "
                        "into the table's 'best peer' column")


def peer_of(args):
    """(name, folder) of --peer, checked before any GPU work; a usage-level one-line error otherwise."""
    if args.peer is None:
        return None
    from ..bench_peers import check_gpt_fast_dir
    from .common import CLIError

    name, folder = args.peer
    if name != "gpt-fast":
        raise CLIError(f"--peer {name}: the only peer is gpt-fast")
    try:
        return name, check_gpt_fast_dir(Path(folder))
    except ValueError as e:
        raise CLIError(str(e)) from None


def run(args) -> int:
    from .. import bench  # torch and transformers load only when the benchmark runs

    args.peer = peer_of(args)
    if args.decode_kernel is not None:
        from ..attention import decode_kernel

        decode_kernel(args.decode_kernel)
    return bench.main(args) or 0
