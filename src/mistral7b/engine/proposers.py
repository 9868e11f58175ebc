"""Proposers for speculative decoding: n-gram prompt lookup, and a draft model with its own cache."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import torch

from ..cache import KVCache
from ..sampling import SamplerBatch, warped_logits
from ..utils import to_device
from .request import Request
from .runner import compile_decode_step, kv_len_bucket, padded_rows, padded_width
from .speculative import Proposal


def ngram_lookup(sequence, k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens,
    trying n = max_n down to min_n (longest first); [] when nothing matches."""
    return ngram_match(sequence, k, max_n, min_n)[1]


def ngram_match(sequence, k: int, max_n: int = 4, min_n: int = 1) -> tuple[int, list[int]]:
    """`ngram_lookup`'s tokens and the n that matched (0: none). `sequence`: a list or a 1-d integer
    array. The starts that match the n-gram's first token are found in one pass and then narrowed token
    by token: 0.04 ms at 32k tokens, where comparing every window took 1.7 ms."""
    seq = np.asarray(sequence)
    if k < 1 or len(seq) < 2:
        return 0, []
    for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
        starts = np.flatnonzero(seq[: len(seq) - n] == seq[-n])  # an n-gram at s is followed by seq[s + n]
        for i in range(1, n):
            starts = starts[seq[starts + i] == seq[i - n]]
        if starts.size:
            start = int(starts[-1]) + n
            return n, seq[start : start + k].tolist()
    return 0, []


class TokenArray:
    """A request's prompt and output as one growing int32 array, appended as tokens arrive: n-gram lookup
    then never converts the whole context from Python lists (0.7 ms a step at 32k tokens)."""

    def __init__(self):
        self.array, self.size = np.empty(256, dtype=np.int32), 0

    def of(self, request: Request) -> np.ndarray:
        total = request.position + 1
        if total < self.size:  # the request started over: rebuild
            self.size = 0
        if total > self.size:
            new = request.tokens(self.size, total)
            if total > len(self.array):
                grown = np.empty(max(total, 2 * len(self.array)), dtype=np.int32)
                grown[: self.size] = self.array[: self.size]
                self.array = grown
            self.array[self.size : total] = new
            self.size = total
        return self.array[:total]


