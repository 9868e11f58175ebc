"""Model configuration: one dataclass and the Mistral presets. Each checkpoint format's config reader
lives with its loader in `loading/`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ModelLoadError(Exception):
    """A checkpoint could not be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    norm_eps: float = 1e-5
    vocab_size: int = 32000
    rope_theta: float = 10000.0
    # None (full attention), one window for every layer, or one entry per layer (None = full).
    sliding_window: int | tuple[int | None, ...] | None = 4096
    max_seq_len: int = 32768
    tie_embeddings: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        if isinstance(self.sliding_window, list):
            object.__setattr__(self, "sliding_window", tuple(self.sliding_window))
        problems = []
        for f in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                problems.append(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if isinstance(self.sliding_window, tuple) and len(self.sliding_window) != self.n_layers:
            problems.append(f"sliding_window has {len(self.sliding_window)} entries for {self.n_layers} layers")
        for w in self.layer_windows() if not problems else ():
            if w is not None and (not isinstance(w, int) or w <= 0):
                problems.append(f"sliding_window must be a positive integer or None, got {w!r}")
                break
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def layer_windows(self) -> list[int | None]:
        if isinstance(self.sliding_window, tuple):
            return list(self.sliding_window)
        return [self.sliding_window] * self.n_layers

    @property
    def has_window(self) -> bool:
        """True when every layer is windowed, so sequences may grow without bound."""
        return all(w is not None for w in self.layer_windows())

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    def kv_bytes_per_token(self, bytes_per_element: int = 2, n_kv_heads: int | None = None) -> int:
        return 2 * self.n_layers * (n_kv_heads or self.n_kv_heads) * self.head_dim * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["sliding_window"], tuple):
            d["sliding_window"] = list(d["sliding_window"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


_V01 = ModelConfig(name="mistral-7b-v0.1")
PRESETS: dict[str, ModelConfig] = {
    "mistral-7b-v0.1": _V01,
    "mistral-7b-v0.2": _V01.with_(name="mistral-7b-v0.2", sliding_window=None, rope_theta=1e6, max_seq_len=32768),
    "mistral-7b-v0.3": _V01.with_(
        name="mistral-7b-v0.3", sliding_window=None, rope_theta=1e6, max_seq_len=32768, vocab_size=32768
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def read_json(path: Path) -> dict[str, Any]:
    """A config file's JSON object; every failure is a ModelLoadError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def build_config(path: Path, **kwargs) -> ModelConfig:
    """A ModelConfig read from `path`; an invalid one is a ModelLoadError naming the file."""
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
