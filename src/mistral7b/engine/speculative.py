"""Speculative decoding inside the engine: propose k tokens per row, verify them in one forward, keep
the longest prefix the target agrees with, plus one token of its own.

The output distribution is the target's, exactly:
- greedy rows keep a draft token only if it is the target's argmax (token-identical to plain greedy);
- sampled rows use the standard rejection rule: accept draft token d with probability min(1, p(d)/q(d)),
  else draw from the normalised max(0, p - q). A deterministic proposer (n-gram) has q one-hot.
p is the distribution plain sampling draws from: penalties, logit_bias, temperature, top-k/p, min-p,
applied by the sampler's own functions, position by position (penalties see the tokens kept before).

The rolling buffer: a verify writes positions p .. p+k. With W slots, position p+j would overwrite
p+j-W, which a later query still sees if p+j is rejected. The cache keeps W + k slots instead (and a
linear cache max_seq_len + k), so a draft only overwrites positions outside every window: a verify
writes its k + 1 tokens first and attends over the buffer in place, as decode does (`LayerCache.writes_first`),
and the rejected positions' slots are emptied (`KVCache.forget`) so no later query sees them.

Rows with a structured-output constraint speculate too. Their draft is cut after the tokens their
grammar allows; each verified position is masked by the grammar as it stands after the draft tokens
before it (`ConstraintManager.verify_bitmasks` feeds the draft through the matcher, then rolls it back);
the scheduler then consumes only what was accepted, so a rejection leaves the grammar where plain
decoding would have it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..sampling import SamplerBatch, adjusted_logits, apply_bitmask, warped_logits
from .config import SpeculativeConfig
from .request import Delta, Request
from .spec_backoff import SpecBackoff

# The largest batch measured to gain from speculation (a verify of k + 1 = 5 tokens against a decode step,
# benchmarks/verify_cost.py). CUDA: an H100 at the 7B shape, 1.14x/1.09x/1.25x a step at b1/b8/b32, so
# ~2.9 tokens a verify (n-gram, grounded prompts) still pay 2.3x at b32; above 32 is not measured.
# CPU: the default model on 2 Zen 5 cores, n-gram end to end (benchmarks/spec_batch.py, 2026-12-07, ragged
# verifies packed): grounded prompts 1.34-1.37x/1.21-1.22x/1.12x/1.10x plain speed at b1/b2/b3/b4, open ones
# 1.00-1.03x/0.93-0.98x/0.90x/0.88x: past 2 rows open prompts lose more than grounded ones gain.
MEASURED_MAX_BATCH = {"cuda": 32, "cpu": 2}


@dataclass
class SpecStats:
    """Counts since start, named after vLLM's spec-decode metrics."""

    num_tokens: int
    row_steps: int = 0  # rows advanced by a speculative step, with or without a proposal
    verify_rows: int = 0  # of those, rows that verified at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0  # accepted + the target's own token, over row_steps
    accepted_per_position: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.accepted_per_position:  # given when rebuilt from another process's counts
            self.accepted_per_position = [0] * self.num_tokens

    def count(self, proposed: int, accepted: int) -> None:
        self.row_steps += 1
        self.emitted_tokens += accepted + 1
        if proposed == 0:
            return
        self.verify_rows += 1
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    @property
    def tokens_per_step(self) -> float:
        """Tokens per target forward of a row (before stop rules drop any): 1 without speculation."""
        return self.emitted_tokens / self.row_steps if self.row_steps else 1.0


@dataclass
class Proposal:
    """Per row: the draft tokens, and for a model draft the distributions q [len, vocab] they came from;
    for n-gram's, the length of the match that found them (`SpecBackoff.gain_by_match`)."""

    tokens: list[list[int]]
    q: list[torch.Tensor | None]
    matches: list[int] | None = None