class SuffixCache:
    """Earlier requests' outputs as a source of drafts (SuffixDecoding's idea, as an n-gram index): for
    every n-gram (n = min_n .. max_n) of the stored outputs, where its latest occurrence continues. Agents
    and templated replies repeat across requests, where a request's own text has nothing to match. The
    outputs are kept first in, first out, at most `capacity` tokens in all."""

    def __init__(self, capacity: int, max_n: int, min_n: int):
        self.capacity, self.max_n, self.min_n = capacity, max_n, min_n
        self.sequences: OrderedDict[int, list[int]] = OrderedDict()
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (sequence, where it continues)
        self.size = self.next_id = 0

    def add(self, tokens: list[int]) -> None:
        tokens = tokens[-self.capacity :]
        while self.sequences and self.size + len(tokens) > self.capacity:
            self._evict()
        sid, self.next_id = self.next_id, self.next_id + 1
        self.sequences[sid] = tokens
        self.size += len(tokens)
        for key, end in self._ngrams(tokens):
            self.index[key] = (sid, end)

    def match(self, context: list[int], k: int) -> tuple[int, list[int]]:
        """Up to k tokens that followed the longest of the context's last n-grams seen before, and that n
        (0, []: none)."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            hit = self.index.get(tuple(context[-n:]))
            if hit is not None:
                sid, end = hit
                return n, self.sequences[sid][end : end + k]
        return 0, []

    def _ngrams(self, tokens: list[int]):
        for n in range(self.min_n, self.max_n + 1):
            for end in range(n, len(tokens)):  # an n-gram with at least one token after it
                yield tuple(tokens[end - n : end]), end

    def _evict(self) -> None:
        sid, tokens = self.sequences.popitem(last=False)
        self.size -= len(tokens)
        for key, _ in self._ngrams(tokens):
            if self.index.get(key, (None,))[0] == sid:  # a later sequence may have taken the key over
                del self.index[key]


def draft_lengths(table: tuple[int, ...] | None, fixed_width: bool) -> tuple[int, ...]:
    """SpeculativeConfig.draft_by_match, or its default. A short match is a weak guess: after a match of 1
    the first token is right 19% of the time, after 2 43%, after 3-4 79-88% (default model, 30 grounded
    prompts, benchmarks/ngram_replay.py). Where a verify is as wide as its longest draft (eager), a short
    draft verifies cheaper: (1, 2) replays to 1.41x at a Zen 5 CPU's verify costs, against 1.37x for 4
    tokens from n >= 2 and 1.28x from n >= 1 (0.86x on open prompts, spec_bench). Where the width is fixed
    (a compiled verify) a short draft costs a whole verify: (0,), no draft after a lone token."""
    if table is not None:
        return table
    return (0,) if fixed_width else (1, 2)


class NgramProposer:
    """Prompt lookup (llama.cpp's --lookup, vLLM's ngram): no second model; q is one-hot. With a
    `suffix` cache, earlier requests' outputs too, where they match more of the row's last tokens than its
    own text does. A match of n tokens drafts at most `draft_by_match[n - 1]` tokens
    (SpeculativeConfig.draft_by_match), a longer one its cap."""

    def __init__(self, max_n: int = 4, min_n: int = 1, suffix: SuffixCache | None = None,
                 draft_by_match: tuple[int, ...] = ()):
        self.max_n, self.min_n, self.suffix, self.draft_by_match = max_n, min_n, suffix, draft_by_match
        self.contexts: weakref.WeakKeyDictionary[Request, TokenArray] = weakref.WeakKeyDictionary()

    def propose(self, requests: list[Request], caps: list[int], sampler: SamplerBatch) -> Proposal:
        drafts = [self._draft(r, cap) if cap > 0 else (0, []) for r, cap in zip(requests, caps)]
        return Proposal([draft for _, draft in drafts], [None] * len(requests), [n for n, _ in drafts])

    def match_length(self, request: Request) -> int:
        """The length of the match a proposal now would draft from (0: no draft), for `SpecBackoff.probe`:
        a lookup, no device work."""
        return self._draft(request, 1)[0]

    def _draft(self, request: Request, cap: int) -> tuple[int, list[int]]:
        """The match's length and the draft, cut to `draft_by_match` ((0, []) without one)."""
        context = self.contexts.setdefault(request, TokenArray()).of(request)
        n, draft = ngram_match(context, cap, self.max_n, self.min_n)
        if self.suffix is not None and n < self.max_n:  # the longer match of the two
            other = self.suffix.match(context[-self.max_n :].tolist(), cap)
            n, draft = max((n, draft), other, key=lambda match: match[0])
        if 0 < n <= len(self.draft_by_match):
            draft = draft[: self.draft_by_match[n - 1]]
        return (n, draft) if draft else (0, [])

    def rollback(self, request: Request, kept: int) -> None:
        pass

    def finished(self, request: Request) -> None:
        """Keep a finished request's output (led by its prompt's last n-gram, so its start matches too)."""
        if self.suffix is not None and request.output_ids:
            self.suffix.add(request.prompt_ids[-self.max_n :] + request.output_ids)


