"""Body and idle timeouts and the per-client connection cap (server/connections.py), with real sockets
against a live uvicorn thread serving a small FastAPI app (a JSON body parsed by pydantic, as the
generation routes do). Clients that must look like other hosts bind 127.0.0.x source addresses."""

from __future__ import annotations

import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")

from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from test_server_connections import _closed_after, _no_tracebacks, _wait_for  # noqa: E402

from mistral7b.server import ServerThread  # noqa: E402


class Echo(BaseModel):
    text: str


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/echo")
    async def echo(body: Echo):
        return {"length": len(body.text)}

    return app


BODY = b'{"text": "' + b"x" * 80 + b'"}'


def _head(length: int = len(BODY), path: str = "/echo") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _connect(server, source: str = "127.0.0.1", first: bytes = b"") -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10, source_address=(source, 0))
    if first:
        sock.sendall(first)
    return sock


def _read_all(sock: socket.socket, limit: float = 10.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length bytes of body) from a kept-alive connection."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def _answers(socks, wait: float) -> list[bytes]:
    """What the server sent (up to 200 bytes each) on those of `socks` it answered within `wait` seconds."""
    answers = []
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                answers.append(_read_all(key.fileobj, 5)[:200])
                selector.unregister(key.fileobj)
    return answers


def test_stalled_body_gets_408_and_close_while_slow_but_complete_bodies_succeed(caplog):
    timeout = 0.6
    with ServerThread(echo_app(), body_timeout=timeout, header_timeout=30) as server:
        stalled = _connect(server, first=_head() + BODY[:20])  # headers in, the body never completes
        start = time.monotonic()
        slow = _connect(server, first=_head() + BODY[:20])  # completes within the timeout, in pieces
        for i in range(20, len(BODY), 20):
            time.sleep(timeout / 10)
            slow.sendall(BODY[i : i + 20])
        answer = _response(slow)
        assert answer.startswith(b"HTTP/1.1 200") and b'{"length":80}' in answer
        response = _read_all(stalled)
        took = time.monotonic() - start
        assert response.startswith(b"HTTP/1.1 408 Request Timeout"), response[:200]
        assert b'"code": "request_timeout"' in response and b"connection: close" in response.lower()
        assert timeout - 0.1 < took < timeout + 2, took
        # The slow one's connection outlived the stalled one's deadline: a body's clock stops when it ends.
        slow.sendall(_head() + BODY)
        assert _response(slow).startswith(b"HTTP/1.1 200")
        for sock in (stalled, slow):
            sock.close()
    _no_tracebacks(caplog)


def test_idle_keep_alive_connections_close():
    with ServerThread(echo_app(), timeout_keep_alive=0.4, header_timeout=30) as server:
        sock = _connect(server, first=b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert 0.3 < _closed_after(sock, 5) < 3
        sock.close()


def test_connections_per_client_are_capped_and_other_clients_are_served(caplog):
    cap = 3
    with ServerThread(echo_app(), max_per_client=cap, header_timeout=30) as server:
        connections = server.server.server_state.connections
        held = [_connect(server, "127.0.0.2", b"GET /health HTTP/1.1\r\n") for _ in range(cap)]
        _wait_for(lambda: len(connections) == cap)
        over = _connect(server, "127.0.0.2", b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        refused = _read_all(over, 5)
        assert refused.startswith(b"HTTP/1.1 503") and b"too_many_client_connections" in refused
        with httpx.Client(base_url=server.url) as client:  # another address (127.0.0.1) is served
            assert client.get("/health").status_code == 200
        held.pop().close()  # a slot of its own frees up for 127.0.0.2
        _wait_for(lambda: len(connections) == cap - 1)
        again = _connect(server, "127.0.0.2", b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200")
        for sock in (*held, over, again):
            sock.close()
    _no_tracebacks(caplog)


def test_slow_body_flood_does_not_lock_out_health_or_requests(caplog):
    """300 sockets from one address send headers and part of a body, then stall: more than the server's
    250 connections. The per-client cap (200) turns 100 away at once; the body timeout closes the rest
    with a 408. Meanwhile /health and a normal request from another address answer 200 within 1 s."""
    flood_size, cap, timeout = 300, 200, 2.0
    with ServerThread(echo_app(), max_connections=250, max_per_client=cap, body_timeout=timeout,
                      header_timeout=30) as server:
        flood = [_connect(server, "127.0.0.3", _head() + BODY[:10]) for _ in range(flood_size)]
        with httpx.Client(base_url=server.url, timeout=5) as client:
            deadline, latencies = time.monotonic() + timeout + 0.5, []
            while time.monotonic() < deadline:
                for call in (lambda: client.get("/health"), lambda: client.post("/echo", json={"text": "hi"})):
                    start = time.monotonic()
                    assert call().status_code == 200
                    latencies.append(time.monotonic() - start)
                time.sleep(0.05)
        assert max(latencies) < 1.0, max(latencies)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda s: _read_all(s, timeout + 5)[:40], flood))
        codes = sorted({a[9:12] for a in answers})
        assert codes == [b"408", b"503"], codes
        assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) == cap
        for sock in flood:
            sock.close()
        _wait_for(lambda: not server.server.server_state.connections)
    _no_tracebacks(caplog)


def test_at_the_cap_the_longest_waiting_connections_make_room(caplog):
    """A slow-body flood from many addresses, each under the per-client cap, fills every slot: new
    clients still get served, as each new connection closes (408) the one that has waited longest."""
    limit = 60
    with ServerThread(echo_app(), max_connections=limit, max_per_client=limit // 4, header_timeout=30) as server:
        flood = [_connect(server, f"127.0.0.{10 + i % 4}", _head() + BODY[:10]) for i in range(limit)]
        _wait_for(lambda: len(server.server.server_state.connections) == limit)
        # Without eviction the first call would get a 503. The first new connection takes the slot of the
        # flood socket that waited longest; later ones (Connection: close) reuse the slot it leaves.
        with httpx.Client(base_url=server.url, timeout=5, headers={"Connection": "close"}) as client:
            for _ in range(5):
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                assert client.post("/echo", json={"text": "hi"}).json() == {"length": 2}
                assert time.monotonic() - start < 1.0
        answers = _answers(flood, 2.0)
        assert len(answers) == 1 and all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:12] for a in answers]
        for sock in flood:
            sock.close()
    _no_tracebacks(caplog)
