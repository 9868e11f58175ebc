"""A row stops speculating while its verifies emit fewer tokens than a speculative step costs, and the
output stays token-identical to plain decoding."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest

from mistral7b import SamplingParams
from mistral7b.engine import SpeculativeConfig
from mistral7b.engine.spec_backoff import (CONFIDENT_GAIN, GLOBAL_SMOOTHING, LONE_SAMPLES, MAX_SKIP, MIN_SKIP, PRIOR_DRAFT_STEP_COST, PRIOR_VERIFY_COST,
                                           REPROBE_STEPS, SMOOTHING, SpecBackoff)

from test_speculative import generate, perturbed, random_prompts, tiny

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.spec_timings]


class FakeRequest(SimpleNamespace):
    __hash__ = object.__hash__  # by identity, as Request (eq=False)


def row(name="a", produced=0):
    return FakeRequest(id=name, output_ids=[0] * produced, params=SimpleNamespace(seed=None))


def test_prior_break_even_counts_a_draft_models_steps():
    assert SpecBackoff("cpu", 4, False).break_even == PRIOR_VERIFY_COST["cpu"]
    assert SpecBackoff("cuda", 4, True).break_even == pytest.approx(PRIOR_VERIFY_COST["cuda"] + 4 * PRIOR_DRAFT_STEP_COST)
    measured = SpecBackoff("cuda", 4, True)
    measured.time_speculative(0.030)
    assert measured.break_even == measured.prior  # until a plain step is timed too
    measured.time_plain(0.010)
    assert measured.break_even == pytest.approx(3.0)
    measured.time_plain(0.500)  # one slow sample (a graph recorded inside it) does not move it
    assert measured.break_even == pytest.approx(3.0)
    measured.time_plain(0.015)
    measured.time_plain(0.020)
    assert measured.break_even == pytest.approx(2.0)  # the lower median of the last samples: 0.015


def test_a_verify_is_scored_at_its_own_widths_cost():
    """Drafts of different lengths verify at different costs (here 1.15 plain steps for 2 tokens a row and
    1.6 for 5; on the Zen 5 CPU about 1.1 and 1.45): each verify is scored at the cost timed for its width,
    and at every width's where its own was not timed yet."""
    policy = SpecBackoff("cpu", 4, False)
    policy.time_plain(0.010)
    for _ in range(3):
        policy.time_speculative(0.0115, width=2)
        policy.time_speculative(0.0160, width=5)
    assert policy.break_even_at(2) == pytest.approx(1.15) and policy.break_even_at(5) == pytest.approx(1.6)
    assert policy.break_even_at(3) == policy.break_even_at(None) == policy.break_even  # all widths' lower median
    short, long = row("short"), row("long")
    for r, width in ((short, 2), (long, 5)):
        policy.observe(r, 1, width)  # 2 tokens: a gain of 0.85 plain steps at width 2, 0.4 at width 5
    over = policy.break_even - 1
    start = max(over, 1 - over)  # a new row's gain: one failure is no verdict
    assert policy.rows[short].gain == pytest.approx(start + SMOOTHING * (0.85 - start))
    assert policy.rows[long].gain == pytest.approx(start + SMOOTHING * (0.4 - start))
    for _ in range(2):
        policy.observe(short, 0, 2)  # 1 token for 1.15 steps: a small loss, the row keeps its credit
        policy.observe(long, 0, 5)  # 1 token for 1.6: the row backs off (as short would, scored at 1.6)
    assert policy.speculating(short) and not policy.speculating(long)


def test_rows_that_drafted_answer_for_the_rows_riding_along():
    """A verify costing 1.6 plain steps where one row drafted and one rode along for its one token: the
    rider's 0.6 steps beyond a plain one are charged to the row that drafted (two drafting rows share it)."""
    policy = SpecBackoff("cpu", 4, False)
    policy.time_plain(0.010)
    for _ in range(3):
        policy.time_speculative(0.016, width=5)
    alone, carrying, sharing = row("alone"), row("carrying"), row("sharing")
    policy.observe(alone, 1, 5)  # 2 tokens for 1.6 steps: +0.4
    policy.observe(carrying, 1, 5, riders=1.0)  # and a rider's 1 token for 1.6: -0.2 in all
    policy.observe(sharing, 1, 5, riders=0.5)  # half a rider's loss: +0.1
    over = policy.break_even - 1
    start = max(over, 1 - over)
    for r, gain in ((alone, 0.4), (carrying, -0.2), (sharing, 0.1)):
        assert policy.rows[r].gain == pytest.approx(start + SMOOTHING * (gain - start))


