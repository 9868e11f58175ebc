"""Model configuration: one dataclass, the Mistral presets, and readers for each checkpoint format's config."""

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _build(path: Path, **kwargs) -> ModelConfig:
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from None


def from_params_json(path: Path) -> ModelConfig:
    """Mistral's `params.json`. v0.1's file has no rope_theta: 10000 when windowed, else 1e6."""
    p = _read_json(path)
    try:
        window = p.get("sliding_window")
        return _build(
            path,
            dim=p["dim"],
            n_layers=p["n_layers"],
            head_dim=p.get("head_dim", p["dim"] // p["n_heads"]),
            hidden_dim=p["hidden_dim"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads", p["n_heads"]),
            norm_eps=p.get("norm_eps", 1e-5),
            vocab_size=p["vocab_size"],
            rope_theta=p.get("rope_theta", 10000.0 if window else 1e6),
            sliding_window=window,
            max_seq_len=p.get("max_seq_len", p.get("max_position_embeddings", 32768)),
            tie_embeddings=p.get("tied_embeddings", False),
            name=path.parent.name,
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: missing field {e.args[0]!r}") from None


def from_hf_config(path: Path) -> ModelConfig:
    """HF `config.json` for the mistral and llama model types."""
    c = _read_json(path)
    model_type = c.get("model_type")
    if model_type not in ("mistral", "llama"):
        raise ModelLoadError(f"{path}: unsupported model_type {model_type!r} (expected 'mistral' or 'llama')")
    try:
        window = c.get("sliding_window") if model_type == "mistral" else None
        layer_types = c.get("layer_types")
        if window is not None and layer_types:
            window = tuple(window if t == "sliding_attention" else None for t in layer_types)
        # transformers 5 writes the scaling into `rope_parameters` (rope_type != "default"), older ones into `rope_scaling`.
        for key, absent in (("rope_scaling", None), ("rope_parameters", "default")):
            scaling = c.get(key) or {}
            if scaling and scaling.get("rope_type", scaling.get("type", absent)) != "default":
                raise ModelLoadError(f"{path}: {key} {scaling!r} is not supported")
        rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return _build(
            path,
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            vocab_size=c["vocab_size"],
            rope_theta=float(rope_theta),
            sliding_window=window,
            max_seq_len=c.get("max_position_embeddings", 32768),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            name=path.parent.name,
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: missing field {e.args[0]!r}") from None


def from_gguf_metadata(path: Path, meta: dict[str, Any], has_output: bool) -> ModelConfig:
    """GGUF key/values (already decoded) of the llama architecture; `has_output` says if `output.weight` exists."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (only 'llama' is supported)")
    try:
        dim = int(meta["llama.embedding_length"])
        n_heads = int(meta["llama.attention.head_count"])
        vocab = meta.get("llama.vocab_size") or meta["tokenizer.ggml.tokens.count"]
        window = meta.get("llama.attention.sliding_window")
        return _build(
            path,
            dim=dim,
            n_layers=int(meta["llama.block_count"]),
            head_dim=int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or dim // n_heads),
            hidden_dim=int(meta["llama.feed_forward_length"]),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            vocab_size=int(vocab),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            sliding_window=int(window) if window else None,
            max_seq_len=int(meta.get("llama.context_length", 4096)),
            tie_embeddings=not has_output,
            name=str(meta.get("general.name", path.stem)),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: missing GGUF metadata {e.args[0]!r}") from None
