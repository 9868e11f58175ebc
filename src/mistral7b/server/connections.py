"""Connection hardening under uvicorn: header and body timeouts, caps on open connections (in all and
per client address), rate-limited logging of accept errors, and the graceful shutdown's signals.

uvicorn arms its keep-alive timer only after a response, so a client that connects and never finishes
its headers, or sends headers and then stalls in the body, holds a file descriptor (and a connection
slot) forever; enough of them lock everyone else out, then exhaust the process's descriptors. asyncio
then logs a traceback for every failed `accept()`, and its accept loop goes on to `backlog` (2048)
attempts per tick after the first EMFILE: tens of thousands of tracebacks a second. Hence:

- `guarded_protocol`: uvicorn's HTTP protocol, plus a deadline for complete request headers (from
  the connection, or from the end of the previous response) and one for the body once the headers
  are in (a canned 408, then close); a cap per client address and one on all open connections. At
  the global cap the connection that has waited longest on its client makes room; if none is
  waiting, the new connection gets a canned 503 and is closed.
- `RateLimitedLog` and `GuardedServer`: the loop's exception handler turns accept errors (EMFILE and
  kin) into at most one log line per interval, with the count of those suppressed; SIGTERM and
  SIGINT start a drain (`shutdown.Drain`) instead of uvicorn's five-second cut.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from typing import Callable

import uvicorn

from .settings import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_CLIENT, DEFAULT_SHUTDOWN_TIMEOUT
from .shutdown import Drain

log = logging.getLogger("mistral7b.server")

ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
LINGER_S = 1.0  # a refused client's time to read its 503 before the socket is closed


def canned_response(status: str, message: str, type: str, code: str, retry: bool = False) -> bytes:
    """A whole HTTP/1.1 error response in OpenAI's shape that closes the connection, written straight to
    the transport (below the app: the app never sees these connections, or no longer does)."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    headers = ["content-type: application/json", f"content-length: {len(body)}", "connection: close"]
    if retry:
        headers.append("retry-after: 1")
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode() + body


REFUSED = canned_response("503 Service Unavailable", "too many open connections; retry later", "server_error",
                          "too_many_connections", retry=True)