def test_the_engine_charges_each_verify_its_riders(monkeypatch):
    """Speculator.step hands each drafting row its step's rows without a draft per drafting row."""
    from mistral7b.engine.speculative import Speculator

    seen, expected = [], []
    observe, step = SpecBackoff.observe, Speculator.step
    monkeypatch.setattr(SpecBackoff, "observe", lambda self, r, kept, width=None, match=0, riders=0.0: (
        seen.append(riders), observe(self, r, kept, width, match, riders))[1])

    def counted(self, decoding, proposal, deltas):
        drafting = sum(1 for t in proposal.tokens if t)
        expected.extend([(len(decoding) - drafting) / drafting] * drafting)
        return step(self, decoding, proposal, deltas)

    monkeypatch.setattr(Speculator, "step", counted)
    model = tiny()
    prompts = random_prompts((9, 30, 17), seed=5)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain, _ = generate(model, prompts, params)
    fast, _ = generate(model, prompts, params, SpeculativeConfig("ngram", 3, backoff=False))
    assert [r.output_ids for r in fast] == [r.output_ids for r in plain]
    assert seen == expected and any(seen) and 0.0 in seen


def test_plain_decoding_is_timed_again_after_reprobe_steps():
    """A poisoned first plain timing must not keep every row speculating for good: while rows speculate,
    plain decoding is timed again every REPROBE_STEPS speculative steps."""
    policy, r = SpecBackoff("cuda", 4, True), row()
    policy.time_speculative(0.018)
    assert policy.wants_plain_timing([r])  # never timed
    policy.time_plain(0.5)  # a CUDA graph recorded inside the probe
    assert not policy.wants_plain_timing([r]) and policy.break_even < 1
    for _ in range(REPROBE_STEPS):
        policy.time_speculative(0.018)
    assert policy.wants_plain_timing([r])
    policy.time_plain(0.0011)  # the lower median of the two samples: the true cost
    assert not policy.wants_plain_timing([r]) and policy.hopeless


def test_failed_verifies_back_off_for_doubling_spans_and_success_resets_them():
    policy = SpecBackoff("cpu", 4, False)  # break-even 1.81: a verify must keep 0.81 drafts on average
    r = row()
    policy.observe(r, 0)
    assert policy.speculating(r)  # one failure from the optimistic start is not enough
    policy.observe(r, 0)
    assert not policy.speculating(r) and policy.backoffs == 1
    r.output_ids += [0] * (MIN_SKIP - 1)
    assert not policy.speculating(r)
    r.output_ids.append(0)
    assert policy.speculating(r)  # the retry
    policy.observe(r, 0)  # fails at once: twice as long this time
    assert not policy.speculating(r)
    r.output_ids += [0] * (2 * MIN_SKIP)
    assert policy.speculating(r)
    policy.observe(r, 3)  # pays: the next failure backs off for the shortest span again
    policy.observe(r, 0)
    policy.observe(r, 0)
    assert not policy.speculating(r)
    assert policy.rows[r].skip_until == len(r.output_ids) + MIN_SKIP
    for _ in range(20):  # the span is capped
        r.output_ids += [0] * MAX_SKIP
        policy.observe(r, 0)
    assert policy.rows[r].skip_until <= len(r.output_ids) + MAX_SKIP
    del r  # finished or aborted, the request goes and its record with it: a server keeps no trail
    gc.collect()
    assert len(policy.rows) == 0


def test_a_new_row_starts_from_what_earlier_rows_taught():
    policy = SpecBackoff("cpu", 4, False)  # a verify must keep 0.81 drafts
    assert policy.speculating(row("first"))  # nothing known: optimistic
    for name in "abc":
        policy.observe(row(name), 3)  # verifies pay
    assert policy.speculating(row("d"))
    for _ in range(30):
        policy.observe(row("e"), 0)  # then they stop paying, on average
    assert policy.gain_mean < 0.0
    late = row("f", produced=5)
    assert not policy.speculating(late)  # plain for the shortest span first, then a trial
    late.output_ids += [0] * MIN_SKIP
    assert policy.speculating(late)
    seeded = row("g")
    seeded.params.seed = 7
    policy.observe(seeded, 0)
    policy.observe(seeded, 0)
    assert policy.speculating(seeded)  # neither the prior nor its own failures: its draws must not depend on them
    assert policy.wants_plain_timing([late]) is False  # nothing timed here


