"""When speculation does not pay, a row stops speculating for a while.

A speculative step costs `break_even` plain decode steps (a verify of k + 1 tokens, and a draft model's
k steps). A row gains only while its verifies emit more tokens than that: 1 + the draft tokens it gets
accepted. Open-ended chat gives n-gram few matches, and a draft that disagrees with the target gives
nothing; both then ran below plain speed (n-gram 0.51x and self-int4 0.26x on open prompts, default
model, H100, 2026-12-05f), where a plain row would decode in groups of steps without a host read
between them. Such a row decodes plainly for a number of tokens that doubles at each failed retry.

`break_even` is measured as the engine runs: the wall time of a speculative step over a plain decode
step's. Until both are known it is the prior below. The output is unchanged: each token is the target's
exactly either way. Seeded rows always speculate: whether a row speculates changes which random numbers
it draws, and timings must not decide a seeded request's text.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from .request import Request

# Until measured: a verify of 5 tokens costs 1.14 decode steps on an H100 at the 7B shape and 1.81 on the
# default model's 2-core CPU (benchmarks/verify_cost.py; see speculative.MEASURED_MAX_BATCH). A draft
# model adds its own steps: an int4 step of a 16-bit target's shape reads about a third of its bytes.
PRIOR_VERIFY_COST = {"cuda": 1.14, "cpu": 1.81}
PRIOR_DRAFT_STEP_COST = 0.35
MIN_SKIP, MAX_SKIP = 8, 256  # tokens a row decodes plainly after a failed verify, doubling per retry
SMOOTHING = 0.5  # weight of the newest verify (and of the newest timing) in a row's running means
GLOBAL_SMOOTHING = 0.1  # and in the mean over every row's verifies, a new row's prior


@dataclass
class _Row:
    accepted: float  # running mean of draft tokens accepted per verify
    skip_until: int = 0  # the row speculates again once it has this many output tokens
    skip: int = MIN_SKIP  # tokens of plain decoding after its next failed verify


class SpecBackoff:
    """Per-row decisions (`speculating`) from each verify's outcome (`observe`) and the engine's step
    timings (`time_speculative`, `time_plain`). A new row starts from what earlier rows taught: where
    verifies do not pay on average it begins by decoding plainly, and where a speculative step costs
    more plain steps than a verify can emit tokens (k + 1), rows back off for the longest span at once."""

    def __init__(self, device_type: str, num_tokens: int, drafts_with_model: bool, enabled: bool = True):
        self.enabled, self.num_tokens = enabled, num_tokens
        self.prior = PRIOR_VERIFY_COST.get(device_type, PRIOR_VERIFY_COST["cpu"]) \
            + (num_tokens * PRIOR_DRAFT_STEP_COST if drafts_with_model else 0.0)
        self.speculative_s: float | None = None  # running mean of a speculative step's wall time
        self.plain_s: float | None = None  # and of a plain decode step's
        self.accepted_mean: float | None = None  # draft tokens accepted per verify, every row's
        # Per request, gone with it (finished or aborted); requests compare by identity.
        self.rows: weakref.WeakKeyDictionary[Request, _Row] = weakref.WeakKeyDictionary()
        self.backoffs = 0  # times a row stopped speculating

    @property
    def break_even(self) -> float:
        """Tokens a verify must emit per row to beat plain decoding."""
        if self.speculative_s is None or self.plain_s is None:
            return self.prior
        return self.speculative_s / self.plain_s

    @property
    def hopeless(self) -> bool:
        """Measured, a speculative step costs more than the k + 1 tokens a verify can emit at best."""
        return self.plain_s is not None and self.speculative_s is not None and self.break_even > self.num_tokens + 1

    def _decides(self, request: Request) -> bool:
        """Backoff is on and the request has no seed: whether a seeded row speculates changes its draws,
        and timings must not."""
        return self.enabled and request.params.seed is None

    def speculating(self, request: Request) -> bool:
        if not self._decides(request):
            return True
        row = self.rows.get(request)
        if row is None and self.accepted_mean is not None \
                and self.accepted_mean < self.break_even - 1.0:  # a new row where verifies do not pay
            row = self.rows[request] = _Row(self.break_even - 1.0)
            self._back_off(request, row)
        return row is None or len(request.output_ids) >= row.skip_until

    def observe(self, request: Request, accepted: int) -> None:
        """A verify of `request` kept `accepted` draft tokens."""
        if not self._decides(request):
            return
        threshold = self.break_even - 1.0
        self.accepted_mean = accepted if self.accepted_mean is None \
            else self.accepted_mean + GLOBAL_SMOOTHING * (accepted - self.accepted_mean)
        row = self.rows.setdefault(request, _Row(accepted=max(2 * threshold, 1.0)))  # one failure is no verdict
        row.accepted += SMOOTHING * (accepted - row.accepted)
        if row.accepted >= threshold:
            row.skip = MIN_SKIP
            return
        self._back_off(request, row)
        row.accepted = threshold  # back on trial: the next failed verify backs off again

    def _back_off(self, request: Request, row: _Row) -> None:
        if self.hopeless:
            row.skip = MAX_SKIP
        row.skip_until = len(request.output_ids) + row.skip
        row.skip = min(2 * row.skip, MAX_SKIP)
        self.backoffs += 1

    def wants_plain_timing(self, decoding: list[Request]) -> bool:
        """No row has backed off yet, so no plain decoding was timed: the engine then runs a group of plain
        steps to learn its cost (not over a seeded row, whose draws would change)."""
        return self.plain_s is None and self.speculative_s is not None and all(map(self._decides, decoding))

    def time_speculative(self, seconds: float) -> None:
        if self.enabled:
            self.speculative_s = _mean(self.speculative_s, seconds)

    def time_plain(self, seconds_per_step: float) -> None:
        if self.enabled:
            self.plain_s = _mean(self.plain_s, seconds_per_step)


def _mean(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)
