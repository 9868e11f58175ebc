"""`mistral7b convert SRC DST`: between the HF and Mistral layouts, and from GGUF to either."""

from __future__ import annotations

import argparse

from .common import dtype_name, note

NAME = "convert"
HELP = "convert between HF and Mistral layouts (and from GGUF)"
DESCRIPTION = ("Convert a checkpoint between the HF folder layout (config.json + model.safetensors) and Mistral's "
               "(params.json + consolidated.safetensors); GGUF files (F32, F16, BF16, Q8_0 and other supported "
               "types, dequantized) convert to either. Tokenizer files are copied along.")
COMMON = dict(model=False, dtype_help="auto = the source's (float32 for GGUF)",
              device_help="accepted for uniformity; conversion runs on cpu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="source checkpoint: folder, .gguf file or cached hub id")
    p.add_argument("dst", metavar="DST", help="destination folder (new or empty, unless --force)")
    p.add_argument("--to", choices=("hf", "mistral"), default=None,
                   help="target layout (None: the other one of the source's; hf for GGUF)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST, replacing checkpoint files")
    p.add_argument("--verify", action="store_true",
                   help="load the result and check that its logits equal the source's")


def run(args) -> int:
    import torch

    from ..loading.convert import convert
    from ..utils import resolve_dtype

    dtype = resolve_dtype(dtype_name(args), torch.device("cpu")) if dtype_name(args) else None
    print(convert(args.src, args.dst, args.to, dtype, force=args.force, verify=args.verify, note=note,
                  strict=args.debug))
    return 0