class Speculator:
    """One speculative step for the engine: propose, verify, accept, roll back, emit."""

    def __init__(self, config: SpeculativeConfig, runner, proposer, scheduler, constraints):
        self.config, self.runner, self.proposer = config, runner, proposer
        self.scheduler, self.constraints = scheduler, constraints
        self.stats = SpecStats(config.num_tokens)
        self.max_batch = config.max_batch or MEASURED_MAX_BATCH.get(runner.device.type, MEASURED_MAX_BATCH["cpu"])
        self.backoff = self._new_backoff(config.backoff)

    def _new_backoff(self, enabled: bool) -> SpecBackoff:
        return SpecBackoff(self.runner.device.type, self.config.num_tokens, self.config.method != "ngram", enabled,
                           probes=hasattr(self.proposer, "match_length"))

    def probe(self, requests: list[Request]) -> None:
        """Before a step proposes and after plain steps were read: each row that waits hears what its
        proposer's lookup finds now (`SpecBackoff.probe`). Not above `max_batch`, where no row speculates:
        a lookup a waiting row and step there would be work for nothing."""
        match_length = getattr(self.proposer, "match_length", None)  # a draft model has no cheap lookup
        if match_length is not None and len(requests) <= self.max_batch:
            for r in self.backoff.waiting(requests):
                if not r.finished:
                    self.backoff.probe(r, match_length(r))

    def active(self, decoding: list[Request]) -> bool:
        """Whether this step speculates: the batch is small enough and some row has not backed off."""
        return len(decoding) <= self.max_batch and any(self.backoff.speculating(r) for r in decoding)

    @contextlib.contextmanager
    def warming(self):
        """Engine.warmup inside: every step with room for a draft verifies one (`_WarmupProposer`), so
        the verify's graphs, and a draft model's, are compiled before serving; after: counts from zero."""
        real, self.proposer = self.proposer, _WarmupProposer(self.proposer)
        self.backoff = self._new_backoff(False)
        try:
            yield
        finally:
            self.proposer, self.stats = real, SpecStats(self.config.num_tokens)
            self.backoff = self._new_backoff(self.config.backoff)

    def propose(self, decoding: list[Request]) -> Proposal | None:
        """Each row's draft tokens; None when no row has one: a lone plain decode step then advances every
        row by its one token, cheaper than a verify (n-gram on open chat proposes at 1 step in 10: 0.95x
        plain speed when those steps ran as verifies, default model on a 2-core CPU), and each row that
        wanted a draft scores that step (`SpecBackoff.observe_empty`)."""
        self.probe(decoding)
        caps = [self._cap(r) for r in decoding]
        proposal = self.proposer.propose(decoding, caps, self.runner.sampler)
        within_grammar(decoding, proposal)
        if any(proposal.tokens):
            return proposal
        for r, cap in zip(decoding, caps):
            self.proposer.rollback(r, 0)
            self.stats.count(0, 0)
            if cap:
                self.backoff.observe_empty(r)
        return None

    def step(self, decoding: list[Request], proposal: Proposal, deltas: list[Delta]) -> int:
        """Verify the proposal, accept, emit; the verify's width in tokens a row."""
        logits = self.runner.verify(decoding, proposal.tokens).float()
        masks = self.constraints.verify_bitmasks(decoding, proposal.tokens, logits.shape[1])  # while verify runs
        emitted = accept(logits, decoding, proposal, self.runner.sampler, masks)
        width = logits.shape[1]
        kept_rows = [len(tokens) - 1 for tokens in emitted]  # draft tokens accepted
        starts = [r.position + 1 + kept for r, kept in zip(decoding, kept_rows)]
        self.runner.cache.forget_rows([r.row for r in decoding], starts, [r.position + width for r in decoding])
        matches = proposal.matches or [0] * len(decoding)
        drafting = sum(1 for drafts in proposal.tokens if drafts)
        riders = (len(decoding) - drafting) / drafting
        for r, drafts, kept, match in zip(decoding, proposal.tokens, kept_rows, matches):
            self.proposer.rollback(r, kept)
            self.stats.count(len(drafts), kept)
            if drafts:  # a row without drafts chose no verify: the rows that drafted answer for its cost
                self.backoff.observe(r, kept, width, match, riders)
        self._emit(decoding, logits, emitted, deltas)
        return width

    def finished(self, request: Request) -> None:
        """A request has ended: proposers that learn from earlier outputs keep its output."""
        if hasattr(self.proposer, "finished"):
            self.proposer.finished(request)

    def _cap(self, r: Request) -> int:
        """Draft tokens row `r` may take: never past max_tokens, none while it has backed off."""
        if not self.backoff.speculating(r):
            return 0
        return max(0, min(self.config.num_tokens, r.params.max_tokens - len(r.output_ids) - 1))

    def _emit(self, decoding, logits, emitted, deltas) -> None:
        """Hand each row's tokens to the scheduler position by position (stop rules and
        max_tokens apply there: tokens after a stop are dropped), with log-probabilities if asked."""
        want_logprobs = any(r.params.logprobs is not None for r in decoding)
        for j in range(max(len(t) for t in emitted)):
            idx = [i for i, t in enumerate(emitted) if len(t) > j]
            requests = [decoding[i] for i in idx]
            tokens = [emitted[i][j] for i in idx]
            lp = self.runner.logprobs(requests, logits[idx, j], torch.tensor(tokens, device=logits.device)) \
                if want_logprobs else None
            deltas += self.scheduler.update_from_output(requests, [tokens], [lp])


