"""`mistral7b convert SRC DST`: between the HF and Mistral layouts, and from GGUF to either."""

from __future__ import annotations

import argparse

from .common import CLIError, add_quantize_options, dtype_name, note, quantize_of

NAME = "convert"
HELP = "convert between HF and Mistral layouts (and from GGUF)"
DESCRIPTION = ("Convert a checkpoint between the HF folder layout (config.json + model.safetensors) and Mistral's "
               "(params.json + consolidated.safetensors); GGUF files (F32, F16, BF16, Q8_0 and other supported "
               "types, dequantized) convert to either. Tokenizer files are copied along.\n"
               "--to quantized writes our quantized safetensors checkpoint (layout: mistral7b/loading/quantized.py), "
               "which loads back without the source and without quantizing again: with --quantize int8|int4 the "
               "weights are quantized (a GGUF source is dequantized first); without --quantize a GGUF source keeps "
               "its own quantized tensors as they are (Q4_1 -> int4 g32, Q8_0 -> int8 g32). --quantize implies "
               "--to quantized.")
COMMON = dict(model=False, dtype_help="auto = the source's (float32 for GGUF)",
              device_help="accepted for uniformity; conversion runs on cpu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="source checkpoint: folder, .gguf file or cached hub id")
    p.add_argument("dst", metavar="DST", help="destination folder (new or empty, unless --force)")
    p.add_argument("--to", choices=("hf", "mistral", "quantized"), default=None,
                   help="target layout (None: quantized with --quantize, else the other one of the source's; hf for GGUF)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST, replacing checkpoint files")
    p.add_argument("--verify", action="store_true",
                   help="load the result and check that its logits equal the source's")
    add_quantize_options(p)


def run(args) -> int:
    import torch

    from ..loading.convert import convert
    from ..utils import resolve_dtype

    dtype = resolve_dtype(dtype_name(args), torch.device("cpu")) if dtype_name(args) else None
    quantize = quantize_of(args)
    if (quantize is not None and not quantize.dense) or args.to == "quantized":
        print(convert_quantized(args, quantize, dtype))
        return 0
    if quantize is not None:
        raise CLIError("--quantize none: a dense conversion needs no flag (use --to hf or --to mistral)")
    print(convert(args.src, args.dst, args.to, dtype, force=args.force, verify=args.verify, note=note,
                  strict=args.debug))
    return 0


def convert_quantized(args, quantize, dtype):
    """`--to quantized`: load SRC quantized (or in its GGUF formats) and write it with save_quantized."""
    from pathlib import Path

    from ..loading import load_model, open_checkpoint
    from ..loading.convert import check_destination, copy_tokenizer_files
    from ..loading.quantized import save_quantized
    from ..tokenizer import Tokenizer

    if args.to not in (None, "quantized"):
        raise CLIError(f"--quantize writes a quantized checkpoint; it cannot be combined with --to {args.to}")
    if quantize is not None and quantize.dense:
        raise CLIError("--to quantized with --quantize none would store nothing quantized; drop --quantize none")
    checkpoint = open_checkpoint(args.src)  # a bad source fails here, before DST is touched
    src_dir = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    dst = Path(args.dst).expanduser()
    check_destination(dst, src_dir, args.force)
    if quantize is None and checkpoint.path.is_dir():
        raise CLIError(f"{checkpoint.path}: --to quantized needs --quantize int8|int4 for a 16/32-bit source "
                       "(only a GGUF file's quantized tensors are kept as they are)")
    model = load_model(checkpoint.path, "cpu", dtype, quantize=quantize)
    label = quantize.label if quantize else "its own GGUF formats"
    note(f"writing {checkpoint.path} quantized ({label}) to {dst}")
    tokenizer = Tokenizer.from_gguf(checkpoint.path) if checkpoint.path.is_file() else None
    save_quantized(model, dst, tokenizer)
    if checkpoint.path.is_dir():
        copied = copy_tokenizer_files(src_dir, dst)
        note(f"tokenizer files copied: {', '.join(copied)}" if copied else
             "note: the source folder has no tokenizer files to copy")
    return dst
