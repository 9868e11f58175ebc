"""The C kernels' builds (quant.cpu_kernels, attention_cpu): the best variant this CPU runs, compiled once
per source and flags into the cache folder (about a second; plain C, no torch headers), loaded through
ctypes by their modules."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .utils import cache_dir

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


def load_or_none(open_variant: Callable[[str], object], what: str, fallback: str):
    """`open_variant` of this CPU's variant, or None with a one-line notice (no compiler, a failed build)."""
    try:
        return open_variant(cpu_variant())
    except (OSError, RuntimeError) as exc:
        print(f"mistral7b: {what} unavailable ({exc}); {fallback}", file=sys.stderr)
        return None