class _WarmupProposer:
    """The proposer's drafts, and for a row without one (n-gram finds nothing in a warm-up prompt) its last
    token repeated up to its cap. It learns nothing from warm-up outputs (no `finished`)."""

    def __init__(self, proposer):
        self.proposer = proposer

    def propose(self, requests: list[Request], caps: list[int], sampler: SamplerBatch) -> Proposal:
        proposal = self.proposer.propose(requests, caps, sampler)
        for i, (r, cap) in enumerate(zip(requests, caps)):
            if cap and not proposal.tokens[i]:
                proposal.tokens[i] = [r.output_ids[-1]] * cap
        return proposal

    def rollback(self, request: Request, kept: int) -> None:
        self.proposer.rollback(request, kept)


def within_grammar(requests: list[Request], proposal: Proposal) -> None:
    """Cut each constrained row's draft after the tokens its grammar allows: a forbidden one is rejected
    for sure (p = 0 there). A sampled row drafted by a model keeps that first forbidden token: rejecting
    it and resampling from max(0, p - q) keeps the output exact, where sampling from p would not."""
    for i, r in enumerate(requests):
        tokens, q = proposal.tokens[i], proposal.q[i]
        if r._constraint is None or not tokens:
            continue
        keep = r._constraint.valid_prefix(tokens)
        if keep < len(tokens) and q is not None:
            keep += 1
        proposal.tokens[i] = tokens[:keep]
        proposal.q[i] = None if q is None else q[:keep]


def accept(logits: torch.Tensor, requests: list[Request], proposal: Proposal, sampler: SamplerBatch,
           bitmasks: torch.Tensor | None) -> list[list[int]]:
    """Walk the verify logits [n, T, vocab] position by position; per row, the tokens it emits: the
    accepted draft tokens, then the target's correction (or bonus) token. `bitmasks` [T, n, words], when
    a row is constrained, masks each position (ConstraintManager.verify_bitmasks)."""
    if all(r.params.greedy for r in requests) and not sampler.penalised.intersection(r.row for r in requests):
        return accept_greedy(logits, requests, proposal, sampler, bitmasks)
    return accept_by_position(logits, requests, proposal, sampler, bitmasks)


def accept_by_position(logits: torch.Tensor, requests: list[Request], proposal: Proposal, sampler: SamplerBatch,
                       bitmasks: torch.Tensor | None) -> list[list[int]]:
    """`accept` for any rows: position by position, since a penalty or a sampled token at one position
    changes what the next one draws from."""
    n = len(requests)
    out: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))
    device = logits.device
    for j in range(logits.shape[1]):
        if not live:
            break
        rows = [requests[i].row for i in live]
        index = torch.tensor(rows, device=device)
        drafts = [proposal.tokens[i][j] if j < len(proposal.tokens[i]) else -1 for i in live]
        draft = torch.tensor(drafts, device=device)
        q = [proposal.q[i][j] if proposal.q[i] is not None and j < len(proposal.q[i]) else None for i in live]
        mask = None if bitmasks is None else bitmasks[j, live]
        token, ok = decide(logits[live, j], sampler, rows, index, draft, q, mask)
        next_live = []
        for i, t, a in zip(live, token.tolist(), ok.tolist()):
            out[i].append(t)
            if a:
                next_live.append(i)
        live = next_live
    return out


