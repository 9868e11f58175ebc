"""Conversion between checkpoint layouts: HF <-> Mistral, and GGUF (dequantized) -> either, with the
tokenizer copied along (or, from a GGUF, rebuilt as a tokenizer.json), and an optional check that the
written checkpoint gives the source's logits exactly."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ModelLoadError
from ..quant.config import QuantConfig
from . import assemble, load_model, open_checkpoint
from .inspect import checkpoint_format, source_dtype

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
CHECKPOINT_FILES = ("config.json", "params.json", "model.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.safetensors",
                    "consolidated.00.pth", *TOKENIZER_FILES)


def clear_checkpoint_files(dst: Path) -> None:
    """Remove the checkpoint and tokenizer files a loader would read, so nothing stale (say an old
    params.json next to a new config.json) changes what the folder means."""
    stale = [dst / n for n in CHECKPOINT_FILES]
    stale += list(dst.glob("model-*-of-*.safetensors")) + list(dst.glob("tokenizer.model*"))
    for p in stale:
        if p.is_file() or p.is_symlink():
            p.unlink()


def check_destination(dst: Path, src_dir: Path, force: bool) -> None:
    """DST must be a new or empty folder that is not the source's (or, with `force`, any folder)."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is not a folder; DST must be a folder")
    if dst.exists() and dst.resolve() == src_dir.resolve():
        raise ValueError(f"{dst}: DST is the source's own folder; choose a new folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise ValueError(f"{dst}: folder is not empty; choose another DST or pass --force to replace "
                             "the checkpoint files in it")
        clear_checkpoint_files(dst)


def convert(src, dst, to: str | None = None, dtype: torch.dtype | None = None, force: bool = False,
            verify: bool = False, note: Callable[[str], None] = print, strict: bool = False) -> Path:
    """Write the checkpoint `src` into the folder `dst` in the `to` layout ("hf" or "mistral"; None:
    the other one, hf for GGUF), in `dtype` (None: the source's). `strict` re-raises a failure to
    rebuild a GGUF's tokenizer instead of noting it."""
    from . import hf, mistral

    checkpoint = open_checkpoint(src)  # a bad source fails here, before DST is touched
    fmt = checkpoint_format(checkpoint)
    to = to or ("mistral" if fmt == "hf" else "hf")
    dst = Path(dst).expanduser()
    src_dir = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    check_destination(dst, src_dir, force)
    dtype = dtype or source_dtype(checkpoint)
    note(f"converting {checkpoint.path} ({fmt}) to the {to} layout in {str(dtype).removeprefix('torch.')}")
    model = assemble(checkpoint, "cpu", dtype, QuantConfig("none"))  # dense, for a 16/32-bit writer
    dst.mkdir(parents=True, exist_ok=True)
    if to == "hf":
        extra = {}
        if fmt == "hf":  # keep the special token ids the source declared
            source_config = json.loads((checkpoint.path / "config.json").read_text())
            extra = {k: source_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source_config}
        hf.save(model, dst, **extra)
    else:
        mistral.save(model, dst)
    if fmt == "gguf":
        _rebuild_tokenizer(checkpoint.path, dst, note, strict)
    else:
        copied = copy_tokenizer_files(src_dir, dst)
        note(f"tokenizer files copied: {', '.join(copied)}" if copied else
             "note: the source folder has no tokenizer files to copy")
    if verify:
        verify_logits(model, dst, dtype)
        note("verified: the converted model gives identical logits")
    return dst


def _rebuild_tokenizer(gguf_path: Path, dst: Path, note, strict: bool) -> None:
    from ..tokenizer import Tokenizer

    written = []
    try:
        tokenizer = Tokenizer.from_gguf(gguf_path)
        written = save_tokenizer(tokenizer, dst) if tokenizer is not None else []
    except Exception as e:  # noqa: BLE001 - the weights are converted; the tokenizer is a bonus
        if strict:
            raise
        note(f"note: could not rebuild the tokenizer ({' '.join(str(e).split())})")
    if written:
        note(f"tokenizer: rebuilt from the GGUF vocabulary as {', '.join(written)}")
    else:
        note(f"note: the GGUF's tokenizer is not converted; copy tokenizer files into {dst} to use it with text prompts")


def verify_logits(model, dst: Path, dtype) -> None:
    """Load the written checkpoint and compare its logits with the source model's on a few tokens."""
    converted = load_model(dst, device="cpu", dtype=dtype)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(tokens), converted(tokens)
    if not torch.equal(a, b):
        raise RuntimeError(f"{dst}: the converted model's logits differ from the source's "
                           f"(max abs diff {(a - b).abs().max().item():.3g})")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of a checkpoint folder (tokenizer.model*, tokenizer.json, ...) to `dst`."""
    copied = []
    if not src.is_dir():
        return copied
    names = [p.name for p in sorted(src.glob("tokenizer.model*")) if p.is_file()]
    names += [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for name in names:
        shutil.copyfile(src / name, dst / name)
        copied.append(name)
    return copied


def save_tokenizer(tokenizer, dst: Path) -> list[str]:
    """Write a `tokenizers`-backed Tokenizer (e.g. one rebuilt from a GGUF vocabulary) as tokenizer.json
    + tokenizer_config.json (+ generation_config.json for extra stop ids). Returns the files written,
    or [] where the tokenizer has no `tokenizers` backend to save."""
    backend = getattr(tokenizer, "_hf", None)
    if backend is None or not hasattr(backend, "save"):
        return []
    backend.save(str(dst / "tokenizer.json"))
    config = {"bos_token": tokenizer.bos_token or None, "eos_token": tokenizer.eos_token or None,
              "add_bos_token": bool(tokenizer.add_bos)}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    written = ["tokenizer.json", "tokenizer_config.json"]
    stops = sorted(getattr(tokenizer, "stop_token_ids", ()) or ())
    if stops:
        gen = {"eos_token_id": stops if len(stops) > 1 else stops[0]}
        if tokenizer.bos_id is not None:
            gen["bos_token_id"] = tokenizer.bos_id
        (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        written.append("generation_config.json")
    return written
