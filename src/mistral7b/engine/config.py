"""`EngineConfig`: every engine knob in one typed dataclass, taken by `LLM`, `serve` and `bench` alike, with
speculative decoding's own (`SpeculativeConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import torch

from ..config import ModelConfig

METHODS = ("ngram", "draft", "self-int4")  # speculative decoding's proposers (engine/proposers.py)
MAX_NUM_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"  # "ngram" (prompt lookup), "draft" (a second model) or "self-int4" (target in int4)
    num_tokens: int = 4  # k: tokens proposed per row and step
    draft: str | None = None  # the draft model's source, for method="draft"
    max_ngram: int = 4  # n-gram lookup tries n = max_ngram .. min_ngram, longest first
    min_ngram: int = 1
    # n-gram: a match of n tokens drafts at most draft_by_match[n - 1] tokens (0: none), a longer one
    # num_tokens. None: by the verify's width (proposers.draft_lengths).
    draft_by_match: tuple[int, ...] | None = None
    # Speculate only while at most this many rows decode: a larger batch is compute-bound and a verify
    # of k+1 tokens per row then costs about k+1 decode steps. None: MEASURED_MAX_BATCH for the device.
    max_batch: int | None = None
    # n-gram only: earlier requests' outputs, up to this many tokens, as drafts (proposers.SuffixCache); 0: off
    suffix_cache_tokens: int = 0
    # A row whose verifies emit fewer tokens than a speculative step costs decodes plainly for a while
    # (spec_backoff.SpecBackoff); False: every row speculates at every step.
    backoff: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.num_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_NUM_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, {MAX_NUM_TOKENS}], got {k!r}")
        if (self.method == "draft") != (self.draft is not None):
            raise ValueError("a draft model source (draft=...) is needed with method 'draft', and only with it")
        if not (isinstance(self.min_ngram, int) and isinstance(self.max_ngram, int) and 1 <= self.min_ngram <= self.max_ngram):
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        drafts = self.draft_by_match
        if drafts is not None and not (isinstance(drafts, tuple) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in drafts)):
            raise ValueError(f"draft_by_match must be a tuple of draft lengths (0 or more), got {drafts!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise ValueError(f"speculative max_batch must be a positive integer, got {self.max_batch!r}")
        cap = self.suffix_cache_tokens
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"the speculative suffix cache size must be a whole number of tokens, got {cap!r}")
        if cap and self.method != "ngram":
            raise ValueError(f"the speculative suffix cache works with method 'ngram' only, not {self.method!r}")
        if not isinstance(self.backoff, bool):
            raise ValueError(f"speculative backoff must be true or false, got {self.backoff!r}")

    @classmethod
    def parse(cls, spec: str | None, num_tokens: int | None = None, suffix_cache_tokens: int | None = None,
              backoff: bool | None = None) -> "SpeculativeConfig | None":
        """From the CLI's `--speculative ngram|self-int4|draft:SRC`, `--num-speculative-tokens`,
        `--speculative-suffix-cache` and `--[no-]speculative-backoff`."""
        if not spec:
            if num_tokens is not None:
                raise ValueError("--num-speculative-tokens needs --speculative")
            if suffix_cache_tokens is not None:
                raise ValueError("--speculative-suffix-cache needs --speculative ngram")
            if backoff is not None:
                raise ValueError("--[no-]speculative-backoff needs --speculative")
            return None
        method, _, draft = spec.partition(":")
        if method == "draft" and not draft:
            raise ValueError("--speculative draft needs the draft model's source: draft:SRC")
        options = {} if num_tokens is None else {"num_tokens": num_tokens}
        if suffix_cache_tokens is not None:
            options["suffix_cache_tokens"] = suffix_cache_tokens
        if backoff is not None:
            options["backoff"] = backoff
        return cls(method, draft=draft or None, **options)


KV_CACHE_DTYPES = ("auto", "float16")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # sequences decoded together, one preallocated cache row each
    chunk_size: int | None = None  # prompt tokens per prefill forward; None: the largest window, else 4096
    prefill_budget: int | None = None  # prompt tokens per step over all requests; None: chunk_size
    max_seq_len: int | None = None  # cache positions per sequence on layers without a window; None: the model's
    decode_steps: int | None = None  # decode steps run back to back; None: 8 on CUDA, 1 elsewhere
    compile: bool = False  # torch.compile the decode step (with CUDA graphs on a GPU)
    pipeline: bool | None = None  # launch the next decode steps before reading the last; None: on CUDA
    prefix_cache_gib: float = 0.0  # memory for cached prompt blocks (prefix caching); 0: off
    prefix_block_size: int | None = None  # tokens per cached block; None: 64, or the smallest cache layer if less
    speculative: SpeculativeConfig | None = None  # speculative decoding (engine/speculative.py); None: off
    # A request's answer does not depend on its batch: each prompt is cut into prefill chunks by its own
    # length alone, and on CUDA the model runs batch_invariant's kernels (its cost: README). None: on the
    # CPU, whose kernels are invariant already; off on a GPU (denser packing, cuBLAS and autotuned tiles).
    batch_invariant: bool | None = None
    max_loras: int = 4  # LoRA adapters loaded at once (engine/adapters.py); their slots are made on the first load
    max_lora_rank: int = 16  # the largest adapter rank those slots hold
    # The KV cache's dtype: "auto", the model's; "float16" on a CPU, half the bytes a decode step reads from
    # the cache (llama.cpp's default), which bound a step past a few hundred positions: ModelRunner.
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("chunk_size", "prefill_budget", "max_seq_len", "decode_steps"):  # 0 means the default, as None
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        gib = self.prefix_cache_gib
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 <= gib < float("inf"):
            raise ValueError(f"prefix_cache_gib must be a finite number >= 0, got {gib!r}")
        block = self.prefix_block_size
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(f"prefix_block_size must be a positive integer, got {block!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ValueError(f"speculative must be a SpeculativeConfig, got {type(self.speculative).__name__}")

    def within(self, model: ModelConfig) -> "EngineConfig":
        """This config with max_seq_len no longer than the model's context (a cache sized to a request
        may ask for more; the model's limit is what requests are checked against)."""
        if self.max_seq_len and self.max_seq_len > model.max_seq_len:
            return replace(self, max_seq_len=None)
        return self

    @property
    def prefix_cache_bytes(self) -> int:
        return int(self.prefix_cache_gib * 2**30)

    def resolved(self, model: ModelConfig, device: torch.device) -> "EngineConfig":
        """This config with every None replaced by the default for `model` on `device`."""
        windows = [w for w in model.layer_windows() if w is not None]
        chunk = self.chunk_size or (max(windows) if windows else 4096)
        cuda = device.type == "cuda"
        return replace(
            self,
            chunk_size=chunk,
            prefill_budget=self.prefill_budget or chunk,
            decode_steps=self.decode_steps or (8 if cuda else 1),
            pipeline=cuda if self.pipeline is None else self.pipeline,
            batch_invariant=not cuda if self.batch_invariant is None else self.batch_invariant,
        )

    @classmethod
    def from_dict(cls, fields: dict) -> "EngineConfig":
        """The inverse of `dataclasses.asdict` (how `serve` sends the config to its engine process as JSON):
        the nested speculative config comes back as a SpeculativeConfig."""
        spec = fields.get("speculative")
        if isinstance(spec, dict):
            if isinstance(spec.get("draft_by_match"), list):  # JSON's array for the tuple
                spec = {**spec, "draft_by_match": tuple(spec["draft_by_match"])}
            fields = {**fields, "speculative": SpeculativeConfig(**spec)}
        return cls(**fields)

    @classmethod
    def of(cls, config: "EngineConfig | None" = None, **options) -> "EngineConfig":
        """`config` (or the defaults) with `options` changed; an unknown option is a TypeError naming it
        and the known ones (`model=` gets the argument vLLM users mean: the first, `source`)."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            hint = " (the model is the first argument, `source`)" if "model" in unknown else ""
            raise TypeError(f"unknown option {', '.join(map(repr, unknown))}{hint}; the engine's options are "
                            f"{', '.join(known)}")
        return replace(config or cls(), **options)


@dataclass(frozen=True)
class ModelInfo:
    """The served model's facts and its engine's limits, as a server reads them (an engine in its own
    process sends them once it has loaded the model)."""

    vocab_size: int
    max_seq_len: int  # the model's context (its config)
    max_positions: int | None  # the longest sequence the cache holds; None: every layer rolls, unbounded
    dtype: str  # torch's name: "bfloat16", "float32"...
    max_batch: int  # cache rows
    compiled: bool
    prefix_cache: bool
    speculative_tokens: int | None  # draft tokens verified per step; None: speculative decoding is off

    @classmethod
    def of(cls, engine) -> "ModelInfo":
        """`engine`'s (an `Engine`)."""
        spec = engine.speculator
        return cls(engine.config.vocab_size, engine.config.max_seq_len, engine.cache.max_positions,
                   str(engine.runner.dtype).removeprefix("torch."), engine.max_batch, engine.compiled,
                   engine.prefix is not None, spec.config.num_tokens if spec is not None else None)

    @property
    def max_model_len(self) -> int:
        """The context a request may fill: the cache's limit, else the model's."""
        return self.max_positions or self.max_seq_len
