"""Perplexity of a model on a token sequence: `perplexity(model, ids)`, or `text_perplexity(llm, text)`.

Token i (i >= 1) is scored by the negative log-likelihood of `ids[i]` under the model's distribution
after some of the tokens before it; perplexity is exp(sum of NLL / number scored). Token 0 has no
context and is never scored. Two modes say which tokens before i the model is given:

* **cache** (the default whenever it is possible): the model reads the whole sequence causally, as
  generation would. The text goes through chunked prefill into a `KVCache`, one chunk at a time, and
  every chunk's logits are scored. A windowed model's rolling buffers hold W positions, so past W each
  token sees exactly the W keys of its window, and the result equals one forward pass over the whole
  text however long it is (the memory stays flat). A model with full-attention layers sees the whole
  text too, which bounds the text by its maximum length (`config.max_seq_len`).

* **strided** (HF's recipe, and the only way to score a full-attention model past its maximum length):
  windows of `context` tokens start at 0, `stride`, 2 `stride`, ...; each window is read as a fresh
  sequence (positions from 0) and scores only the tokens that no earlier window scored, each with the
  window's tokens before it as context. With `stride == context` the windows are disjoint and a window's
  first token, which has nothing before it inside the window, is not scored (as in HF's recipe). A
  smaller stride gives every scored token at least `context - stride` tokens of context.

The default (no `context`) is the cache mode when the model can see the whole text: every layer is
windowed, or the text fits in `max_seq_len`. Otherwise it is the strided mode with
`context = max_seq_len` and `stride = max_seq_len // 2`. Passing `context` (and optionally `stride`,
which defaults to `context`) asks for the strided mode.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from .cache import KVCache
from .model import Transformer

DEFAULT_CHUNK = 1024  # prefill chunk: bounds the logits held at once to [batch, 1024, vocab] in fp32


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float  # nats, over the scored tokens
    n_tokens: int  # tokens scored
    n_input_tokens: int  # length of the sequence given
    n_windows: int  # 1 in cache mode
    mode: str  # "cache" or "strided"
    context: int | None  # strided: the window length; cache: None (the whole text)
    stride: int | None
    seconds: float
    # With `keep_tokens=True`: per scored token, in order of position: its position in the sequence,
    # its NLL and the model's argmax prediction for it (teacher-forced greedy choice).
    positions: Tensor | None = field(default=None, repr=False)
    token_nll: Tensor | None = field(default=None, repr=False)
    predictions: Tensor | None = field(default=None, repr=False)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    def to_dict(self) -> dict:
        keys = ("ppl", "mean_nll", "nll_sum", "n_tokens", "n_input_tokens", "n_windows", "mode", "context",
                "stride", "seconds")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) read as one sequence; targets at positions [score_from, end) scored."""

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start


