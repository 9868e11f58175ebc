"""What to quantize and how: one frozen dataclass, validated, plus the argparse helpers the CLI uses.

int8 is symmetric per output channel. int4 uses asymmetric groups along the input dimension, each with
a scale and a zero in tinygemm's convention `w = (q - 8) * scale + zero`, q in 0..15.

Without `--group-size`, int4 follows the source's own grid where it has one (a GGUF's Q4 blocks are
groups of 32: its values are then kept exactly) and 128 elsewhere. The group size is a ceiling,
applied matrix by matrix: a matrix whose input width it does not
divide takes the largest supported size below it that does (`fitting_group_size`), so SmolLM2-135M's
576-wide matrices run in groups of 64 under `--group-size 128` while its 1536-wide w2 keeps 128.
`describe_weights` (and `mistral7b info`) list each size actually used. Padding K instead would cost
a pad of every activation and a group mixing real weights with zeros; smaller groups only cost their
scales (and are more accurate).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

METHODS = ("int8", "int4")
NONE = "none"  # the method that dequantizes everything into the activation dtype
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
DEFAULT_GROUP_SIZE = 128
FORMAT_VERSION = 1  # of the quantized checkpoint layout (loading/quantized.py)
CUDA_ROWS_KERNELS = ("auto", "torch", "triton", "gemlite")  # few-row CUDA matmuls: kernels.pick_rows_kernel
ROWS_KERNEL_ENV = "MISTRAL7B_CUDA_ROWS_KERNEL"


@dataclass(frozen=True)
class QuantConfig:
    """`method` "int8" (per output channel), "int4" (groups of `group_size` along the input; None: the
    source's grid, else 128) or "none" (every weight dense, a GGUF's blocks dequantized).

    `quantize_head=False` keeps the output head in the activation dtype. Embeddings and norms are
    never quantized from a 16-bit source."""

    method: str
    group_size: int | None = None
    quantize_head: bool = True

    def __post_init__(self):
        if self.method not in METHODS + (NONE,):
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)} or none")
        if self.method != "int4":
            if self.group_size is not None:
                raise ValueError("--group-size applies to int4 only (int8 is per output channel)")
            return
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}"
            )

    def group_size_for(self, width: int, source_group: int | None = None) -> int | None:
        """The int4 group size a matrix `width` inputs wide gets: the requested size, else the source's
        grid when it is a supported size, else the default; the largest supported size up to that one
        that divides `width` (None: none does)."""
        if self.group_size is None and source_group in GROUP_SIZES:
            return fitting_group_size(width, source_group)
        return fitting_group_size(width, self.group_size or DEFAULT_GROUP_SIZE)

    @property
    def dense(self) -> bool:
        return self.method == NONE

    @property
    def label(self) -> str:
        return f"int4 g{self.group_size}" if self.method == "int4" and self.group_size else self.method

    def to_dict(self) -> dict:
        return {"method": self.method, "group_size": self.group_size, "quantize_head": self.quantize_head}


def fitting_group_size(width: int, requested: int) -> int | None:
    """The largest supported int4 group size that is at most `requested` and divides `width`, or None."""
    fits = [g for g in GROUP_SIZES if g <= requested and width % g == 0]
    return max(fits) if fits else None


def resolve(quantize: "str | QuantConfig | bool | None", group_size: int | None = None,
            quantize_head: bool = True) -> QuantConfig | None:
    """None, a method name ("int8", "int4", "none"), False ("none") or a QuantConfig -> a QuantConfig,
    or None: the weights as the source stores them."""
    if quantize is False:
        quantize = NONE
    if quantize is None:
        if group_size is not None:
            raise ValueError("a group size was given without a quantization method (--quantize int4)")
        return None
    if isinstance(quantize, QuantConfig):
        return quantize
    if not isinstance(quantize, str):
        raise ValueError(f"quantize must be None, 'int8', 'int4' or a QuantConfig, got {type(quantize).__name__}")
    return QuantConfig(quantize, group_size, quantize_head)


def cuda_rows_kernel(setting: str | None = None) -> str:
    """The few-row CUDA kernel setting of a load: `setting`, else MISTRAL7B_CUDA_ROWS_KERNEL, else "auto".
    Read from the environment when a load is planned, so that engine and tensor-parallel processes follow
    the benchmark that starts them; the quantized modules then carry it (`QuantModule.rows_kernel`)."""
    setting = setting or os.environ.get(ROWS_KERNEL_ENV) or "auto"
    if setting not in CUDA_ROWS_KERNELS:
        raise ValueError(f"{ROWS_KERNEL_ENV} must be one of {', '.join(CUDA_ROWS_KERNELS)}, got {setting!r}")
    return setting


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize {int8,int4}, --group-size N and --no-quantize-head, for generate/chat/serve/bench/convert."""
    group = parser.add_argument_group("quantization")
    group.add_argument("--quantize", choices=METHODS + ("none",), default=None,
                       help="weight-only quantization at load: int8 per channel, or int4 in groups "
                            "(GGUF files run in their own quantized formats without this flag; "
                            "none dequantizes them to --dtype)")
    group.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                       help=f"int4 group size along the input dimension (default: the source's grid, such as "
                            f"a GGUF's 32, else {DEFAULT_GROUP_SIZE}); a matrix "
                            "whose width it does not divide takes the largest supported size that does")
    group.add_argument("--no-quantize-head", dest="quantize_head", action="store_false",
                       help="keep the output head in the activation dtype")


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig | None:
    """What to pass as load_model(quantize=...) for the flags of `add_quantize_arguments`: a QuantConfig
    (method "none" for --quantize none: dequantize) or None (no flag). Raises ValueError on a bad mix."""
    return resolve(getattr(args, "quantize", None), getattr(args, "group_size", None),
                   getattr(args, "quantize_head", True))
