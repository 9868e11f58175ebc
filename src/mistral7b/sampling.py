"""Sampling parameters and a batched sampler that runs on the logits' device.

Every row of a batch carries its own parameters as tensors, so one call serves a mixed batch
(greedy next to top-p next to seeded rows) without a host round trip per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # top log-probabilities per prompt token (as vLLM; prefix cache skipped)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    # OpenAI's logit_bias: token id -> a bias in [-100, 100] added to its logit before sampling (greedy too).
    logit_bias: dict[int, float] | None = None
    # Structured outputs (at most one; see structured.py): a JSON schema (dict or JSON text), a regex,
    # a Lark or GBNF grammar, or a list of strings the output must be one of.
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))) or not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise ValueError("stop must be a string or a list of strings, and stop_token_ids a list of integers")
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("temperature", _float32(self.temperature) and self.temperature >= 0, f"must be >= 0, got {self.temperature}"),
            ("top_p", _float32(self.top_p) and 0 < self.top_p <= 1, f"must be in (0, 1], got {self.top_p}"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, f"must be an integer >= 0 (0 = off), got {self.top_k}"),
            ("min_p", _float32(self.min_p) and 0 <= self.min_p <= 1, f"must be in [0, 1], got {self.min_p}"),
            ("max_tokens", _integer(self.max_tokens) and self.max_tokens >= 1, f"must be an integer >= 1, got {self.max_tokens}"),
            ("repetition_penalty", _float32(self.repetition_penalty) and self.repetition_penalty > 0, f"must be > 0, got {self.repetition_penalty}"),
            ("presence_penalty", _float32(self.presence_penalty) and -2 <= self.presence_penalty <= 2, f"must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", _float32(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, f"must be in [-2, 2], got {self.frequency_penalty}"),
            ("logprobs", self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= 20), f"must be an integer in [0, 20], got {self.logprobs}"),
            ("prompt_logprobs", self.prompt_logprobs is None or (_integer(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20), f"must be an integer in [0, 20], got {self.prompt_logprobs}"),
            ("seed", self.seed is None or _integer(self.seed), f"must be an integer, got {self.seed!r}"),
            ("stop", all(isinstance(s, str) for s in self.stop), "must be a string or a list of strings"),
            ("stop_token_ids", all(_integer(t) and t >= 0 for t in self.stop_token_ids), "must be non-negative integers"),
            ("logit_bias", _bias_ok(self.logit_bias), "must map token ids (integers >= 0) to biases in [-100, 100]"),
        ]
        problems = [(name, message) for name, ok, message in checks if not ok]
        if problems:
            raise SamplingParamsError("; ".join(f"{name} {message}{_float32_note(getattr(self, name))}"
                                                for name, message in problems), problems[0][0])
        if self.constrained:
            from .structured import validate_params

            validate_params(self)  # StructuredOutputError (a ValueError) naming what does not compile

    @property
    def constrained(self) -> bool:
        return any(x is not None for x in (self.json_schema, self.regex, self.grammar, self.choice))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingParamsError(ValueError):
    """A bad sampling parameter; `param` names the (first) one."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# The sampler computes in float32: a nonzero number below its smallest normal value flushes to (near) zero
# (a repetition penalty of 1e-40 then divides by zero), one above its largest becomes infinite.
_F32 = torch.finfo(torch.float32)


def _float32(x) -> bool:
    """A finite real number that float32 holds without overflow or underflow to a subnormal."""
    return _finite(x) and (x == 0 or _F32.tiny <= abs(x) <= _F32.max)


def _float32_note(x) -> str:
    if _finite(x) and not _float32(x):
        return f" ({x} is outside the range float32 holds: 0, or {_F32.tiny:.3g} to {_F32.max:.3g} in magnitude)"
    return ""