def test_a_row_without_drafts_backs_off_only_where_its_lone_steps_cost_more_than_plain_ones():
    """A lone step (no row had a draft) in groups of plain steps' time: neutral at about the same cost (the
    CPU; within LONE_MARGIN), a loss where its host read doubles it (a GPU), so n-gram rows that rarely
    match stop trying there."""
    neutral, costly = SpecBackoff("cpu", 4, False), SpecBackoff("cuda", 4, False)
    for policy, lone_s in ((neutral, 0.0118), (costly, 0.020)):
        policy.time_plain(0.010)
        for _ in range(LONE_SAMPLES - 1):
            policy.time_lone(lone_s)
        assert policy.lone_cost == 1.0  # too few samples yet: the prior
        policy.time_lone(lone_s)
    assert neutral.lone_cost == pytest.approx(1.18) and costly.lone_cost == pytest.approx(2.0)
    calm, eager = row("calm"), row("eager")
    for _ in range(6):
        neutral.observe_empty(calm)
        costly.observe_empty(eager)
    assert neutral.speculating(calm) and neutral.backoffs == 0
    assert not costly.speculating(eager) and costly.backoffs >= 1
    paid = row("paid")
    neutral.observe(paid, 3)  # a verify that paid
    for _ in range(10):
        neutral.observe_empty(paid)  # no evidence either way: must not wash that verify out
    neutral.observe(paid, 0)
    assert neutral.speculating(paid)
    assert SpecBackoff("cuda", 4, False).lone_cost == 1.0  # unmeasured: no verdict


def test_where_a_verify_cannot_pay_at_all_rows_back_off_for_the_longest_span():
    policy = SpecBackoff("cpu", 4, True)
    policy.time_speculative(0.060)
    policy.time_plain(0.010)  # a speculative step costs 6 plain steps; a verify emits 5 tokens at most
    assert policy.hopeless
    r = row()
    for _ in range(3):  # even all drafts accepted do not pay
        policy.observe(r, 4)
    assert not policy.speculating(r) and policy.rows[r].skip_until == MAX_SKIP
    assert not SpecBackoff("cpu", 8, True).hopeless  # the prior is never hopeless: it needs measuring


def test_disabled_never_backs_off():
    policy = SpecBackoff("cpu", 4, True, enabled=False)
    r = row()
    for _ in range(10):
        policy.observe(r, 0)
    assert policy.speculating(r) and policy.backoffs == 0


@pytest.fixture
def break_even_2(monkeypatch):
    """Decisions independent of this box's timings: a verify must emit 2 tokens a row to pay."""
    monkeypatch.setattr(SpecBackoff, "break_even", property(lambda self: 2.0))
    monkeypatch.setattr(SpecBackoff, "break_even_at", lambda self, width: 2.0)


def test_a_draft_that_always_fails_backs_off_and_output_stays_plain(break_even_2):
    """A draft from other random weights: its tokens are never the target's. With backoff, rows verify far
    less often than they produce tokens; without, every step verifies. Greedy output equals plain both ways."""
    target, stranger = tiny(seed=1), tiny(seed=7)
    prompts = random_prompts((5, 23, 40), seed=3)
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    plain, _ = generate(target, prompts, params)
    runs = {}
    for backoff in (True, False):
        spec = SpeculativeConfig("draft", 3, draft="x", backoff=backoff)
        out, engine = generate(target, prompts, params, spec, stranger)
        assert [r.output_ids for r in out] == [r.output_ids for r in plain]
        runs[backoff] = engine.speculator
    off, on = runs[False], runs[True]
    assert off.stats.accepted_tokens <= off.stats.draft_tokens // 10  # the draft is indeed useless
    assert off.backoff.backoffs == 0 and on.backoff.backoffs >= len(prompts)
    assert on.stats.verify_rows < off.stats.verify_rows / 2


def test_a_draft_that_always_agrees_never_backs_off(break_even_2):
    target = tiny(seed=1)
    prompts = random_prompts((5, 23, 40), seed=4)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    plain, _ = generate(target, prompts, params)
    out, engine = generate(target, prompts, params, SpeculativeConfig("draft", 3, draft="x"), target)
    assert [r.output_ids for r in out] == [r.output_ids for r in plain]
    spec = engine.speculator
    assert spec.backoff.backoffs == 0 and spec.stats.accepted_tokens == spec.stats.draft_tokens > 0


