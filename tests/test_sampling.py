"""The sampler against independent references: HF transformers' logits processors for temperature,
top-k, top-p, min-p and the repetition penalty; the OpenAI presence/frequency formula and
log_softmax/topk written out here; and a statistical check that sampled tokens follow the filtered
distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mistral7b.sampling import SamplerBatch, SamplingParams, apply_penalties, filter_logits, sample, top_logprobs

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 10.5}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_params_validation_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_params_valid_edges_and_stop_string():
    # The edges of every interval are accepted.
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=1, logprobs=20)
    SamplingParams(top_p=1e-6, min_p=1.0, logprobs=0, repetition_penalty=1e-3)
    p = SamplingParams(stop="###")
    assert p.stop == ["###"]
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=(4, 5))
    assert p.stop == ["a", "bc"] and p.stop_token_ids == [4, 5]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


def test_params_several_problems_reported_together():
    with pytest.raises(ValueError) as info:
        SamplingParams(temperature=-1, top_p=2.0, max_tokens=0)
    for name in ("temperature", "top_p", "max_tokens"):
        assert name in str(info.value)


# ------------------------------------------------------------------------------------- filter_logits


def _hf_row(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """HF's warpers in the order `generate` builds them: temperature, top-k, top-p, min-p."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    s = scores[None].clone()
    s = TemperatureLogitsWarper(temperature)(ids, s)
    if top_k > 0:
        s = TopKLogitsWarper(top_k)(ids, s)
    if top_p < 1.0:
        s = TopPLogitsWarper(top_p)(ids, s)
    if min_p > 0.0:
        s = MinPLogitsWarper(min_p)(ids, s)
    return s[0]


def _random_params(rows: int, vocab: int, g: torch.Generator, *, k=True, p=True, m=True):
    def coin():
        return torch.rand((), generator=g).item() < 0.6

    temperature = [0.3 + 1.7 * torch.rand((), generator=g).item() for _ in range(rows)]
    top_k = [int(torch.randint(1, vocab + 1, (), generator=g)) if (k and coin()) else 0 for _ in range(rows)]
    top_p = [0.05 + 0.9 * torch.rand((), generator=g).item() if (p and coin()) else 1.0 for _ in range(rows)]
    min_p = [0.5 * torch.rand((), generator=g).item() if (m and coin()) else 0.0 for _ in range(rows)]
    return temperature, top_k, top_p, min_p


def _check_filter_equals_hf(logits, temperature, top_k, top_p, min_p):
    ours = filter_logits(
        logits,
        torch.tensor(temperature),
        torch.tensor(top_k, dtype=torch.long),
        torch.tensor(top_p),
        torch.tensor(min_p),
    )
    for r in range(logits.shape[0]):
        ref = _hf_row(logits[r], temperature[r], top_k[r], top_p[r], min_p[r])
        kept = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(ours[r]), kept), (
            f"row {r} (T={temperature[r]:.3f}, k={top_k[r]}, p={top_p[r]:.3f}, min_p={min_p[r]:.3f}): "
            f"ours keeps {torch.isfinite(ours[r]).sum().item()} tokens, HF keeps {kept.sum().item()}"
        )
        assert torch.isneginf(ours[r][~kept]).all()
        torch.testing.assert_close(ours[r][kept], ref[kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["temperature", "top_k", "top_p", "min_p"])
def test_filter_each_warper_equals_hf(which):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rows, vocab = 64, 50
    logits = torch.randn(rows, vocab, generator=g) * 3
    t, k, p, m = _random_params(rows, vocab, g, k=which == "top_k", p=which == "top_p", m=which == "min_p")
    if which != "temperature":
        t = [1.0] * rows
    _check_filter_equals_hf(logits, t, k, p, m)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_composed_equals_hf_in_sequence(seed):
    """All four together, per-row parameters: HF applies top-p to the distribution top-k left
    (renormalised), and min-p to what top-p left."""
    g = torch.Generator().manual_seed(1000 + seed)
    rows, vocab = 96, 40
    logits = torch.randn(rows, vocab, generator=g) * 2.5
    t, k, p, m = _random_params(rows, vocab, g)
    _check_filter_equals_hf(logits, t, k, p, m)


def test_filter_top_k_then_top_p_renormalises():
    """A case built so the two readings differ: probabilities 0.3, 0.3, then 40 tokens of 0.01.
    Top-k 2 leaves 0.5/0.5; top-p 0.4 of that keeps only the first. Top-p over the full vocabulary
    (0.3 < 0.4 above the second token) would wrongly keep both."""
    probs = torch.tensor([0.3, 0.3] + [0.01] * 40)
    logits = probs.log()[None]
    out = filter_logits(logits, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([0.4]), torch.tensor([0.0]))
    ref = _hf_row(logits[0], 1.0, 2, 0.4, 0.0)
    assert torch.isfinite(ref).sum().item() == 1
    assert torch.equal(torch.isfinite(out[0]), torch.isfinite(ref))


def test_filter_always_keeps_the_top_token():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 30, generator=g)
    n = logits.shape[0]
    # The harshest settings still leave the argmax.
    out = filter_logits(logits, torch.full((n,), 0.7), torch.ones(n, dtype=torch.long), torch.full((n,), 1e-6), torch.ones(n))
    assert (torch.isfinite(out).sum(-1) == 1).all()
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


