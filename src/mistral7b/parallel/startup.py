"""Bounded start-up of spawned ranks: every step of a launch under a timeout, and a clear error.

Each worker posts the step it enters ("rendezvous", "first collective", "loading") into the
rendezvous store, one tick per tensor it loads, and at the end "ok" or its error. Rank 0 waits on
those keys, never on a collective that could wait forever: a worker that exits, that does not reach
a step within `timeout_s`, or whose loading makes no progress for `timeout_s`, fails the launch with
an error naming the rank and the step (`StartupError`); the caller then stops every process.
"""

from __future__ import annotations

import time

STEPS = ("spawn", "rendezvous", "first collective", "loading")


class StartupError(RuntimeError):
    """A tensor-parallel rank failed or did not answer during start-up."""


class Steps:
    """A rank's side: post its steps, loading progress and outcome (a no-op without a store: torchrun)."""

    def __init__(self, store, rank: int):
        self.store, self.rank = store, rank

    def enter(self, step: str) -> None:
        if self.store is not None:
            self.store.set(f"step/{self.rank}", step)

    def tick(self) -> None:
        if self.store is not None:
            self.store.add(f"progress/{self.rank}", 1)

    def finish(self, error: str | None) -> None:
        if self.store is not None:
            self.store.set(f"outcome/{self.rank}", error or "ok")


class Watch:
    """Rank 0's side: wait for every worker to reach a step, within `timeout_s` of the last sign of it."""

    def __init__(self, store, processes, timeout_s: float):
        self.store, self.processes, self.timeout_s = store, list(processes), timeout_s

    def step_of(self, rank: int) -> str:
        key = f"step/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else "spawn"

    def where(self) -> str:
        """"rank 1 at 'loading', rank 2 at 'rendezvous'": where each worker is."""
        return ", ".join(f"rank {rank} at '{self.step_of(rank)}'" for rank in range(1, len(self.processes) + 1))

    def until(self, step: str) -> None:
        """Every worker has entered `step` (or a later one)."""
        wanted = STEPS.index(step)
        self._wait(lambda rank: STEPS.index(self.step_of(rank)) >= wanted, progress=lambda rank: 0)

    def outcomes(self) -> list[str]:
        """Every worker's outcome ("ok" or its error), once each has finished loading."""
        self._wait(lambda rank: self.store.check([f"outcome/{rank}"]),
                   progress=lambda rank: self.store.add(f"progress/{rank}", 0))
        return [self.store.get(f"outcome/{rank}").decode() for rank in range(1, len(self.processes) + 1)]

    def _wait(self, reached, progress) -> None:
        ranks = range(1, len(self.processes) + 1)
        last = {rank: (progress(rank), time.monotonic()) for rank in ranks}
        while True:
            pending = [rank for rank in ranks if not reached(rank)]
            if not pending:
                return
            for rank in pending:
                self._check_alive(rank)
                now, (before, since) = progress(rank), last[rank]
                if now != before:
                    last[rank] = (now, time.monotonic())
                elif time.monotonic() - since > self.timeout_s:
                    raise StartupError(f"tensor-parallel rank {rank} of {len(self.processes) + 1} did not answer "
                                       f"within {self.timeout_s:g}s during start-up step '{self.step_of(rank)}'")
            time.sleep(0.02)

    def _check_alive(self, rank: int) -> None:
        code = self.processes[rank - 1].exitcode
        if code is not None:
            raise StartupError(f"tensor-parallel rank {rank} of {len(self.processes) + 1} exited with code {code} "
                               f"during start-up step '{self.step_of(rank)}' (its error is above)")