def test_the_engine_times_both_kinds_of_step(monkeypatch):
    """A draft that is the target itself: a speculative step (its k draft steps and the verify) is timed
    against a plain one (probed once when no row backed off yet). The engine's clock ticks once per forward
    here, so the break-even it measures is a count of forwards, not this box's load (a wall-clock bound
    failed CI at 1.29x under two xdist workers)."""
    from mistral7b.engine import core

    target = tiny(seed=1)
    prompts = random_prompts((5, 23), seed=6)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    plain, _ = generate(target, prompts, params)
    forwards = [0]
    forward = type(target).forward

    def counted(self, *args, **kwargs):
        forwards[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "forward", counted)
    monkeypatch.setattr(core, "time", SimpleNamespace(perf_counter=lambda: float(forwards[0])))
    out, engine = generate(target, prompts, params, SpeculativeConfig("draft", 3, draft="x"), target, max_batch=2)
    assert [r.output_ids for r in out] == [r.output_ids for r in plain]
    backoff = engine.speculator.backoff
    assert backoff.plain_s == 1.0
    # A draft's catch-up forward, k - 1 more for its k tokens, and the verify: at least k + 1 plain steps.
    assert backoff.timings["speculative"] and min(backoff.timings["speculative"]) >= 3 + 1
    assert backoff.break_even == backoff.speculative_s


def test_plain_cost_is_probed_with_a_group_of_steps():
    """Before any row backs off, the engine learns plain decoding's cost from a group of plain steps read at
    once, as a backed-off row decodes, not from one step with its own host read (which made a self-int4
    draft look worth speculating on an H100 at 0.31x of plain speed)."""
    from mistral7b.engine import Engine

    target = tiny(seed=1)
    engine = Engine(target, None, max_batch=2, speculative=SpeculativeConfig("draft", 3, draft="x"), draft_model=target,
                    decode_steps=4)  # the CUDA default is 8
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    requests = [engine.add(p, params) for p in random_prompts((5, 23), seed=8)]
    backoff = engine.speculator.backoff
    while backoff.speculative_s is None:
        engine.step()
    assert backoff.plain_s is None
    before = [len(r.output_ids) for r in requests]
    engine.step()  # the probe
    assert backoff.plain_s is not None
    assert [len(r.output_ids) - n for r, n in zip(requests, before)] == [4, 4]


def test_ngram_rows_without_a_match_sleep_where_lone_steps_cost_two(monkeypatch):
    """Random prompts give n-gram little to match: nearly every step would be a lone one. At a plain step's
    cost rows keep trying, lone step after lone step; at twice it (a GPU's host read) a row without a match
    sleeps, decoding in plain groups, and the engine's probe of each group's tokens wakes it when its
    n-gram matches. Output equals plain decoding either way."""
    target = tiny(seed=1)
    prompts = random_prompts((7, 19, 33), seed=9)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    plain, _ = generate(target, prompts, params)
    policies = {}
    # No verify loses, whatever this box's timings: only lone steps decide.
    monkeypatch.setattr(SpecBackoff, "break_even", property(lambda self: 1.0))
    monkeypatch.setattr(SpecBackoff, "break_even_at", lambda self, width: 1.0)
    # As on a GPU too: groups of 4 steps, the next launched before the last is read (probed as it is read).
    for cost, options in ((1.0, {}), (2.0, {}), (2.0, {"decode_steps": 4, "pipeline": True})):
        monkeypatch.setattr(SpecBackoff, "lone_cost", property(lambda self, cost=cost: cost))
        out, engine = generate(target, prompts, params, SpeculativeConfig("ngram", 3, min_ngram=3), **options)
        assert [r.output_ids for r in out] == [r.output_ids for r in plain]
        policies[cost, bool(options)], stats = engine.speculator.backoff, engine.speculator.stats
        assert 0 < stats.verify_rows < len(prompts) * 64 / 10  # few matches, some: the test's premise
    trying = policies[1.0, False]
    assert trying.sleeps == trying.backoffs == 0 and trying.lone_s > 0  # the engine times its lone steps
    for sleeping in (policies[2.0, False], policies[2.0, True]):
        assert sleeping.sleeps >= len(prompts) and sleeping.backoffs == 0 and sleeping.lone_s is None  # none taken
        assert sleeping.wakes >= 1  # a probe found a match in a sleeping row's tokens


def test_backed_off_ngram_rows_wake_on_a_confident_match_and_the_output_stays_plain(monkeypatch):
    """In the engine: n-gram rows whose verifies lose back off, and the lookup before each step wakes a
    row whose match is of a length that pays (here: 2 tokens or more), in a batch of two where the other
    row may still be speculating. The tokens equal plain decoding's."""
    target = tiny(seed=1)
    prompts = random_prompts((7, 19, 33), seed=9)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    plain, _ = generate(target, prompts, params, max_batch=2)
    monkeypatch.setattr(SpecBackoff, "break_even_at", lambda self, width: 2.5)  # a verify must keep 2 drafts
    probed = []
    monkeypatch.setattr(SpecBackoff, "confident", lambda self, match: probed.append(match) or match >= 2)
    out, engine = generate(target, prompts, params, SpeculativeConfig("ngram", 3), max_batch=2)
    assert [r.output_ids for r in out] == [r.output_ids for r in plain]
    backoff = engine.speculator.backoff
    assert backoff.backoffs > 0 and backoff.wakes > 0 and backoff.sleeps == 0
    assert 0 in probed and any(m >= 2 for m in probed)  # rows probed without a match and with one


