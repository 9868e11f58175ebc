"""Sampling under speculation draws from the target's distribution: the tokens after a fixed prompt,
sampled 20,000 times with temperature and top-k, against the exact distribution computed by enumerating
every continuation through the model (chi-square, p > 0.01). The draft disagrees with the target often
(an unrelated random model), so acceptance, the residual max(0, p - q) and the bonus token all matter."""

from __future__ import annotations

import pytest
import torch

from test_speculative import random_prompts, tiny

from mistral7b import SamplingParams
from mistral7b.engine import Engine, SpeculativeConfig
from mistral7b.engine.speculative import Proposal
from mistral7b.sampling import filter_logits

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16
SAMPLES = 20_000
ROWS = 500
TEMPERATURE, TOP_K = 1.3, 12


def next_token_probs(model, contexts: torch.Tensor) -> torch.Tensor:
    """p(next | context) [n, vocab] for each row of `contexts` [n, L], under TEMPERATURE and TOP_K."""
    n, length = contexts.shape
    positions = torch.arange(length).expand(n, length)
    logits = model(contexts, positions, None)[:, -1].float()
    full = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)  # noqa: E731
    warped = filter_logits(logits, full(TEMPERATURE), full(TOP_K, torch.long), full(1.0), full(0.0))
    return warped.softmax(-1)


@torch.no_grad()
def exact_pair_distribution(model, prompt: list[int]) -> torch.Tensor:
    """P(t2, t3) [vocab, vocab], the second and third sampled tokens, summed over the first."""
    p1 = next_token_probs(model, torch.tensor([prompt]))[0]  # [V]
    ctx1 = torch.cat([torch.tensor(prompt).expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
    p2 = next_token_probs(model, ctx1)  # [V(t1), V(t2)]
    ctx2 = torch.cat([ctx1.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(VOCAB)[:, None]], dim=1)
    p3 = next_token_probs(model, ctx2).view(VOCAB, VOCAB, VOCAB)  # [t1, t2, t3]
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0).double()


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value; cells expected below 5 are pooled into one."""
    counts, expected = counts.flatten().double(), probs.flatten() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2))


def sampled_pairs(target, spec, draft, prompt) -> tuple[torch.Tensor, object]:
    engine = Engine(target, None, max_batch=ROWS, speculative=spec, draft_model=draft, prefill_budget=ROWS * len(prompt))
    if draft is None:  # a deterministic proposer (q one-hot), as n-gram, that is right often
        engine.speculator.proposer = GreedyProposer(target)
    params = SamplingParams(max_tokens=4, temperature=TEMPERATURE, top_k=TOP_K, ignore_eos=True)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.long)
    for _ in range(SAMPLES // ROWS):
        requests = [engine.add(prompt, params) for _ in range(ROWS)]
        while engine.has_work():
            engine.step()
        for r in requests:
            counts[r.output_ids[1], r.output_ids[2]] += 1
    return counts, engine.speculator.stats


class GreedyProposer:
    """Proposes the target's own greedy continuation: deterministic, so q is one-hot as for n-gram, but
    accepted often under sampling (random weights give n-gram matches that the target rarely samples)."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def propose(self, requests, caps, sampler):
        sequences = [r.prompt_ids + r.output_ids for r in requests]
        drafts: list[list[int]] = [[] for _ in requests]
        for step in range(max(caps)):
            by_length = {}
            for i, cap in enumerate(caps):
                if step < cap:
                    by_length.setdefault(len(sequences[i]), []).append(i)
            for length, members in by_length.items():  # equal lengths share one forward
                tokens = torch.tensor([sequences[i] for i in members])
                logits = self.model(tokens, torch.arange(length).expand(len(members), length), None)
                for i, t in zip(members, logits[:, -1].argmax(-1).tolist()):
                    sequences[i] = sequences[i] + [t]
                    drafts[i].append(t)
        return Proposal(drafts, [None] * len(drafts))

    def rollback(self, request, kept):
        pass


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_next_tokens_distribution_is_the_targets(method):
    torch.manual_seed(0)
    target = tiny(vocab=VOCAB, seed=21)
    draft = tiny(vocab=VOCAB, seed=22) if method == "draft" else None
    prompt = random_prompts((7,), seed=23, vocab=VOCAB)[0]
    spec = SpeculativeConfig(method, 3, draft="x" if draft is not None else None, max_batch=ROWS)
    counts, stats = sampled_pairs(target, spec, draft, prompt)
    assert counts.sum() == SAMPLES
    # Both outcomes of the rejection rule happen often: a test of one branch only would prove little.
    assert 0.1 < stats.accepted_tokens / stats.draft_tokens < 0.9
    p_value = chi_square_p(counts, exact_pair_distribution(target, prompt))
    print(f"{method}: acceptance {stats.accepted_tokens / stats.draft_tokens:.3f}, chi-square p = {p_value:.3f}")
    assert p_value > 0.01
    if draft is not None:  # the test can tell distributions apart: the draft's own is rejected
        assert chi_square_p(counts, exact_pair_distribution(draft, prompt)) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_acceptance_at_once_equals_the_walk(seed):
    """Greedy rows without penalties take every position's argmax at once (one device read): the same
    tokens as the position-by-position walk, with logit_bias on some rows and a grammar bitmask on others,
    drafts that agree for a random number of positions, and rows with no draft."""
    from types import SimpleNamespace

    from mistral7b.engine.speculative import accept_by_position, accept_greedy
    from mistral7b.sampling import SamplerBatch

    g = torch.Generator().manual_seed(seed)
    n, width, vocab = 5, 5, 70
    sampler = SamplerBatch(8, vocab, torch.device("cpu"))
    requests = []
    for i in range(n):
        bias = {int(t): float(torch.randint(-100, 101, (), generator=g)) for t in torch.randint(0, vocab, (4,), generator=g)}
        params = SamplingParams(logit_bias=bias if i % 2 else None)
        sampler.assign(i + 2, params, [])
        requests.append(SimpleNamespace(row=i + 2, params=params))
    logits = torch.randn(n, width, vocab, generator=g)
    logits[0, :, 3] = logits[0, :, 7] = 50.0  # a tie: the first index wins both ways
    words = (vocab + 31) // 32
    bitmasks = torch.randint(-2**31, 2**31 - 1, (width, n, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmasks[:, :2] = -1  # rows 0 and 1 unconstrained
    for masks in (None, bitmasks):
        chain = [[] for _ in range(n)]  # each row's own choices, learnt from the walk one position at a time
        for _ in range(width - 1):
            walk = accept_by_position(logits, requests, Proposal([list(c) for c in chain], [None] * n), sampler, masks)
            chain = [w for w in walk]
        drafts, agreed = [], []
        for i in range(n):  # agree for a random number of positions, then differ (row 4: no draft)
            agree = 0 if i == 4 else int(torch.randint(0, width, (), generator=g))
            wrong = [(chain[i][agree] + 1) % vocab] if agree < width - 1 and i != 4 else []
            drafts.append(chain[i][:agree] + wrong)
            agreed.append(agree)
        proposal = Proposal(drafts, [None] * n)
        expected = accept_by_position(logits, requests, proposal, sampler, masks)
        assert accept_greedy(logits, requests, proposal, sampler, masks) == expected
        assert [len(t) - 1 for t in expected] == agreed  # the walk kept exactly the agreeing drafts