def _bias_ok(bias) -> bool:
    if bias is None:
        return True
    return isinstance(bias, dict) and all(_integer(k) and k >= 0 and _float32(v) and -100 <= v <= 100
                                          for k, v in bias.items())


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplerBatch:
    """Per-row sampling state for a fixed number of rows, kept on the device."""

    n_rows: int
    vocab_size: int
    device: torch.device
    temperature: Tensor = field(init=False)
    top_p: Tensor = field(init=False)
    top_k: Tensor = field(init=False)
    min_p: Tensor = field(init=False)
    repetition: Tensor = field(init=False)
    presence: Tensor = field(init=False)
    frequency: Tensor = field(init=False)
    bias: Tensor = field(init=False)  # [rows, vocab] logit_bias, dense
    counts: Tensor = field(init=False)  # [rows, vocab] generated-token counts
    seen: Tensor = field(init=False)  # [rows, vocab] prompt or generated, for the repetition penalty
    generators: dict = field(init=False)
    penalised: set = field(init=False)  # rows with any penalty on, known on the host
    filtering: set = field(init=False)  # rows with top-k, top-p or min-p on, known on the host
    biased: set = field(init=False)  # rows with a logit_bias, known on the host

    def __post_init__(self):
        f = lambda v: torch.full((self.n_rows,), v, dtype=torch.float32, device=self.device)  # noqa: E731
        self.temperature, self.top_p, self.min_p = f(0.0), f(1.0), f(0.0)
        self.repetition, self.presence, self.frequency = f(1.0), f(0.0), f(0.0)
        self.top_k = torch.zeros(self.n_rows, dtype=torch.long, device=self.device)
        self.counts = torch.zeros(self.n_rows, self.vocab_size, dtype=torch.int32, device=self.device)
        self.seen = torch.zeros(self.n_rows, self.vocab_size, dtype=torch.bool, device=self.device)
        self.bias = torch.zeros(self.n_rows, self.vocab_size, dtype=torch.float32, device=self.device)
        self.biased = set()
        self.generators = {}
        self.penalised = set()
        self.filtering = set()

    def assign(self, row: int, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.temperature[row], self.top_p[row], self.top_k[row] = params.temperature, params.top_p, params.top_k
        self.min_p[row], self.repetition[row] = params.min_p, params.repetition_penalty
        self.presence[row], self.frequency[row] = params.presence_penalty, params.frequency_penalty
        self.counts[row].zero_()
        self.seen[row].zero_()
        if params.repetition_penalty != 1.0 and prompt_ids:
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < self.vocab_size], dtype=torch.long)
            self.seen[row, ids.to(self.device)] = True
        neutral = params.repetition_penalty == 1.0 and params.presence_penalty == 0 and params.frequency_penalty == 0
        (self.penalised.discard if neutral else self.penalised.add)(row)
        unfiltered = params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0
        (self.filtering.discard if unfiltered else self.filtering.add)(row)
        if row in self.biased:
            self.bias[row].zero_()
            self.biased.discard(row)
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
            self.bias[row, ids.to(self.device)] = values.to(self.device)
            self.biased.add(row)
        self.generators.pop(row, None)
        if params.seed is not None:
            self.generators[row] = torch.Generator(device=self.device).manual_seed(params.seed)

    def record(self, rows: Tensor, tokens: Tensor) -> None:
        """Count the tokens just chosen for `rows` (penalties look at them next step)."""
        self.counts[rows, tokens] += 1
        self.seen[rows, tokens] = True

    def noise(self, rows: list[int]) -> Tensor:
        """Exponential noise per row: argmax(p / E) samples from p. Seeded rows use their own stream."""
        e = torch.empty(len(rows), self.vocab_size, device=self.device).exponential_()
        for i, row in enumerate(rows):
            g = self.generators.get(row)
            if g is not None:
                e[i].exponential_(generator=g)
        return e