# ------------------------------------------------------------------------------------- penalties


def test_penalties_equal_hf_repetition_and_openai_formula():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rows, vocab = 12, 60
    logits = torch.randn(rows, vocab, generator=g) * 4
    batch = SamplerBatch(rows, vocab, CPU)
    prompts, outputs, params = [], [], []
    for r in range(rows):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 20, (), generator=g)),), generator=g).tolist()
        output = torch.randint(0, vocab // 3, (int(torch.randint(0, 25, (), generator=g)),), generator=g).tolist()
        rep = 1.0 if r == 0 else 0.3 + 2.0 * torch.rand((), generator=g).item()
        pres = (torch.rand((), generator=g).item() * 4 - 2) if r % 3 else 0.0
        freq = (torch.rand((), generator=g).item() * 4 - 2) if r % 2 else 0.0
        sp = SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
        batch.assign(r, sp, prompt)
        prompts.append(prompt), outputs.append(output), params.append(sp)
    # Outputs arrive one token per step, as the engine records them (rows that are done skip a step).
    for step in range(max(len(o) for o in outputs)):
        rows_now = [r for r in range(rows) if step < len(outputs[r])]
        batch.record(torch.tensor(rows_now), torch.tensor([outputs[r][step] for r in rows_now]))

    ours = apply_penalties(logits, batch.repetition, batch.presence, batch.frequency, batch.counts, batch.seen)

    for r in range(rows):
        sp = params[r]
        ref = logits[r : r + 1].clone()
        ids = torch.tensor([prompts[r] + outputs[r]])
        if sp.repetition_penalty != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(ids, ref)
        count = torch.bincount(torch.tensor(outputs[r], dtype=torch.long), minlength=vocab).float()
        ref = ref[0] - sp.frequency_penalty * count - sp.presence_penalty * (count > 0).float()
        torch.testing.assert_close(ours[r], ref, rtol=1e-6, atol=1e-6)
        if r > 0:  # every row but the first has a repetition penalty and a prompt: something changed
            assert not torch.equal(ref, logits[r])


def test_reassigning_a_row_clears_its_history():
    vocab = 20
    batch = SamplerBatch(2, vocab, CPU)
    batch.assign(0, SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), [1, 2, 3])
    batch.record(torch.tensor([0]), torch.tensor([5]))
    batch.assign(0, SamplingParams(), [7, 8])
    logits = torch.randn(2, vocab)
    out = apply_penalties(logits, batch.repetition, batch.presence, batch.frequency, batch.counts, batch.seen)
    assert torch.equal(out, logits)


def test_sample_greedy_applies_penalties():
    """Greedy rows take the argmax of the penalised logits (as HF's greedy search does)."""
    g = torch.Generator().manual_seed(11)
    vocab = 30
    logits = torch.randn(4, vocab, generator=g)
    top = logits.argmax(-1)
    batch = SamplerBatch(4, vocab, CPU)
    for r in range(4):
        batch.assign(r, SamplingParams(repetition_penalty=50.0), [int(top[r])])
    out = sample(logits.clone(), batch, [0, 1, 2, 3], torch.arange(4), greedy_only=True)
    ref = RepetitionPenaltyLogitsProcessor(50.0)(top[:, None], logits.clone()).argmax(-1)
    assert torch.equal(out, ref)
    assert (out != top).all()
    # and the chosen tokens are now counted for the next step's penalties
    assert torch.equal(batch.counts[torch.arange(4), out], torch.ones(4, dtype=torch.int32))