REFUSED_CLIENT = canned_response("503 Service Unavailable", "too many open connections from your address; retry "
                                 "later", "server_error", "too_many_client_connections", retry=True)


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
    """Mixed into uvicorn's HTTP protocol by `guarded_protocol`, which sets the class attributes: a cap on
    connections (in all, and per client address), and deadlines for a request's headers and its body."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    max_per_client: int
    per_client: dict  # open connections by client address
    waiting: dict  # connections waiting on their client (for a request's headers or its body), oldest first
    refusals: RateLimitedLog
    timeouts: RateLimitedLog
    refusing: set  # refused connections still lingering (each holds a descriptor)

    def connection_made(self, transport) -> None:
        self._header_timer = self._body_timer = self._seen_cycle = None
        peer = transport.get_extra_info("peername")
        self._address = peer[0] if isinstance(peer, tuple) else peer
        if self._over_client_cap():
            self._address = None
            return self._refuse(transport, REFUSED_CLIENT, "%s has %d open, the limit (--max-connections-per-client) "
                                "is %d", peer, self.max_per_client, self.max_per_client)
        if len(self.server_state.connections) >= self.max_connections and not self._evict_oldest_waiting():
            self._address = None
            return self._refuse(transport, REFUSED, "%d open, the limit (--max-connections) is %d",
                                len(self.server_state.connections), self.max_connections)
        self._refused = False
        self.per_client[self._address] = self.per_client.get(self._address, 0) + 1
        super().connection_made(transport)
        self._await_headers()

    def _over_client_cap(self) -> bool:
        # A per-client cap at the global one or above is no cap of its own: the global one speaks.
        cap = self.max_per_client
        return cap < self.max_connections and self.per_client.get(self._address, 0) >= cap

    def _evict_oldest_waiting(self) -> bool:
        """At the cap, make room by closing the connection that has waited longest on its client (a 408 if
        it was sending a body): slow clients, from however many addresses, lose their slots before a new
        client is refused. False if every connection is busy with a request."""
        victim = next(iter(self.waiting), None)
        if victim is None:
            return False
        self.timeouts.warning("at the connection limit (--max-connections %d): closing the connections that "
                              "waited longest for their clients", self.max_connections)
        victim._close_waiting()
        return True

    def _refuse(self, transport, response: bytes, why: str, *args) -> None:
        self._refused, self.transport = True, transport
        self.refusals.warning("refusing connections: " + why, *args)
        if len(self.refusing) >= self.max_connections:  # a flood: do not hold descriptors for it
            return transport.abort()
        self.refusing.add(self)
        transport.write(response)
        transport.write_eof()  # keep reading (and dropping) so that closing sends FIN, not RST
        self._header_timer = self.loop.call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._check_request()

    def eof_received(self):
        return None if self._refused else super().eof_received()  # None: asyncio closes the transport

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        if self._refused:
            self.refusing.discard(self)
            return
        left = self.per_client.pop(self._address, 1) - 1
        if left:
            self.per_client[self._address] = left
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._cancel_body_timer()
        super().on_response_complete()  # may start a pipelined request
        if not self.transport.is_closing():
            self._check_request()

    def _check_request(self) -> None:
        """Headers in: stop their clock and start the body's; body in: stop its clock; response sent and
        waiting for the next request: start the headers' clock."""
        cycle = self.cycle
        if cycle is not self._seen_cycle:
            self._seen_cycle = cycle
            self._cancel_timers()
            if cycle is not None and cycle.more_body:
                self._body_timer = self.loop.call_later(self.body_timeout, self._body_timeout, cycle)
                self.waiting[self] = None
        elif cycle is not None and not cycle.more_body:
            self._cancel_body_timer()
        if cycle is not None and cycle.response_complete and self._header_timer is None:
            self._await_headers()

    def _await_headers(self) -> None:
        self._cancel_timers()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)
        self.waiting[self] = None

    def _cancel_timers(self) -> None:
        self._cancel_body_timer()
        self.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        self.waiting.pop(self, None)
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.timeouts.warning("closed a connection that sent no complete request headers in %g s",
                                  self.header_timeout)
            self._close_waiting()

    def _body_timeout(self, cycle) -> None:
        self._body_timer = None
        if self.transport.is_closing() or cycle is not self.cycle or not cycle.more_body:
            return
        self.timeouts.warning("closed a connection whose request body did not arrive in %g s (--body-timeout)",
                              self.body_timeout)
        self._close_waiting()

    def _close_waiting(self) -> None:
        """Close a connection waiting on its client; one in the middle of a request body gets a 408 first
        (the app reading that body sees a disconnect)."""
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_complete and not cycle.response_started:
            self.transport.write(canned_response("408 Request Timeout", "the request body did not arrive in time "
                                                 f"(the limit is {self.body_timeout:g} s)", "invalid_request_error",
                                                 "request_timeout"))
        self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                     max_per_client: int | None = None) -> type:
    """uvicorn's HTTP protocol (h11, or httptools where installed) with `ConnectionGuard`, for one server.
    `max_per_client` None: DEFAULT_MAX_CONNECTIONS_PER_CLIENT; at `max_connections` or more, no cap of its own."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    per_client = max_per_client or DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    limits = {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections,
              "max_per_client": per_client, "per_client": {}, "waiting": {}, "refusing": set(),
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
    """uvicorn's server with `accept_error_handler` installed on its event loop, and a graceful
    shutdown (`shutdown.Drain`) on SIGTERM and SIGINT in place of uvicorn's."""

    def __init__(self, config: uvicorn.Config, notices: RateLimitedLog | None = None, drain: Drain | None = None,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT):
        super().__init__(config)
        self.notices = notices or RateLimitedLog(log)
        self.drain, self.shutdown_timeout = drain or Drain(), shutdown_timeout

    def handle_exit(self, sig: int, frame) -> None:
        """First signal: drain; second: end the requests left now; third: stop at once. Unlike uvicorn,
        the signal is not raised again after the server stops, so a drained server exits with status 0."""
        drain = self.drain
        if not drain.active:
            log.warning("shutting down: no new requests; %d open get up to %g s to finish (signal again to end "
                        "them now)", len(self.server_state.tasks), self.shutdown_timeout)
            drain.begin(self.shutdown_timeout)
        elif drain.ended_at is None:
            drain.expire()
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain.active and not self.should_exit:
            self.should_exit = self.drain.finished(len(self.server_state.tasks))
        return await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(accept_error_handler(self.notices, loop.get_exception_handler()))
        await super().startup(sockets)


def guarded_config(app, header_timeout: float, max_connections: int, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                   max_per_client: int | None = None, **kwargs) -> uvicorn.Config:
    """A uvicorn config serving `app` through `guarded_protocol`."""
    http = guarded_protocol(header_timeout, max_connections, body_timeout, max_per_client)
    return uvicorn.Config(app, http=http, **kwargs)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` (not yet listening: uvicorn listens on it), so that a port in use is
    an OSError here, before the model loads, rather than a failure inside uvicorn after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not block a restart
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
