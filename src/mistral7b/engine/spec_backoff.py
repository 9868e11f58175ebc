"""When speculation does not pay, a row stops speculating for a while.

A speculative step costs `break_even` plain decode steps (a verify of k + 1 tokens, and a draft model's
k steps). A row gains only while its verifies emit more tokens than that: 1 + the draft tokens it gets
accepted. Open-ended chat gives n-gram few matches, and a draft that disagrees with the target gives
nothing; both then ran below plain speed (n-gram 0.51x and self-int4 0.26x on open prompts, default
model, H100, 2026-12-05f), where a plain row would decode in groups of steps without a host read
between them. Such a row decodes plainly for a number of tokens that doubles at each failed retry.

A speculating row whose proposer finds nothing (n-gram without a match) decodes a lone step, with a host
read of its own (where that measures costly, an n-gram row sleeps instead: below). On a GPU a lone step
costs about two plain steps in a group (2.4 ms against 1.1 on the default
model, H100, 2026-12-06c, solved from the n-gram table's tokens per forward), and n-gram then ran at 0.76x
of plain on grounded prompts and 0.47x on open ones, every row speculating throughout. So each attempt is
scored by its gain in tokens over plain decoding at the same cost: a verify's 1 + accepted - `break_even`
less the loss of the step's rows without a draft, each of which paid the verify's cost for one token,
shared among the rows that drafted (open prompts two at a time: 0.93-0.95x plain speed with this charge,
0.91-0.94x without; default model, Zen 5 CPU);
a lone step's 1 - `lone_cost` where that is clearly a loss (a CPU's lone step costs a plain one: unscored).
A row backs off while its running gain is below zero.

`break_even` is measured as the engine runs: the wall time of a speculative step over a plain decode
step's, per verify width where steps of that width were timed (`break_even_at`); `lone_cost` the same for
a lone step. Until both sides are known they are the priors below. Each
time is the lower median of its last few samples, and plain decoding is timed again every REPROBE_STEPS
speculative steps: one slow sample (a CUDA graph recorded for a new length inside the timed step) must not
decide for good.

Where a lone step measures costly and the proposer can say cheaply whether a row has a draft (n-gram:
`probes`), a row without one sleeps instead of being scored: it decodes in plain groups, and the engine
looks up its n-gram each time it reads a group's tokens (microseconds, no device work), waking the row
when a match appears. Open chat then pays no lone steps, where retrying after each backoff span took
n-gram to 0.89x of plain speed on an H100 (default model, 2026-12-06d; not yet measured since).

A backed-off row still takes a draft its proposer is sure of. n-gram's first draft token is right 19% of
the time after a match of 1 token and 79-88% after 3-4 (default model, grounded prompts): one row's
failed guesses after short matches backed it off from the long copies that followed, and grounded
prompts ran at 1.32x plain speed served against 1.39x speculating every step (Zen 5 CPU, 2026-12-07).
So attempts are also scored by their match length over every row (`gain_by_match`), and a probe wakes a
backed-off row whose match is of a length that gains clearly (`probe`).

The output is unchanged: each token is the target's exactly either way. Seeded rows always speculate: whether
a row speculates changes which random numbers it draws, and timings must not decide a seeded request's
text.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

from .request import Request

# Until measured: a verify of 5 tokens costs 1.23 decode steps on an H100 at the 7B shape (batch 1 and 8,
# 2026-12-07) and 1.51-1.81 on the default model's 2-core CPUs (Zen 5 with VNNI, Zen 3 with AVX2)
# (benchmarks/verify_cost.py; see speculative.MEASURED_MAX_BATCH). A draft model adds its own steps: an
# int4 step of a 16-bit target's shape reads about a third of its bytes.
PRIOR_VERIFY_COST = {"cuda": 1.23, "cpu": 1.81}
PRIOR_DRAFT_STEP_COST = 0.35
PRIOR_LONE_COST = 1.0  # a lone step's, until measured: no verdict on a row that finds no draft
LONE_SAMPLES = 3  # lone steps timed before their cost is trusted
LONE_MARGIN = 0.25  # a lone step loses only past 1 + this many plain steps: on a CPU it costs 0.93-0.98 of one
MIN_SKIP, MAX_SKIP = 8, 256  # tokens a row decodes plainly after a failed verify, doubling per retry
SMOOTHING = 0.5  # weight of the newest attempt in a row's running gain
GLOBAL_SMOOTHING = 0.1  # and in the mean over every row's attempts, a new row's prior
CONFIDENT_GAIN = 0.5  # tokens over plain decoding a match length's attempts gain on average to wake a row
TIMING_SAMPLES = 5  # the last samples a step's time is the lower median of
REPROBE_STEPS = 32  # speculative steps after which plain decoding is timed again


@dataclass
class _Row:
    gain: float  # running mean of an attempt's gain in tokens over plain decoding
    skip_until: int = 0  # the row speculates again once it has this many output tokens
    skip: int = MIN_SKIP  # tokens of plain decoding after its next failed verify
    asleep: bool = False  # no draft, and lone steps cost: plain groups until a probe finds one


class SpecBackoff:
    """Per-row decisions (`speculating`) from each attempt's outcome (`observe`, `observe_empty`) and the
    engine's step timings (`time_speculative`, `time_lone`, `time_plain`). A new row starts from what
    earlier rows taught: where attempts do not pay on average it begins by decoding plainly, and where a
    speculative step costs more plain steps than a verify can emit tokens (k + 1), rows back off for the
    longest span at once."""

    def __init__(self, device_type: str, num_tokens: int, drafts_with_model: bool, enabled: bool = True,
                 probes: bool = False):
        self.enabled, self.num_tokens, self.probes = enabled, num_tokens, probes
        self.prior = PRIOR_VERIFY_COST.get(device_type, PRIOR_VERIFY_COST["cpu"]) \
            + (num_tokens * PRIOR_DRAFT_STEP_COST if drafts_with_model else 0.0)
        self.timings = {kind: deque(maxlen=TIMING_SAMPLES) for kind in ("speculative", "lone", "plain")}
        self.by_width: dict[int, deque] = {}  # speculative steps' times per verify width (tokens a row)
        self.since_plain = 0  # speculative steps since plain decoding was last timed
        self.gain_mean: float | None = None  # an attempt's gain over plain decoding, every row's
        self.gain_by_match: dict[int, float] = {}  # the same by the n-gram match that drafted it
        # Per request, gone with it (finished or aborted); requests compare by identity.
        self.rows: weakref.WeakKeyDictionary[Request, _Row] = weakref.WeakKeyDictionary()
        self.backoffs = 0  # times a row stopped speculating
        self.sleeps = self.wakes = 0  # times a row fell asleep (`probes`), and a probe woke a waiting row

    def _seconds(self, kind: str) -> float | None:
        return _lower_median(self.timings[kind])

    @property
    def speculative_s(self) -> float | None:
        """A speculative step's wall time (a draft model's steps and the verify)."""
        return self._seconds("speculative")

    @property
    def lone_s(self) -> float | None:
        """A lone decode step's, where no row had a draft."""
        return self._seconds("lone")

    @property
    def plain_s(self) -> float | None:
        """A plain decode step's, in a group."""
        return self._seconds("plain")

    @property
    def break_even(self) -> float:
        """Tokens a verify must emit per row to beat plain decoding."""
        if self.speculative_s is None or self.plain_s is None:
            return self.prior
        return self.speculative_s / self.plain_s

    def break_even_at(self, width: int | None) -> float:
        """The same for a verify `width` tokens a row wide, once steps of that width were timed: a short
        draft's verify costs less (a CPU's 1.10 plain steps for 2 tokens, 1.45 for 5: default model, Zen 5),
        and one cost for all scored n-gram's drafts of 1 token (after a match of 1) as losses: rows backed
        off, 0.69 of steps speculated against 0.82 with every draft 4 long."""
        seconds = _lower_median(self.by_width.get(width, ()))
        if seconds is None or self.plain_s is None:
            return self.break_even
        return seconds / self.plain_s

    @property
    def lone_cost(self) -> float:
        """A lone decode step's cost in plain steps (the prior until LONE_SAMPLES were timed)."""
        if len(self.timings["lone"]) < LONE_SAMPLES or self.plain_s is None:
            return PRIOR_LONE_COST
        return self.lone_s / self.plain_s

    @property
    def hopeless(self) -> bool:
        """Measured, a speculative step costs more than the k + 1 tokens a verify can emit at best."""
        return self.plain_s is not None and self.speculative_s is not None and self.break_even > self.num_tokens + 1

    @property
    def lone_steps_cost(self) -> bool:
        """Measured, a lone step costs clearly more than a plain step in a group (a GPU's host read)."""
        return self.lone_cost > 1.0 + LONE_MARGIN

    def sleeping_rows_decode_in_groups(self, requests: list[Request]) -> bool:
        """No row had a draft: the rows that wanted one fell asleep (`observe_empty`), so the step decodes a
        plain group rather than a lone step. Not over a seeded row, whose chances to speculate a group
        would change by timings."""
        return self.probes and self.lone_steps_cost and all(map(self._decides, requests))

    def _decides(self, request: Request) -> bool:
        """Backoff is on and the request has no seed: whether a seeded row speculates changes its draws,
        and timings must not."""
        return self.enabled and request.params.seed is None

    def speculating(self, request: Request) -> bool:
        if not self._decides(request):
            return True
        row = self.rows.get(request)
        if row is None and self.gain_mean is not None and self.gain_mean < 0.0:  # a new row where attempts lose
            row = self.rows[request] = _Row(0.0)
            self._back_off(request, row)
        return row is None or (not row.asleep and len(request.output_ids) >= row.skip_until)

    def observe(self, request: Request, accepted: int, width: int | None = None, match: int = 0,
                riders: float = 0.0) -> None:
        """A verify of `request` (`width` tokens a row) kept `accepted` draft tokens; `match`: the n-gram
        match length that drafted them (0: none, or a draft model); `riders`: the step's rows without a
        draft per row with one. A rider emitted its one token at the verify's cost, more than a plain
        step's: the rows that drafted are charged its loss."""
        cost = self.break_even_at(width)
        gain = 1.0 + accepted - cost - riders * (cost - 1.0)
        if match and self._decides(request):
            self.gain_by_match[match] = _smoothed(self.gain_by_match.get(match), gain, GLOBAL_SMOOTHING)
        self._score(request, gain)

    def confident(self, match: int) -> bool:
        """Drafts after a match of `match` tokens gain clearly, on average over every row's attempts."""
        return self.gain_by_match.get(match, 0.0) >= CONFIDENT_GAIN

    def observe_empty(self, request: Request) -> None:
        """`request` speculated but had no draft, and no other row had one. Only where a lone step clearly
        costs more than a plain step (timings under load are noisy: a step that cost what plain decoding
        does is no evidence, and scoring it 0 would wash out the row's verifies), the row sleeps (`probes`)
        or the lone step it decoded is scored as a loss."""
        if not self.lone_steps_cost:
            return
        if self.probes and self._decides(request):
            self._row(request).asleep = True
            self.sleeps += 1
        else:
            self._score(request, 1.0 - self.lone_cost)

    def waiting(self, requests: list[Request]) -> list[Request]:
        """Those of `requests` that do not speculate now: asleep, or backed off."""
        return [r for r in requests if self._decides(r) and r in self.rows and not self.speculating(r)]

    def probe(self, request: Request, match: int) -> None:
        """The proposer finds a match of `match` tokens (0: none) for a waiting row: it speculates again if
        it slept and there is a draft at all, or if it backed off and such matches gain clearly."""
        row = self.rows[request]
        if row.asleep and match:  # a backoff span it was in still runs
            row.asleep = False
        elif not row.asleep and self.confident(match):
            row.skip_until = 0
        else:
            return
        self.wakes += 1

    def _row(self, request: Request) -> _Row:
        threshold = self.break_even - 1.0
        return self.rows.setdefault(request, _Row(max(threshold, 1.0 - threshold)))  # one failure is no verdict

    def _score(self, request: Request, gain: float) -> None:
        if not self._decides(request):
            return
        self.gain_mean = _smoothed(self.gain_mean, gain, GLOBAL_SMOOTHING)
        row = self._row(request)
        row.gain = _smoothed(row.gain, gain, SMOOTHING)
        if row.gain >= 0.0:
            row.skip = MIN_SKIP
            return
        self._back_off(request, row)
        row.gain = 0.0  # back on trial: the next losing attempt backs off again

    def _back_off(self, request: Request, row: _Row) -> None:
        if self.hopeless:
            row.skip = MAX_SKIP
        row.skip_until = len(request.output_ids) + row.skip
        row.skip = min(2 * row.skip, MAX_SKIP)
        self.backoffs += 1

    def wants_plain_timing(self, decoding: list[Request]) -> bool:
        """Plain decoding was not timed yet (no row backed off) or not for REPROBE_STEPS speculative steps:
        the engine then runs a group of plain steps to time it (not over a seeded row, whose draws would
        change)."""
        due = self.plain_s is None or self.since_plain >= REPROBE_STEPS
        return self.enabled and due and self.speculative_s is not None and all(map(self._decides, decoding))

    def time_speculative(self, seconds: float, width: int | None = None) -> None:
        self._time("speculative", seconds)
        if self.enabled and width is not None:
            self.by_width.setdefault(width, deque(maxlen=TIMING_SAMPLES)).append(seconds)
        self.since_plain += self.enabled

    def time_lone(self, seconds: float) -> None:
        self._time("lone", seconds)
        self.since_plain += self.enabled

    def time_plain(self, seconds_per_step: float) -> None:
        self._time("plain", seconds_per_step)
        self.since_plain = 0

    def _time(self, kind: str, seconds: float) -> None:
        if self.enabled:
            self.timings[kind].append(seconds)


def _lower_median(samples) -> float | None:
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def _smoothed(mean: float | None, sample: float, weight: float) -> float:
    """An exponential running mean's next value (the sample itself when there was none)."""
    return sample if mean is None else mean + weight * (sample - mean)