def strided_windows(n: int, context: int, stride: int) -> list[Window]:
    """HF's windows: each starts `stride` after the last and scores what lies past the last one's end."""
    windows, prev_end = [], 0
    for start in range(0, n, stride):
        end = min(start + context, n)
        windows.append(Window(start, end, max(prev_end, start + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def perplexity(
    model: Transformer,
    token_ids: list[int] | Tensor,
    context: int | None = None,
    stride: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int = 1,
    progress: bool = True,
    keep_tokens: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` on `token_ids` (see the module docstring for the modes).

    `chunk_size` is the prefill chunk (the result does not depend on it); `batch_size` is how many
    strided windows of equal length run in one forward. The progress bar goes to stderr.
    """
    ids = _check_ids(model, token_ids)
    n = ids.numel()
    _check_positive("chunk_size", chunk_size)
    _check_positive("batch_size", batch_size)
    mode, context, stride, windows = plan(model, n, context, stride)
    # as the engine does: a parameter gives the device and the activation dtype (the norms' weights are
    # never quantized, where the embedding table may be)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    ids = ids.to(device)
    started = time.perf_counter()
    scored = _Scores(keep_tokens)
    bar = tqdm(total=sum(w.length for w in windows), desc="perplexity", unit="tok", file=sys.stderr,
               disable=None if progress else True, leave=False, dynamic_ncols=True)
    groups = _groups(windows, batch_size if mode == "strided" else 1)
    # one cache for all the groups, reset between them: rows [0, len(group)) hold a group's windows
    cache = KVCache(model.config, max(len(g) for g in groups), device, dtype,
                    max_seq_len=max(w.length for w in windows))
    with torch.inference_mode(), bar:
        for group in groups:
            cache.reset()
            _score_group(model, cache, ids, group, chunk_size, scored, bar)
            bar.set_postfix(ppl=f"{math.exp(scored.nll_sum / max(scored.n, 1)):.4g}", refresh=False)
    seconds = time.perf_counter() - started
    positions, nll, predictions = scored.tensors()
    return PerplexityResult(
        ppl=math.exp(scored.nll_sum / scored.n), nll_sum=scored.nll_sum, n_tokens=scored.n, n_input_tokens=n,
        n_windows=len(windows), mode=mode, context=context, stride=stride, seconds=seconds,
        positions=positions, token_nll=nll, predictions=predictions,
    )


def text_perplexity(llm, text: str, **kwargs) -> PerplexityResult:
    """Perplexity of an `LLM` on `text`, tokenized as a prompt would be (with BOS when the tokenizer adds it)."""
    if not isinstance(text, str):
        raise ValueError(f"the text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty: there is nothing to score")
    if llm.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer: tokenize the text yourself and call perplexity()")
    return perplexity(llm.model, llm.tokenizer.encode(text, bos=True), **kwargs)


def max_positions(model: Transformer) -> int | None:
    """How long a sequence the model can read in one pass, or None when every layer rolls."""
    return None if model.config.has_window else model.config.max_seq_len


def plan(model: Transformer, n: int, context: int | None = None, stride: int | None = None):
    """(mode, context, stride, windows) for a sequence of n tokens; context and stride are None in the
    cache mode. Raises ValueError on a bad context or stride."""
    limit = max_positions(model)
    if context is None:
        if stride is not None:
            raise ValueError("a stride needs a context: give the window length too")
        if limit is None or n <= limit:
            return "cache", None, None, [Window(0, n, 1)]
        context, stride = limit, limit // 2
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer of at least 2 tokens, got {context!r}")
    if limit is not None and context > limit:
        raise ValueError(f"context {context} is longer than the model's maximum length {limit}")
    stride = context if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride must be an integer from 1 to the context ({context}), got {stride!r}")
    return "strided", context, stride, strided_windows(n, context, stride)


# ---- internals ------------------------------------------------------------------------------------------


class _Scores:
    """Running sums, and the per-token values when they are kept."""

    def __init__(self, keep: bool):
        self.keep, self.nll_sum, self.n = keep, 0.0, 0
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, positions: Tensor, nll: Tensor, predictions: Tensor) -> None:
        self.nll_sum += nll.double().sum().item()
        self.n += nll.numel()
        if self.keep:
            self.parts.append((positions.cpu(), nll.cpu(), predictions.cpu()))

    def tensors(self):
        if not self.keep:
            return None, None, None
        positions, nll, predictions = (torch.cat(x) for x in zip(*self.parts))
        order = positions.argsort()
        return positions[order], nll[order], predictions[order]


def _groups(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most `batch_size` together (they share positions)."""
    groups: list[list[Window]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].length == w.length:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def _score_group(model, cache: KVCache, ids: Tensor, group: list[Window], chunk: int, scored: _Scores, bar) -> None:
    """Prefill the group's windows chunk by chunk into `cache` and score each chunk's logits."""
    length = group[0].length
    device = ids.device
    starts = torch.tensor([w.start for w in group], device=device)
    score_from = torch.tensor([w.score_from - w.start for w in group], device=device)  # window-relative
    tokens = ids[starts[:, None] + torch.arange(length, device=device)]  # [B, length]
    first_needed = min(w.score_from - w.start for w in group) - 1  # earliest logit that predicts a target
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        positions = torch.arange(s, e, device=device).expand(len(group), e - s)
        logits = model(tokens[:, s:e], positions, cache, rows=slice(0, len(group)), kv_len=e)
        bar.update(len(group) * (e - s))
        if e - 1 < first_needed:
            continue
        # logit at relative index i predicts token i + 1; keep targets inside the window and scored
        target_pos = torch.arange(s + 1, e + 1, device=device)
        valid = (target_pos[None] < length) & (target_pos[None] >= score_from[:, None])  # [B, e - s]
        if not valid.any():
            continue
        targets = tokens[:, (target_pos.clamp(max=length - 1))]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll = -log_probs.gather(-1, targets[..., None])[..., 0]
        absolute = starts[:, None] + target_pos[None]
        scored.add(absolute[valid], nll[valid], logits.argmax(-1)[valid])


def _check_ids(model: Transformer, token_ids) -> Tensor:
    if isinstance(token_ids, Tensor):
        if token_ids.ndim != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"token ids must be a 1-D integer tensor, got shape {tuple(token_ids.shape)} "
                             f"of {token_ids.dtype}")
        ids = token_ids.detach().to("cpu", torch.long)
    else:
        if not isinstance(token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ValueError("token ids must be a list of integers")
        ids = torch.tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the token sequence is empty: there is nothing to score")
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens (the first one is only context), got 1")
    vocab = model.config.vocab_size
    bad = ((ids < 0) | (ids >= vocab)).nonzero()
    if bad.numel():
        i = bad[0].item()
        raise ValueError(f"token id {ids[i].item()} at index {i} is outside the vocabulary (0..{vocab - 1})")
    return ids


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
