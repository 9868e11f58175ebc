"""Connection hardening under uvicorn: a header-read timeout, a cap on open connections, and
rate-limited logging of accept errors.

uvicorn arms its keep-alive timer only after a response, so a client that connects and never finishes
its headers holds a file descriptor forever; enough of them exhaust the process's descriptors. asyncio
then logs a traceback for every failed `accept()`, and its accept loop goes on to `backlog` (2048)
attempts per tick after the first EMFILE: tens of thousands of tracebacks a second. Hence:

- `guarded_protocol`: uvicorn's HTTP protocol, plus a deadline for complete request headers (from
  the connection, or from the end of the previous response) and a cap on open connections; a
  connection over the cap gets a canned 503 and is closed.
- `RateLimitedLog` and `GuardedServer`: the loop's exception handler turns accept errors (EMFILE and
  kin) into at most one log line per interval, with the count of those suppressed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from typing import Callable

import uvicorn

log = logging.getLogger("mistral7b.server")

ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
LINGER_S = 1.0  # a refused client's time to read its 503 before the socket is closed
_REFUSED_BODY = json.dumps({"error": {"message": "too many open connections; retry later", "type": "server_error",
                                      "param": None, "code": "too_many_connections"}}).encode()
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
           b"connection: close\r\nretry-after: 1\r\n\r\n" % len(_REFUSED_BODY)) + _REFUSED_BODY


class RateLimitedLog:
    """At most one line per `interval` seconds; the next line that passes carries the count of those
    suppressed in between."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self.clock = logger, interval, clock
        self.last: float | None = None
        self.suppressed = 0

    def warning(self, message: str, *args) -> bool:
        """Log `message % args` unless a line went out less than `interval` ago; True if logged."""
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += f" ({self.suppressed} more suppressed in the last {now - self.last:.0f} s)"
        self.logger.warning(message, *args)
        self.last, self.suppressed = now, 0
        return True


class ConnectionGuard:
    """Mixed into uvicorn's HTTP protocol by `guarded_protocol`, which sets the class attributes."""

    header_timeout: float
    max_connections: int
    refusals: RateLimitedLog
    timeouts: RateLimitedLog
    refusing: set  # refused connections still lingering (each holds a descriptor)

    def connection_made(self, transport) -> None:
        self._header_timer = self._seen_cycle = None
        self._refused = len(self.server_state.connections) >= self.max_connections
        if self._refused:
            return self._refuse(transport)
        super().connection_made(transport)
        self._await_headers()

    def _refuse(self, transport) -> None:
        self.transport = transport
        self.refusals.warning("refusing connections: %d open, the limit (--max-connections) is %d",
                              len(self.server_state.connections), self.max_connections)
        if len(self.refusing) >= self.max_connections:  # a flood: do not hold descriptors for it
            return transport.abort()
        self.refusing.add(self)
        transport.write(REFUSED)
        transport.write_eof()  # keep reading (and dropping) so that closing sends FIN, not RST
        self._header_timer = self.loop.call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._check_headers()

    def eof_received(self):
        return None if self._refused else super().eof_received()  # None: asyncio closes the transport

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        if self._refused:
            self.refusing.discard(self)
            return
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if not self.transport.is_closing():
            self._check_headers()

    def _check_headers(self) -> None:
        """Stop the clock once a new request's headers are in; start it when waiting for more."""
        if self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle
            self._cancel_header_timer()
        if self.cycle is not None and self.cycle.response_complete and self._header_timer is None:
            self._await_headers()

    def _await_headers(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.timeouts.warning("closed a connection that sent no complete request headers in %g s",
                                  self.header_timeout)
            self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol (h11, or httptools where installed) with `ConnectionGuard`, for one server."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = {"header_timeout": header_timeout, "max_connections": max_connections, "refusing": set(),
              "refusals": RateLimitedLog(log), "timeouts": RateLimitedLog(log)}
    return type("GuardedProtocol", (ConnectionGuard, AutoHTTPProtocol), limits)


def accept_error_handler(notices: RateLimitedLog, fallback: Callable | None = None) -> Callable:
    """A loop exception handler: accept errors become rate-limited one-line warnings without a
    traceback; anything else goes to `fallback` (or the loop's default handler)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS:
            notices.warning("cannot accept connections: %s", exc.strerror or exc)
        elif _is_late_accept_retry(context):
            log.debug("accept() retried after the listening socket closed: %s", exc)
        elif fallback is not None:
            fallback(loop, context)
        else:
            loop.default_exception_handler(context)

    return handle


def _is_late_accept_retry(context: dict) -> bool:
    """asyncio re-arms accept() a second after EMFILE; if the server shut down meanwhile, the retry
    fails on the closed socket (fd -1) with a ValueError that means nothing to anyone."""
    callback = getattr(context.get("handle"), "_callback", None)
    return isinstance(context.get("exception"), ValueError) and getattr(callback, "__name__", "") == "_start_serving"


class GuardedServer(uvicorn.Server):
    """uvicorn's server with `accept_error_handler` installed on its event loop."""

    def __init__(self, config: uvicorn.Config, notices: RateLimitedLog | None = None):
        super().__init__(config)
        self.notices = notices or RateLimitedLog(log)

    async def startup(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(accept_error_handler(self.notices, loop.get_exception_handler()))
        await super().startup(sockets)


def guarded_config(app, header_timeout: float, max_connections: int, **kwargs) -> uvicorn.Config:
    """A uvicorn config serving `app` through `guarded_protocol`."""
    return uvicorn.Config(app, http=guarded_protocol(header_timeout, max_connections), **kwargs)
