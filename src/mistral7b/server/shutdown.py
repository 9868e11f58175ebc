"""Graceful shutdown: on SIGTERM or SIGINT the server drains instead of cutting open streams.

`Drain` is the state the app and the server share. The first signal starts it: the app answers 503
(`/health` included, so a load balancer takes the server out) while requests already running go on.
When none is left, or after `timeout` seconds (a second signal: at once), the requests still open
end with an OpenAI-shaped error (streams: an error event, then `[DONE]`), and the server stops; a
third signal stops it at once. The exit status is 0 either way: the shutdown was asked for.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("mistral7b.server")

FLUSH_S = 2.0  # after ending the requests left, time for their error events to reach the clients
DRAINING = "The server is shutting down: it takes no new requests."


class Drain:
    """A graceful shutdown: `begin` it, then ask `finished(open_requests)` until it says True."""

    def __init__(self, end_open: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        """`end_open(message)` fails every request open in the engine (the driver's `fail_open`)."""
        self.end_open, self.clock = end_open, clock
        self.deadline: float | None = None
        self.ended_at: float | None = None  # when the requests left were ended

    @property
    def active(self) -> bool:
        return self.deadline is not None

    def problem(self) -> str | None:
        """Why new requests are refused (503), or None."""
        return DRAINING if self.active else None

    def begin(self, timeout: float) -> None:
        if self.deadline is None:
            self.deadline = self.clock() + timeout

    def expire(self) -> None:
        """End the requests left now (a second signal)."""
        if self.deadline is not None:
            self.deadline = min(self.deadline, self.clock())

    def finished(self, open_requests: int) -> bool:
        """True once nothing is open, or once the requests left were ended and had FLUSH_S to say so."""
        if open_requests == 0:
            return True
        now = self.clock()
        if self.ended_at is None and now >= self.deadline:
            self.ended_at = now
            log.warning("shutdown: ending the %d requests still open", open_requests)
            if self.end_open is not None:
                self.end_open("The server is shutting down: this request did not finish in time.")
        return self.ended_at is not None and now - self.ended_at >= FLUSH_S
