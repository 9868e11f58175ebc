"""Hub ids such as `mistralai/Mistral-7B-v0.1`, resolved from huggingface_hub's local cache only."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import ModelLoadError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source))


def resolve(repo_id: str) -> Path:
    """The cached snapshot folder; never downloads, and says how to when the files are not cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - every failure here means "not in the local cache"
        raise ModelLoadError(
            f"{repo_id}: not found locally and not in the Hugging Face cache; download it first with "
            f"`huggingface-cli download {repo_id}` (or `hf download {repo_id}`), or pass a local folder or .gguf file"
        ) from None