def apply_penalties(logits: Tensor, rep: Tensor, pres: Tensor, freq: Tensor, counts: Tensor, seen: Tensor) -> Tensor:
    """HF-style repetition penalty over prompt+output; OpenAI presence/frequency over the output."""
    penalised = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
    logits = torch.where(seen, penalised, logits)
    c = counts.to(logits.dtype)
    return logits - freq[:, None] * c - pres[:, None] * (c > 0).to(logits.dtype)


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Temperature, then top-k, top-p and min-p; removed entries become -inf."""
    logits = logits / temperature.clamp(min=1e-5)[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    remove = ranks >= k
    # Top-p (and min-p) look at the distribution top-k left, renormalised, as HF's warpers in sequence do.
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each entry
    remove |= (before >= top_p[:, None]) & (top_p[:, None] < 1)
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """Logits with the tokens whose bit is 0 in `bitmask` [rows, ceil(vocab/32)] (int32, llguidance's
    layout) set to -inf; tokens past the mask's width are forbidden too. The caller's logits are kept."""
    from llguidance.torch import apply_token_bitmask_inplace

    masked = logits.clone()
    apply_token_bitmask_inplace(masked, bitmask)
    return masked


def sample(logits: Tensor, batch: SamplerBatch, rows: list[int], index: Tensor, greedy_only: bool = False,
           bitmask: Tensor | None = None) -> Tensor:
    """Choose one token per row of `logits` [len(rows), vocab] (float32). Greedy rows take the argmax.

    `index` is `rows` already on the device (a host-to-device copy here would stall the GPU queue
    every step); `greedy_only` (known on the host) skips the sampling work when every row is greedy.
    `bitmask` (on the logits' device, one row per row of `logits`) restricts each row to the tokens
    its grammar allows (structured.py); it applies after the penalties and logit_bias, before every filter.
    """
    logits, penalised = adjusted_logits(logits, batch, rows, index, bitmask)
    greedy = logits.argmax(-1)
    if greedy_only:
        if penalised:  # only penalties read the counts (a row's are zeroed when it is assigned)
            batch.record(index, greedy)
        return greedy
    temperature = batch.temperature[index]
    sampled = (warped_logits(logits, batch, rows, index).softmax(-1) / batch.noise(rows)).argmax(-1)
    tokens = torch.where(temperature > 0, sampled, greedy)
    if penalised:
        batch.record(index, tokens)
    return tokens


def adjusted_logits(logits: Tensor, batch: SamplerBatch, rows: list[int], index: Tensor,
                    bitmask: Tensor | None = None) -> tuple[Tensor, bool]:
    """(logits after the penalties, logit_bias and bitmask; whether any row is penalised): what greedy
    takes the argmax of and what the filters then warp."""
    penalised = bool(batch.penalised.intersection(rows))
    if penalised:  # most steps have none: skip five [rows, vocab] passes
        logits = apply_penalties(
            logits, batch.repetition[index], batch.presence[index], batch.frequency[index], batch.counts[index],
            batch.seen[index],
        )
        # A tiny repetition penalty can push a logit past float32's range, and a temperature below 1 then
        # pushes it further: clamp, then shift the row's maximum to 0 (softmax does not change), so that
        # no +inf (hence no inf - inf = NaN) ever reaches the softmax.
        logits = logits.clamp(-_F32.max, _F32.max)
        logits = logits - logits.amax(-1, keepdim=True)
    if batch.biased.intersection(rows):
        logits = logits + batch.bias[index]
    if bitmask is not None:
        logits = apply_bitmask(logits, bitmask)
    return logits, penalised


def warped_logits(logits: Tensor, batch: SamplerBatch, rows: list[int], index: Tensor) -> Tensor:
    """Adjusted logits after temperature, top-k, top-p and min-p: their softmax is what a sampled row draws from."""
    temperature = batch.temperature[index]
    if batch.filtering.intersection(rows):
        return filter_logits(logits, temperature, batch.top_k[index], batch.top_p[index], batch.min_p[index])
    return logits / temperature.clamp(min=1e-5)[:, None]  # temperature only: no [rows, vocab] sort


def top_logprobs(logits: Tensor, tokens: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities of the chosen tokens and the n most likely, under the model's raw distribution."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    top = logp.topk(max(n, 1), dim=-1)
    return chosen, top.values, top.indices