def accept_greedy(logits: torch.Tensor, requests: list[Request], proposal: Proposal, sampler: SamplerBatch,
                  bitmasks: torch.Tensor | None) -> list[list[int]]:
    """`accept` for greedy rows without penalties: no position's logits then depend on the tokens chosen
    before it, so every position's argmax is taken at once and read in one transfer, where the walk
    reads the device once a position (at 135M on an H100 a verify step cost 2.4 plain steps, host work
    included)."""
    rows = [r.row for r in requests]
    n, width, vocab = logits.shape
    if sampler.biased.intersection(rows):
        logits = logits + sampler.bias[torch.tensor(rows, device=logits.device)][:, None]
    if bitmasks is not None:  # [T, n, words]: position-major, as the walk takes them
        flat = logits.transpose(0, 1).reshape(width * n, vocab)
        logits = apply_bitmask(flat, bitmasks.reshape(width * n, -1)).view(width, n, vocab).transpose(0, 1)
    best = logits.argmax(-1).tolist()
    out = []
    for drafts, chosen in zip(proposal.tokens, best):
        kept = 0
        while kept < len(drafts) and chosen[kept] == drafts[kept]:
            kept += 1
        out.append(chosen[: kept + 1])
    return out


def decide(logits, sampler: SamplerBatch, rows: list[int], index, draft, q: list, bitmask):
    """(token, accepted) per row at one position. Greedy rows: the argmax, accepted if it is the draft.
    Sampled rows: the rejection rule. `draft` is -1 where a row has no draft token here."""
    adjusted, penalised = adjusted_logits(logits, sampler, rows, index, bitmask)
    token = adjusted.argmax(-1)
    has = draft >= 0
    ok = has & (token == draft)
    temperature = sampler.temperature[index]
    if bool((temperature > 0).any()):
        p = warped_logits(adjusted, sampler, rows, index).softmax(-1)
        q_full = draft_distributions(q, draft, p)
        safe = draft.clamp(min=0)[:, None]
        p_d, q_d = p.gather(-1, safe)[:, 0], q_full.gather(-1, safe)[:, 0]
        accepted = has & (uniform(sampler, rows, device=p.device) * q_d < p_d)
        residual = torch.where(has[:, None], (p - q_full).clamp(min=0), p)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q up to rounding
        resampled = (residual / sampler.noise(rows)).argmax(-1)  # argmax(r / E) draws from r normalised
        sampled = torch.where(accepted, draft, resampled)
        token = torch.where(temperature > 0, sampled, token)
        ok = torch.where(temperature > 0, accepted, ok)
    if penalised:
        sampler.record(index, token)
    return token, ok


def draft_distributions(q: list, draft: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """q [n, vocab]: a model draft's own distribution, or one-hot at the draft token (n-gram)."""
    full = torch.zeros_like(like)
    full.scatter_(-1, draft.clamp(min=0)[:, None], 1.0)
    for i, row in enumerate(q):
        if row is not None:
            full[i] = row.to(full.dtype)
    return full


def uniform(sampler: SamplerBatch, rows: list[int], device) -> torch.Tensor:
    """U[0, 1) per row; seeded rows draw from their own generator."""
    u = torch.rand(len(rows), device=device)
    for i, row in enumerate(rows):
        g = sampler.generators.get(row)
        if g is not None:
            u[i] = torch.rand(1, device=device, generator=g)[0]
    return u


def make_speculator(settings, runner, draft_model, scheduler, constraints) -> Speculator | None:
    """The engine's Speculator for `settings.speculative` (None when off), with its proposer."""
    config = settings.speculative
    if config is None:
        return None
    from .proposers import DraftProposer, NgramProposer, SuffixCache, check_draft, draft_lengths

    if config.method == "ngram":
        suffix = SuffixCache(config.suffix_cache_tokens, config.max_ngram, config.min_ngram) \
            if config.suffix_cache_tokens else None
        drafts = draft_lengths(config.draft_by_match, fixed_width=runner.compiled_verify is not None)
        proposer = NgramProposer(config.max_ngram, config.min_ngram, suffix, drafts)
    else:
        if draft_model is None:
            raise ValueError(f"speculative method {config.method!r} needs a draft model (LLM loads it)")
        check_draft(runner.model.config, draft_model.config, runner.cache.max_positions)
        proposer = DraftProposer(draft_model, runner.max_batch, config.num_tokens, settings.chunk_size,
                                 runner.cache.max_seq_len, compile=runner.compiled)
    return Speculator(config, runner, proposer, scheduler, constraints)
