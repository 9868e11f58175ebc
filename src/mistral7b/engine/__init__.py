"""The engine, split as vLLM splits it: `config` (`EngineConfig`, `SpeculativeConfig`, `ModelInfo`),
`request` (the state of a request), `scheduler` (admission, cache rows, the prefill plan, the one place
requests are updated from a step's output), `runner` (the model, compile, CUDA graphs, decode groups,
kv_len buckets), `output` (a token's text: detokenising, stop strings, hold-back), `constraints`
(structured-output bitmasks per step), `speculative` (verify and acceptance), `proposers` (n-gram and
draft-model proposals), `prefix_cache` (cached prompt blocks) and `core` (`Engine.step`)."""

from .config import EngineConfig, ModelInfo, SpeculativeConfig
from .core import Engine
from .request import Delta, Request, TokenLogprob

__all__ = ["Engine", "EngineConfig", "ModelInfo", "Request", "Delta", "TokenLogprob", "SpeculativeConfig"]