class DraftProposer:
    """A smaller model with the target's vocabulary proposes k tokens autoregressively. Its cache row
    mirrors the target's row: `held[row]` positions of the sequence are in it; after a verify, the
    accepted drafts stay and the rejected ones are forgotten, so the next proposal only feeds what the
    draft has not seen (the target's correction token, or a new prompt in chunks)."""

    def __init__(self, model, max_batch: int, num_tokens: int, chunk_size: int, max_seq_len: int | None,
                 compile: bool = False):
        """`compile`: the draft's decode steps compiled as the target's are (CUDA graphs on a GPU), for
        its k steps a verify and its catch-up of a few tokens; eager, a 7B int4 draft step on an H100
        launched kernels for tens of milliseconds (self-int4 ran at 5 tok/s, 2026-12-05)."""
        param = next(model.parameters())
        self.model, self.device, self.max_batch = model, param.device, max_batch
        self.cache = KVCache(model.config, max_batch, self.device, param.dtype, max_seq_len, spare_slots=num_tokens)
        self.chunk_size = chunk_size
        self.decode_fn = compile_decode_step(model, self.cache, self.device) if compile else None
        self.step_limit = num_tokens + 1  # compiled, catch-up spans this short run as decode steps
        self.owner: dict[int, Request] = {}  # which request each row's draft cache belongs to
        self.held: dict[int, int] = {}
        self.proposed: dict[int, int] = {}

    def propose(self, requests: list[Request], caps: list[int], sampler: SamplerBatch) -> Proposal:
        tokens: list[list[int]] = [[] for _ in requests]
        q: list[list[torch.Tensor] | None] = [None] * len(requests)
        live = [i for i, cap in enumerate(caps) if cap > 0]
        if not live:
            return Proposal(tokens, [None] * len(requests))
        logits = self._catch_up([requests[i] for i in live])
        for step in range(max(caps)):
            chosen, dist = self._choose(logits, [requests[i] for i in live], sampler)
            for i, t, d in zip(live, chosen.tolist(), dist):
                tokens[i].append(t)
                if d is not None:
                    q[i] = (q[i] or []) + [d]
            live = [i for i in live if len(tokens[i]) < caps[i]]
            if not live:
                break
            logits = self._advance([requests[i] for i in live], [tokens[i][-1] for i in live])
        for r, t in zip(requests, tokens):
            self.proposed[r.row] = len(t)
        return Proposal(tokens, [None if d is None else torch.stack(d) for d in q])

    def _catch_up(self, requests: list[Request]) -> torch.Tensor:
        """Feed the tokens each row's draft cache lacks (in chunks; rows at the same offsets share a
        forward); the draft's logits [n, vocab] for each row's next token."""
        spans, short = {}, []
        for i, r in enumerate(requests):
            if self.owner.get(r.row) is not r:
                self.owner[r.row], self.held[r.row] = r, 0
                self.cache.reset(slice(r.row, r.row + 1))
            start, end = self.held[r.row], len(r.prompt_ids) + len(r.output_ids)
            if self.decode_fn is not None and end - start <= self.step_limit:
                short.append(i)
            else:
                spans.setdefault((start, end), []).append(i)
        out = [None] * len(requests)
        for (start, end), members in spans.items():
            group = [requests[i] for i in members]
            for i, row_logits in zip(members, self._feed(group, start, end)):
                out[i] = row_logits
        if short:
            for i, row_logits in zip(short, self._step_through([requests[i] for i in short])):
                out[i] = row_logits
        return torch.stack(out)

    def _feed(self, group: list[Request], start: int, end: int) -> torch.Tensor:
        """Sequence tokens [start, end) of every request in `group` through the draft, chunk by chunk."""
        rows = torch.tensor([r.row for r in group], device=self.device)
        while start < end:
            stop = min(end, start + self.chunk_size)
            tokens = torch.tensor([r.tokens(start, stop) for r in group], device=self.device)
            positions = torch.arange(start, stop, device=self.device).expand(len(group), stop - start)
            logits = self.model(tokens, positions, self.cache, rows=rows, kv_len=stop, last_only=True)
            start = stop
        for r in group:
            self.held[r.row] = end
        return logits[:, -1].float()

    def _step_through(self, requests: list[Request]) -> list[torch.Tensor]:
        """Feed each row's few unseen tokens as decode steps (rows already through ride along idle); the
        logits [vocab] after each row's last token."""
        starts, ends = [self.held[r.row] for r in requests], [r.position + 1 for r in requests]
        unseen = [r.tokens(start, end) for r, start, end in zip(requests, starts, ends)]  # a few tokens each
        out: list[torch.Tensor | None] = [None] * len(requests)
        while True:
            live = [i for i, r in enumerate(requests) if self.held[r.row] < ends[i]]
            if not live:
                return out
            fed = [unseen[i][self.held[requests[i].row] - starts[i]] for i in live]
            logits = self._advance([requests[i] for i in live], fed)
            for j, i in enumerate(live):
                if self.held[requests[i].row] == ends[i]:
                    out[i] = logits[j]

    def _advance(self, requests: list[Request], last: list[int]) -> torch.Tensor:
        """Feed each row's next token (one batched decode step); the logits [n, vocab] after it."""
        rows, positions = [r.row for r in requests], [self.held[r.row] for r in requests]
        if self.decode_fn is None:
            tokens = torch.tensor(last, device=self.device)[:, None]
            logits = self.model(tokens, torch.tensor(positions, device=self.device)[:, None], self.cache,
                                rows=torch.tensor(rows, device=self.device), kv_len=max(positions) + 1)
        else:  # every row up to a power of two, as the runner's decode step
            width = padded_width(max(rows) + 1, self.max_batch, True)
            tokens, at = padded_rows(width, rows, last, positions, self.device)
            logits = self.decode_fn(tokens, at, kv_len_bucket(max(positions) + 1, self.cache))[to_device(rows, self.device)]
        for r in requests:
            self.held[r.row] += 1
        return logits[:, -1].float()

    @staticmethod
    def _choose(logits: torch.Tensor, requests: list[Request], sampler: SamplerBatch):
        """The draft's token per row: the argmax for greedy rows, else a draw from q, the draft's logits
        under the row's temperature and filters (penalties are left out: any q keeps the output exact)."""
        rows = [r.row for r in requests]
        index = torch.tensor(rows, device=logits.device)
        greedy = logits.argmax(-1)
        if all(r.params.greedy for r in requests):
            return greedy, [None] * len(requests)
        q = warped_logits(logits, sampler, rows, index).softmax(-1)
        drawn = (q / sampler.noise(rows)).argmax(-1)
        sampled = [not r.params.greedy for r in requests]
        chosen = torch.where(torch.tensor(sampled, device=logits.device), drawn, greedy)
        return chosen, [q[i] if s else None for i, s in enumerate(sampled)]

    def rollback(self, request: Request, kept: int) -> None:
        """Keep the first `kept` draft tokens fed to the draft cache; forget the rest."""
        row = request.row
        fed = self.proposed.pop(row, 0) - 1  # the last draft token is never fed
        if fed <= 0:
            return
        keep_until = self.held[row] - fed + min(kept, fed)
        self.cache.forget(row, keep_until, self.held[row])
        self.held[row] = keep_until


def check_draft(target_config, draft_config, target_context: int | None) -> None:
    """A ValueError unless the draft can propose for the target: same vocabulary, and a context at least
    as long as the target's (None: unbounded, with a sliding window)."""
    if draft_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_config.vocab_size} tokens) differs from the "
                         f"target's ({target_config.vocab_size}): speculative decoding needs the same tokenizer")
    draft_context = None if draft_config.has_window else draft_config.max_seq_len
    if draft_context is not None and (target_context is None or draft_context < target_context):
        raise ValueError(f"the draft model's context ({draft_context} tokens) is shorter than the target's "
                         f"({target_context or 'unbounded'}): pass max_seq_len={draft_context} or a longer draft")


def load_draft(config, source, device, dtype):
    """The draft model for `config` (a SpeculativeConfig): `config.draft` loaded by the project's loaders,
    or for "self-int4" the target `source` again with its weights quantized to int4; None for n-gram."""
    from ..loading import load_model

    if config.method == "draft":
        return load_model(config.draft, device, dtype)
    if config.method == "self-int4":
        return load_model(source, device, dtype, quantize="int4")
    return None
