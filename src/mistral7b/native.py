"""The C kernels' builds (quant.cpu_kernels, attention_cpu): the best variant this CPU runs, compiled once
per source and flags into the cache folder (about a second; plain C, no torch headers), loaded through
ctypes by their modules; `cpu_op` makes a kernel one opaque op to torch.compile."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .utils import cache_dir

# The kernels' ops, registered through torch.library's low-level Library: a call costs ~9 us over the
# Python function where torch.library.custom_op's wrappers cost 30-45 us (default model, 2-core AVX2):
# 151 calls a compiled decode step.
_OPS = torch.library.Library("mistral7b", "FRAGMENT")

# C: an IEEE half float's value (after <math.h>, <stdint.h> and, where AVX2 is built, <immintrin.h>).
HALF_TO_FLOAT = r"""static inline float h2f(uint16_t h) {
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    return _cvtsh_ss(h);
#else  // exact through ldexpf; the all-ones exponent is inf or nan
    int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v = exp == 0x1f ? (man ? NAN : INFINITY) : ldexpf((float)(exp ? man | 0x400 : man), (exp ? exp : 1) - 25);
    return h & 0x8000 ? -v : v;
#endif
}
"""

VARIANT_FLAGS = {
    "vnni": ["-DM7B_VNNI", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
    "avx2": ["-DM7B_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "portable": [],
}


def cpu_variant() -> str:
    """The best build this CPU runs, from its flags (an x86 CPU without AVX2, or Arm: portable C)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if {"avx512_vnni", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"} <= flags:
        return "vnni"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "portable"


def build(variant: str, source: str, stem: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library of this C source for a variant, compiled once into the cache folder."""
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared", *extra_flags] + VARIANT_FLAGS[variant]
    tag = hashlib.sha256(source.encode() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{stem}_{variant}_{tag}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built, source_file = Path(tmp) / target.name, Path(tmp) / f"{stem}.c"
        source_file.write_text(source)
        cmd = [compiler, *flags, str(source_file), "-o", str(built), "-lm", "-pthread"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-300:]}")
        os.replace(built, target)  # atomic: a concurrent process sees no half-written library
    return target


def load_or_none(open_variant: Callable[[str], object], what: str, fallback: str, switch: str | None = None):
    """`open_variant` of this CPU's variant, or None with a one-line notice (no compiler, a failed build);
    None too, silently, when the environment variable `switch` is "0"."""
    if switch is not None and os.environ.get(switch, "1") == "0":
        return None
    try:
        return open_variant(cpu_variant())
    except (OSError, RuntimeError) as exc:
        print(f"mistral7b: {what} unavailable ({exc}); {fallback}", file=sys.stderr)
        return None


def cpu_op(schema: str, impl: Callable, fake: Callable) -> Callable:
    """Registers `impl` as the CPU kernel of op `mistral7b::<schema>` and `fake` as its shape function;
    returns the op (what compiled steps call; eagerly, calling `impl` itself costs less)."""
    name = schema.split("(", 1)[0]
    _OPS.define(schema)
    _OPS.impl(name, impl, "CPU")
    torch.library.register_fake(f"mistral7b::{name}", fake, lib=_OPS)
    return getattr(torch.ops.mistral7b, name)
