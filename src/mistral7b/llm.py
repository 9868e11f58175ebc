"""The Python API: `LLM` loads a model and its tokenizer and generates through the engine."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import Engine, EngineConfig, Request, TokenLogprob
from .loading import load_model
from .lora import LoRARequest
from .quant.config import resolve as resolve_quantize
from .sampling import SamplingParams
from .tokenizer import Tokenizer, check_roles, with_safe_prompt
from .utils import default_device, expand_path, resolve_dtype


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None

    @classmethod
    def of(cls, request: Request) -> "CompletionOutput":
        return cls(request.prompt_ids, request.text, request.output_ids, request.finish_reason, request.logprobs)


class LLM:
    """A model, its tokenizer (if the checkpoint has one) and an engine.

    `source=None` uses the bundled default model. Prompts are strings, or token id lists for
    checkpoints without a tokenizer. `close()` (or leaving `with LLM(...) as llm:`) frees the engine,
    its KV cache and the weights.
    """

    def __init__(
        self,
        source: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        engine_config: EngineConfig | None = None,
        quantize=None,
        tensor_parallel_size: int = 1,
        **engine_options,
    ):
        """`engine_config` (or `engine_options`, EngineConfig's fields: `max_batch`, `chunk_size`,
        `prefill_budget`, `max_seq_len`, `decode_steps`, `compile`, `pipeline`, `prefix_cache_gib`,
        `prefix_block_size`, `kv_cache_dtype`, ...) sets up the engine. `prefix_cache_gib=1` turns on prefix
        caching: prompts that share a prefix reuse its KV (exact, sliding window included); off by default.
        `compile=True` compiles the decode step with CUDA graphs: about a minute and a half at the 7B
        shape before the first token, then several times faster decode (benchmarks/RESULTS.md).
        `quantize` ("int8", "int4", "none" or a mistral7b.quant.QuantConfig) quantizes the weights at
        load (also when sharded); a GGUF file runs in its own quantized formats without it.
        `tensor_parallel_size=N` splits the model over N processes (GPUs, or gloo on CPU) with
        mistral7b.parallel; N divides the KV heads.
        `speculative=SpeculativeConfig(method="ngram"|"draft"|"self-int4", num_tokens=k, draft=SRC)` turns
        on speculative decoding (engine/speculative.py): same output distribution, more tokens per forward.
        `max_loras` and `max_lora_rank` size the LoRA adapter slots (made when `generate(..., lora=...)` or
        `engine.load_lora` first loads one)."""
        start = time.perf_counter()
        engine_config = EngineConfig.of(engine_config, **engine_options)  # a wrong option fails before loading
        if source is None:
            from .default_model import default_model_path

            source = default_model_path()
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.quant = resolve_quantize(quantize)  # the one value every layer below reads
        # The tokenizer first: its parse is transient memory that then does not stack on the weights'
        # (the default model's peak RSS 553 -> 5xx MB), and a bad vocabulary fails before a long load.
        self.tokenizer = Tokenizer.from_source(tokenizer_path(source))
        self._model = self._load(source, tensor_parallel_size)
        self.source = source
        draft = None
        if engine_config.speculative is not None:
            from .engine.proposers import load_draft

            draft = load_draft(engine_config.speculative, source, self.device, self.dtype)
        self._engine = Engine(self.model, self.tokenizer, engine_config.within(self.model.config), draft_model=draft)
        self._load_seconds = time.perf_counter() - start

    @property
    def load_seconds(self) -> float:
        """Seconds this LLM took to load: tokenizer, weights (and draft) and engine."""
        return self._load_seconds

    def _load(self, source, tensor_parallel_size: int):
        if tensor_parallel_size == 1:
            return load_model(source, self.device, self.dtype, quantize=self.quant)
        from .parallel import launch

        return launch(source, tensor_parallel_size, self.device, self.dtype, quant=self.quant)

    def close(self) -> None:
        """Free the engine, its KV cache and the weights, and stop tensor-parallel workers, if any (they
        also stop at exit); using the LLM afterwards raises "this LLM is closed". Closing twice is fine."""
        model, self._model, self._engine = self._model, None, None
        if model is None:
            return
        if hasattr(model, "close"):
            model.close()
        del model
        gc.collect()  # the engine's parts refer to each other: free the memory now, not at some later collection
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model(self):
        if self._model is None:
            raise RuntimeError("this LLM is closed")
        return self._model

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this LLM is closed")
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:  # tests and benchmarks swap in engines of other settings
        self._engine = engine

    @property
    def config(self):
        return self.model.config

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
            if not prompt.isascii():
                try:
                    prompt.encode("utf-8")
                except UnicodeEncodeError:  # the tokenizer's own error would be a TypeError about its types
                    raise ValueError("the prompt contains a lone UTF-16 surrogate (such as \\ud800), which is "
                                     "not valid Unicode text") from None
            return self.tokenizer.encode(prompt, bos=True)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        return list(prompt)

    def chat_prompt(self, messages: list[dict], safe_prompt: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer, so it has no chat format")
        check_roles(messages)
        if safe_prompt:
            messages = with_safe_prompt(messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 lora: LoRARequest | list[LoRARequest | None] | None = None) -> list[CompletionOutput]:
        """One output per prompt; ragged prompts run together as one continuously batched workload.
        `params` is one SamplingParams for all prompts or a list of one per prompt; `lora` likewise one
        LoRARequest (a PEFT adapter, loaded on first use) or a list of one per prompt (None: the base model)."""
        engine = self.engine  # a closed LLM says so before anything else
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [self.encode_prompt(p) for p in prompts]
        per_prompt = _per_prompt(SamplingParams() if params is None else params, len(encoded), "SamplingParams")
        adapters = _per_prompt(lora, len(encoded), "LoRARequests")
        for ids, p in zip(encoded, per_prompt):  # reject the whole call before any work starts
            engine.validate(ids, p)
        requests = []
        try:
            for ids, p, adapter in zip(encoded, per_prompt, adapters):
                requests.append(engine.add(ids, p, lora=adapter))
            while not all(r.finished for r in requests):
                engine.step()
        finally:
            for r in requests:
                if not r.finished:
                    engine.abort(r)
        return [CompletionOutput.of(r) for r in requests]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas as they become final; `stream_request` gives the request too."""
        for delta in self.stream_request(self.encode_prompt(prompt), params)[1]:
            yield delta

    def stream_request(self, prompt_ids: list[int], params: SamplingParams | None = None):
        request = self.engine.add(prompt_ids, params or SamplingParams())

        def deltas():
            try:
                while not request.finished:
                    for d in self.engine.step():
                        if d.request is request and d.text:
                            yield d.text
            finally:
                if not request.finished and self._engine is not None:  # close() has dropped every request
                    self._engine.abort(request)

        return request, deltas()

    def chat(self, messages: list[dict], params: SamplingParams | None = None, safe_prompt: bool = False) -> CompletionOutput:
        return self.generate([self.chat_prompt(messages, safe_prompt)], params)[0]


def _per_prompt(value, n: int, what: str) -> list:
    """One value per prompt: a list of n as given, or one value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {what} for {n} prompts")
        return list(value)
    return [value] * n


def tokenizer_path(source) -> Path:
    """Where the tokenizer of a checkpoint lives: the GGUF itself, or the checkpoint folder."""
    from .loading import hub

    path = expand_path(source)
    if path.exists():
        return path.parent if path.name in ("config.json", "params.json") else path
    return hub.resolve(str(source))
