"""lm-evaluation-harness's model `mistral7b`: `LLM` behind lm-eval's `LM` interface.

    python -m mistral7b.lm_eval_model run --model mistral7b --model_args pretrained=SRC,quantize=int4 --tasks ...

lm-eval 0.4.13's CLI finds only the models in its own registry (it has no plugin entry point), so this
module's `__main__` registers `mistral7b` and then runs lm-eval's CLI with the same arguments. In Python,
`from mistral7b.lm_eval_model import MistralLM` registers it too. lm_eval is imported only then: the
library never needs it.

Every request runs through the engine, batched as the engine batches: a loglikelihood is the sum of
the prompt log-probabilities of the continuation's tokens (lm-eval's `(context, continuation)` split,
tokenized by lm-eval's rules: no BOS unless `add_bos_token=True`); a rolling loglikelihood scores the
whole text after the prefix token (BOS), through the cache, so past a sliding window every token sees
exactly its window (lm-eval's `hf` cuts the text into disjoint windows instead). A text longer than the
engine's context goes through `evaluate.perplexity`, which needs no maximum for a windowed model.
"""

from __future__ import annotations

import functools
import sys

import torch
from tqdm import tqdm

from .evaluate import perplexity
from .llm import LLM
from .sampling import SamplingParams
from .tokenizer.templates import render_chat_template

WAVE = 256  # requests given to the engine at once: bounds the prompt log-probabilities held in memory


class _Harness:
    """The methods of `MistralLM`; the class itself also derives from lm-eval's TemplateLM."""

    def __init__(self, pretrained: str | None = None, quantize: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size=None, max_batch: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool = False, **engine_options):
        """`pretrained`: what `LLM` loads (None: the default model); `batch_size` (lm-eval's flag) or
        `max_batch` is the engine's batch; other keywords are EngineConfig's fields."""
        super().__init__()
        engine_options.pop("max_batch_size", None)  # lm-eval's cap for batch_size=auto: the engine batches
        if max_batch is None and str(batch_size or "").isdigit() and int(batch_size) > 0:
            max_batch = int(batch_size)
        if max_batch is not None:
            engine_options["max_batch"] = int(max_batch)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's CLI asks for cuda unless told otherwise: run where we can, as its hf does
        self.llm = LLM(None if pretrained in (None, "", "None") else pretrained, device=device, dtype=dtype,
                       quantize=quantize, **engine_options)
        if self.llm.tokenizer is None:
            raise ValueError("lm-eval needs text: this checkpoint has no tokenizer")
        self.tokenizer = self.llm.tokenizer
        self.max_gen_toks, self.add_bos_token = int(max_gen_toks), _flag(add_bos_token)

    # ---- tokens -------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is (as lm-eval's `hf`): BOS, or EOS for a tokenizer without one."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int | None:
        """Prompt tokens the engine takes with one token to generate (None: no limit, a sliding window)."""
        limit = self.llm.engine.cache.max_positions
        return None if limit is None else limit - 1

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bool(bos))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def chat_template(self, chat_template=False) -> str:
        return (self.tokenizer.chat_template or "") if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text (`--apply_chat_template`); tok_encode reads its control tokens back."""
        t = self.tokenizer
        if not t.chat_template:  # Mistral's sentencepiece chat formats are token ids, with no text form
            raise ValueError(f"{t.name} has no chat template to render as text")
        return render_chat_template(t.chat_template, chat_history, add_generation_prompt=add_generation_prompt,
                                    bos_token=t.bos_token, eos_token=t.eos_token)

    # ---- requests -----------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
        prompts, lengths = [], []
        for _, context, continuation in requests:
            ids = context + continuation
            if self.max_length is not None and len(ids) > self.max_length:
                if len(continuation) >= self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context")
                ids = ids[-self.max_length:]  # left-truncate the context, as lm-eval's backends do
            prompts.append(ids)
            lengths.append(len(continuation))
        results = []
        for (key, _, _), entries, n in zip(requests, self._prompt_logprobs(prompts, disable_tqdm), lengths):
            tail = entries[len(entries) - n:]
            answer = (sum(e.logprob for e in tail), all(e.top[0][0] == e.token_id for e in tail))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after the prefix token, in one pass through the cache."""
        texts = [[self.prefix_token_id] + self.tok_encode(req.args[0]) for req in requests]
        short = [i for i, ids in enumerate(texts) if self.max_length is None or len(ids) <= self.max_length]
        scores = [0.0] * len(texts)
        for i, entries in zip(short, self._prompt_logprobs([texts[i] for i in short], disable_tqdm)):
            scores[i] = sum(e.logprob for e in entries[1:])
        for i in sorted(set(range(len(texts))) - set(short)):
            scores[i] = -perplexity(self.llm.model, texts[i], progress=False).nll_sum
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, score)
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample`) text up to the first of the `until` strings."""
        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            p = self._sampling_params(dict(gen_kwargs))
            ids = self.tok_encode(context)
            if self.max_length is not None:
                ids = ids[-max(self.max_length + 1 - p.max_tokens, 1):]
            prompts.append(ids)
            params.append(p)
        texts = [r.text for r in self._run(prompts, params, "generate_until", disable_tqdm)]
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def _sampling_params(self, gen_kwargs: dict) -> SamplingParams:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_tokens", self.max_gen_toks)))
        sample = _flag(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0 if sample else 0.0))
        return SamplingParams(max_tokens=max_tokens, temperature=temperature if sample else 0.0,
                              top_p=float(gen_kwargs.pop("top_p", 1.0)), stop=until or None,
                              seed=gen_kwargs.pop("seed", None))

    # ---- the engine ---------------------------------------------------------------------------------

    def _prompt_logprobs(self, prompts: list[list[int]], disable_tqdm: bool) -> list[list]:
        """Each prompt's log-probability entries (None for its first token), from one prefill each."""
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        return [r.prompt_logprobs for r in self._run(prompts, [params] * len(prompts), "loglikelihood", disable_tqdm)]

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], what: str, disable_tqdm: bool):
        """The finished engine requests, in order; at most WAVE of them wait in the engine at once."""
        engine, done = self.llm.engine, []
        for ids, p in zip(prompts, params):  # a bad request fails before any work starts
            engine.validate(ids, p)
        with tqdm(total=len(prompts), desc=what, disable=disable_tqdm or None, file=sys.stderr) as bar:
            for start in range(0, len(prompts), WAVE):
                wave = []
                try:
                    for ids, p in zip(prompts[start:start + WAVE], params[start:start + WAVE]):
                        wave.append(engine.add(ids, p))
                    while not all(r.finished for r in wave):
                        engine.step()
                        bar.update(sum(r.finished for r in wave) + len(done) - bar.n)
                finally:
                    for r in wave:
                        if not r.finished:
                            engine.abort(r)
                done += wave
        return done


def _flag(value) -> bool:
    """A boolean from lm-eval's `--model_args` (strings such as "True" or "false")."""
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


@functools.cache
def model_class():
    """`MistralLM`, registered in lm-eval's model registry as `mistral7b` (imports lm_eval)."""
    import lm_eval.models  # noqa: F401  lm-eval's own models first: it fills an empty registry only
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    @register_model("mistral7b")
    class MistralLM(_Harness, TemplateLM):
        """lm-eval's model `mistral7b` (module docstring of mistral7b.lm_eval_model)."""

    MistralLM.__module__ = __name__
    return MistralLM


def __getattr__(name: str):
    if name == "MistralLM":  # lazily: importing this module does not import lm_eval
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `mistral7b` among its models."""
    model_class()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