def test_a_row_sleeps_only_where_the_proposer_probes_and_lone_steps_cost():
    """Sleeping (`probes`) replaces the lone step's score; without probes the lone step is scored as before;
    a seeded row neither sleeps nor backs off; a woken row speculates again."""
    for probes in (False, True):
        policy = SpecBackoff("cuda", 4, False, probes=probes)
        policy.time_plain(0.010)
        for _ in range(LONE_SAMPLES):
            policy.time_lone(0.025)
        r, seeded = row("r"), row("seeded")
        seeded.params = SimpleNamespace(seed=3)
        for _ in range(3):
            policy.observe_empty(r)
            policy.observe_empty(seeded)
        assert not policy.speculating(r) and policy.speculating(seeded)
        assert (policy.sleeps > 0, policy.backoffs > 0) == (probes, not probes)
        assert policy.waiting([r, seeded]) == [r]  # asleep, or backed off
        assert policy.rows[r].asleep == probes
        policy.probe(r, 0)  # no draft: it sleeps on
        assert not policy.speculating(r)
        policy.probe(r, 1)  # a draft wakes a sleeping row; a backed-off one waits for a match that pays
        assert policy.speculating(r) == probes and policy.wakes == probes


def test_a_backed_off_row_wakes_for_a_match_whose_drafts_pay_over_every_row():
    """Attempts are also scored by the n-gram match that drafted them, over every row: a row that backed off
    after weak guesses speculates again when a probe finds a match of a length that gains clearly, and
    not for one that does not (nor one that was never tried)."""
    policy = SpecBackoff("cpu", 4, False, probes=True)
    policy.time_plain(0.010)
    policy.time_speculative(0.012, width=2)
    policy.time_speculative(0.015, width=5)
    others = [row(f"o{i}") for i in range(3)]
    for r in others:
        policy.observe(r, 3, 5, match=3)  # 4 tokens for 1.5 steps: +2.5 each
        policy.observe(r, 0, 2, match=1)  # 1 token for 1.2 steps: -0.2 each
    three = 2.5
    one = -0.2
    assert policy.gain_by_match[3] == pytest.approx(three) and policy.gain_by_match[1] == pytest.approx(one)
    policy.observe(others[0], 1, 5, match=3)  # 2 tokens for 1.5: +0.5, a running mean over every row
    assert policy.gain_by_match[3] == pytest.approx(three + GLOBAL_SMOOTHING * (0.5 - three))
    assert policy.confident(3) and not policy.confident(1) and not policy.confident(2)
    weak = row("weak")
    while policy.speculating(weak):
        policy.observe(weak, 0, 5, match=1)
    assert policy.waiting([weak, *others]) == [weak]
    for match in (0, 1, 2):
        policy.probe(weak, match)
        assert not policy.speculating(weak)
    policy.probe(weak, 3)
    assert policy.speculating(weak) and policy.wakes == 1
    policy.gain_by_match[3] = CONFIDENT_GAIN - 0.01  # just short of clearly paying: no wake
    while policy.speculating(weak):
        policy.observe(weak, 0, 5, match=1)
    policy.probe(weak, 3)
    assert not policy.speculating(weak)
    seeded = row("seeded")
    seeded.params = SimpleNamespace(seed=1)
    policy.observe(seeded, 0, 5, match=4)  # a seeded row's attempts teach nothing: it never backs off
    assert 4 not in policy.gain_by_match


def test_seeded_rows_never_back_off():
    """Whether a row speculates changes which random numbers a seeded row draws, and the break-even is timed:
    seeded rows therefore always speculate, and give the same tokens as with backoff off."""
    target = tiny(seed=1)
    prompts = random_prompts((9, 17), seed=5)
    params = SamplingParams(max_tokens=50, temperature=0.9, seed=11, ignore_eos=True)
    runs = []
    for backoff in (True, False):
        spec = SpeculativeConfig("draft", 3, draft="x", backoff=backoff)
        out, engine = generate(target, prompts, params, spec, tiny(seed=7))
        runs.append([r.output_ids for r in out])
        assert engine.speculator.backoff.backoffs == 0
    assert runs[0] == runs[1] and all(len(ids) == 50 for ids in runs[0])