# ------------------------------------------------------------------------------------- sample()


def test_sample_greedy_rows_and_top_k_1_give_argmax():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rows, vocab = 32, 100
    logits = torch.randn(rows, vocab, generator=g) * 2
    batch = SamplerBatch(rows, vocab, CPU)
    for r in range(rows):
        if r % 2:
            batch.assign(r, SamplingParams(temperature=1.3, top_k=1), [])
        else:
            batch.assign(r, SamplingParams(temperature=0.0), [])
    for _ in range(5):
        out = sample(logits.clone(), batch, list(range(rows)), torch.arange(rows))
        assert torch.equal(out, logits.argmax(-1))


def test_sample_follows_filtered_distribution():
    """20k draws over a vocabulary of 8: empirical frequencies match softmax of HF's filtered logits,
    with greedy rows mixed into the same batch."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    vocab, n = 8, 20000
    settings = dict(temperature=0.8, top_k=6, top_p=0.95, min_p=0.05)
    while True:  # draw logits that the settings leave several tokens of, so the test has something to measure
        base = torch.randn(vocab, generator=g) * 1.2
        ref = _hf_row(base, settings["temperature"], settings["top_k"], settings["top_p"], settings["min_p"])
        if (ref.softmax(-1) > 0).sum() >= 3:
            break
    n_greedy = 500
    rows = n + n_greedy
    batch = SamplerBatch(rows, vocab, CPU)
    batch.temperature[:n] = settings["temperature"]
    batch.top_k[:n] = settings["top_k"]
    batch.top_p[:n] = settings["top_p"]
    batch.min_p[:n] = settings["min_p"]
    # assign() a few rows too, to check it sets the same state as writing the tensors directly
    for r in range(3):
        batch.assign(r, SamplingParams(**settings), [])
    logits = base.expand(rows, vocab).clone()
    tokens = sample(logits, batch, list(range(rows)), torch.arange(rows))

    expected = ref.softmax(-1)
    empirical = torch.bincount(tokens[:n], minlength=vocab).double() / n
    assert (expected > 0).sum() >= 3, "the settings should leave several tokens"
    assert (empirical[expected == 0] == 0).all(), "a filtered-out token was sampled"
    assert (empirical - expected.double()).abs().max().item() < 0.02, (empirical, expected)
    # Sampling is not greedy: more than one token came up.
    assert (empirical > 0).sum() >= 2
    assert (tokens[n:] == base.argmax()).all()


def _seeded_draws(seeds: list[int | None], logits_steps: list[torch.Tensor], rows_order=None) -> torch.Tensor:
    vocab = logits_steps[0].shape[-1]
    batch = SamplerBatch(len(seeds), vocab, CPU)
    for r, s in enumerate(seeds):
        batch.assign(r, SamplingParams(temperature=1.0, seed=s), [])
    rows = rows_order or list(range(len(seeds)))
    out = []
    for logits in logits_steps:
        out.append(sample(logits[rows].clone(), batch, rows, torch.tensor(rows)))
    return torch.stack(out, 1)  # [len(rows), steps]


def test_seeded_rows_reproduce_and_differ():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    vocab, steps = 50, 12
    logits_steps = [torch.randn(6, vocab, generator=g) * 0.5 for _ in range(steps)]
    seeds = [11, 12, 11, None, 13, None]
    a = _seeded_draws(seeds, logits_steps)
    b = _seeded_draws(seeds, logits_steps)
    seeded = [0, 1, 2, 4]
    assert torch.equal(a[seeded], b[seeded]), "the same seed must give the same tokens in a fresh sampler"
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[4]), "different seeds gave the same draws"
    # A seeded row draws the same tokens whatever other rows share its batch.
    alone = _seeded_draws([11], [x[:1] for x in logits_steps])
    assert torch.equal(alone[0], a[0])


def test_same_seed_same_logits_same_tokens():
    g = torch.Generator().manual_seed(5)
    vocab = 40
    row = torch.randn(vocab, generator=g)
    logits_steps = [row.expand(3, vocab).clone() for _ in range(10)]
    out = _seeded_draws([99, 99, 98], logits_steps)
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


# ------------------------------------------------------------------------------------- top_logprobs


@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_top_logprobs_equal_log_softmax_topk(n):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rows, vocab = 7, 300
    logits = torch.randn(rows, vocab, generator=g) * 3
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    chosen, values, indices = top_logprobs(logits, tokens, n)
    # log-softmax written out: x - max - log(sum(exp(x - max))), in float64
    x = logits.double()
    m = x.max(-1, keepdim=True).values
    logp = x - m - (x - m).exp().sum(-1, keepdim=True).log()
    torch.testing.assert_close(chosen.double(), logp[torch.arange(rows), tokens], rtol=0, atol=1e-5)
    k = max(n, 1)
    assert values.shape == (rows, k) and indices.shape == (rows, k)
    order = logp.argsort(-1, descending=True)[:, :k]
    assert torch.equal(indices, order)
    torch.testing.assert_close(values.double(), logp.gather(-1, order), rtol=0, atol=1e-5)
    assert (values[:, :-1] >= values[:, 1:]).all()


# ------------------------------------------------------------------------------------- float32 range


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [1e-40, 1e-300, -1e-40])
def test_params_reject_numbers_float32_cannot_hold(name, value):
    """A nonzero value that float32 flushes to a subnormal or zero is refused, naming the field."""
    if value < 0 and name not in ("presence_penalty", "frequency_penalty"):
        value = -value
    with pytest.raises(ValueError, match=name) as info:
        SamplingParams(**{name: value})
    assert "float32" in str(info.value)
    assert info.value.param == name
    assert torch.tensor(value, dtype=torch.float32).abs() < torch.finfo(torch.float32).tiny  # the premise


def test_extreme_but_valid_repetition_penalty_keeps_logits_finite():
    """repetition_penalty=1e-37 divides positive logits up to ~1e38; a temperature of 0.5 would then
    overflow to inf and the softmax to NaN. The sampler keeps the order: the largest logit wins."""
    logits = torch.tensor([[18.0, 20.0, 10.0, -3.0]]).repeat(8, 1)
    batch = SamplerBatch(8, 4, CPU)
    for r in range(8):
        batch.assign(r, SamplingParams(temperature=0.5, repetition_penalty=1e-37, seed=r), [0, 1, 2, 3])
    penalised = apply_penalties(logits, batch.repetition, batch.presence, batch.frequency, batch.counts, batch.seen)
    assert torch.isinf(penalised / 0.5).any()  # the premise: without care this overflows
    out = sample(logits.clone(), batch, list(range(8)), torch.arange(8))
    assert out.tolist() == [1] * 8


# ------------------------------------------------------------------------------------- logit_bias


def test_logit_bias_is_added_before_sampling_and_cleared_on_reassign():
    g = torch.Generator().manual_seed(5)
    vocab = 40
    logits = torch.randn(3, vocab, generator=g)
    bias = {int(logits[0].argmin()): 100.0, 3: -2.5}
    batch = SamplerBatch(3, vocab, CPU)
    batch.assign(0, SamplingParams(logit_bias=bias), [1])
    batch.assign(1, SamplingParams(), [1])
    batch.assign(2, SamplingParams(temperature=1.0, seed=0, logit_bias={7: 100.0}), [1])
    expected = logits.clone()
    for t, b in bias.items():
        expected[0, t] += b
    out = sample(logits[:2].clone(), batch, [0, 1], torch.arange(2), greedy_only=True)
    assert out.tolist() == [int(expected[0].argmax()), int(logits[1].argmax())]
    assert out[0] == logits[0].argmin()  # the least likely token, lifted by 100
    # a sampled row: +100 makes the token all but certain
    assert sample(logits[2:].clone(), batch, [2], torch.tensor([2])).item() == 7
    batch.assign(0, SamplingParams(), [1])
    assert sample(logits[:1].clone(), batch, [0], torch.tensor([0]), greedy_only=True).item() == logits[0].argmax()


@pytest.mark.parametrize("bias", [{-1: 1.0}, {3: 101.0}, {3: float("nan")}, {"3": 1.0}, {3: 1e-40}, [3]])
def test_logit_bias_validation(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)
