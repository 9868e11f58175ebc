"""Connection hardening (server/connections.py), with real sockets against a live uvicorn thread: the
header-read timeout, the connection cap, and rate-limited accept errors (a real EMFILE in a child).

The app is a minimal ASGI app: the guards sit below it, in the HTTP protocol and the event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import selectors
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")

from mistral7b.server import ServerThread  # noqa: E402
from mistral7b.server.connections import RateLimitedLog, accept_error_handler  # noqa: E402

PARTIAL = b"GET /ok HTTP/1.1\r\nHost: test\r\nX-Slow: "  # headers never finished


async def tiny_app(scope, receive, send):
    """200 "ok"; /slow answers after 1 s (longer than the header timeouts used here); /hold never
    answers, holding its connection busy until the client goes away."""
    if scope["type"] == "lifespan":
        for phase in ("startup", "shutdown"):
            await receive()
            await send({"type": f"lifespan.{phase}.complete"})
        return
    if scope["path"] == "/hold":
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _open(server, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    if first:
        sock.sendall(first)
    return sock


def _closed_after(sock: socket.socket, limit: float = 10.0) -> float:
    """Seconds until the server closes `sock` (EOF or reset), reading whatever it sends before that."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _no_tracebacks(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


def _close_times(socks, limit: float, drip: socket.socket) -> dict:
    """When (time.monotonic()) the server closes each socket, sending `drip` a byte every 0.1 s meanwhile."""
    start, times = time.monotonic(), {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(times) < len(socks) and time.monotonic() - start < limit:
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    times[key.fileobj] = time.monotonic()
                    selector.unregister(key.fileobj)
            if drip not in times:
                drip.sendall(b"E")
    return times


def test_incomplete_headers_are_closed_while_requests_succeed(caplog):
    timeout = 0.5
    with ServerThread(tiny_app, header_timeout=timeout) as server, httpx.Client(base_url=server.url) as client:
        first = time.monotonic()
        kept_alive = _open(server, b"GET /ok HTTP/1.1\r\nHost: test\r\n\r\n")
        assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
        kept_alive.sendall(PARTIAL)  # the next request on the same connection stalls
        socks = [_open(server), *(_open(server, PARTIAL) for _ in range(8)), kept_alive]
        drip = _open(server, b"G")  # a byte every 0.1 s: the deadline does not move
        last = time.monotonic()
        assert client.get("/ok").text == "ok"
        with ThreadPoolExecutor(1) as pool:
            # Complete headers stop the clock: a request slower than the timeout still gets its answer.
            slow = pool.submit(client.get, "/slow")
            times = _close_times([*socks, drip], timeout + 5, drip)
            assert slow.result().text == "ok"
        assert len(times) == len(socks) + 1, "some connections were never closed"
        assert all(first + timeout - 0.05 < t < last + timeout + 3 for t in times.values()), \
            sorted(t - first for t in times.values())
        for sock in [*socks, drip]:
            sock.close()
        _wait_for(lambda: len(server.server.server_state.connections) <= 1)  # the client's keep-alive one
        assert client.get("/ok").text == "ok"
    _no_tracebacks(caplog)


def test_connections_over_the_limit_get_503_and_serving_goes_on(caplog):
    """Every connection busy with a request: new ones get a 503. (Those waiting on their client would
    make room instead: test_server_timeouts.)"""
    limit = 4
    with ServerThread(tiny_app, max_connections=limit, header_timeout=60) as server:
        connections = server.server.server_state.connections
        holders = [_open(server, b"GET /hold HTTP/1.1\r\nHost: test\r\n\r\n") for _ in range(limit)]
        _wait_for(lambda: len(connections) == limit)
        with httpx.Client(base_url=server.url) as client:
            refused = client.get("/ok")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
        flood = [_open(server, b"GET /ok HTTP/1.1\r\nHost: test\r\n\r\n") for _ in range(3 * limit)]
        for sock in flood:  # each gets a 503 or, past the lingering ones, an immediate close; none hangs
            sock.settimeout(5)
            try:
                head = sock.recv(4096)
            except ConnectionResetError:
                head = b""
            assert head == b"" or head.startswith(b"HTTP/1.1 503 ")
            assert _closed_after(sock, 5) < 5
            sock.close()
        assert len(connections) == limit
        for sock in holders:
            sock.close()
        _wait_for(lambda: not connections)
        with httpx.Client(base_url=server.url) as client:
            assert [client.get("/ok").status_code for _ in range(3)] == [200] * 3
    _no_tracebacks(caplog)
    refusals = [r for r in caplog.records if "refusing connections" in r.getMessage()]
    assert 1 <= len(refusals) <= 2  # one line per 10 s, not one per refused connection


def test_rate_limited_log_counts_what_it_suppressed(caplog):
    now = [100.0]
    notices = RateLimitedLog(logging.getLogger("test.ratelimit"), interval=10.0, clock=lambda: now[0])
    burst = 1000
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        logged = []
        for i in range(burst):
            now[0] = 100.0 + i * 0.005  # 5 s of calls
            logged.append(notices.warning("cannot accept connections: %s", "Too many open files"))
        assert sum(logged) == 1 and logged[0]
        now[0] = 110.0
        assert notices.warning("cannot accept connections: %s", "Too many open files")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["cannot accept connections: Too many open files",
                     f"cannot accept connections: Too many open files ({burst - 1} more suppressed in the last 10 s)"]


def test_accept_error_handler_filters_only_accept_errors(caplog):
    seen = []
    notices = RateLimitedLog(logging.getLogger("test.accept"), interval=60.0)
    handle = accept_error_handler(notices, fallback=lambda loop, context: seen.append(context))
    with caplog.at_level(logging.WARNING, logger="test.accept"):
        for code in [errno.EMFILE] * 2048 + [errno.ENFILE] * 10:  # what asyncio's accept loop sends per tick
            handle(None, {"message": "socket.accept() out of system resource",
                          "exception": OSError(code, os.strerror(code))})
        other = {"message": "something else", "exception": ValueError("x")}
        handle(None, other)

        def _start_serving():  # asyncio's accept retry, fired after the server closed its socket
            pass

        loop = asyncio.new_event_loop()
        late = asyncio.TimerHandle(0.0, _start_serving, (), loop)
        loop.close()
        handle(None, {"message": "Exception in callback", "exception": ValueError("Invalid file descriptor: -1"),
                      "handle": late})
    assert [r.getMessage() for r in caplog.records] == ["cannot accept connections: Too many open files"]
    assert not caplog.records[0].exc_info
    assert seen == [other]


EMFILE_SERVER = textwrap.dedent("""
    import asyncio, logging, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from test_server_connections import tiny_app
    from mistral7b.server import ServerThread

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with ServerThread(tiny_app, header_timeout=60) as server:
        open_fds = len(__import__("os").listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print(server.port, flush=True)  # only now: clients accepted before the limit would not exhaust it
        sys.stdin.readline()  # until the test has watched the accept errors
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_descriptor_exhaustion_logs_one_line_without_tracebacks(tmp_path):
    """A real EMFILE: the server process runs out of descriptors while clients keep connecting."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER, os.path.dirname(__file__)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        time.sleep(2.5)  # asyncio retries accept() every second
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, log_text = proc.communicate(timeout=30)
    finally:
        proc.kill()
    for sock in clients:
        sock.close()
    lines = log_text.splitlines()
    assert "Traceback" not in log_text, log_text[:2000]
    assert sum("cannot accept connections: Too many open files" in line for line in lines) == 1, log_text[:2000]
    assert len(lines) < 10, log_text[:2000]


@pytest.mark.parametrize("args", [["--max-connections", "0"], ["--header-timeout", "0"], ["--header-timeout", "inf"],
                                  ["--header-timeout", "x"], ["--body-timeout", "0"], ["--keep-alive-timeout", "-1"],
                                  ["--max-connections-per-client", "0"], ["--shutdown-timeout", "-1"],
                                  ["--shutdown-timeout", "nan"]])
def test_bad_connection_flags_are_usage_errors(args, capsys):
    from mistral7b import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and args[0] in err.splitlines()[-1] and "Traceback" not in err


def test_serve_passes_the_connection_flags(monkeypatch):
    """`mistral7b serve` hands the connection and shutdown flags to `serve`, with the socket it bound
    before loading the model (model loading stubbed)."""
    from mistral7b import cli
    from mistral7b.cli import serve as serve_command
    from mistral7b.server import app

    seen, flags = {}, ("max_connections", "header_timeout", "body_timeout", "keep_alive_timeout",
                       "max_connections_per_client", "shutdown_timeout")
    monkeypatch.setattr(serve_command, "local_client", lambda args, config: "in-process client")
    monkeypatch.setattr(serve_command, "remote_client", lambda args, config: seen.update(bound=seen["sock"]) or "remote")
    monkeypatch.setattr(serve_command, "listen_socket", lambda host, port: seen.update(sock=(host, port)) or "sock")
    monkeypatch.setattr(app, "serve", lambda client, **kwargs: seen.update(kwargs, client=client))
    assert cli.main(["serve", "--max-connections", "7", "--header-timeout", "2.5", "--body-timeout", "4",
                     "--keep-alive-timeout", "3", "--max-connections-per-client", "5", "--shutdown-timeout", "0",
                     "--no-prefix-cache", "--port", "9"]) == 0
    assert [seen[k] for k in ("client", "sock", *flags)] == ["remote", "sock", 7, 2.5, 4.0, 3.0, 5, 0.0]
    assert seen["bound"] == ("127.0.0.1", 9)  # bound before the engine process started
    cli.main(["serve", "--no-prefix-cache", "--engine-in-process"])
    assert [seen[k] for k in ("client", *flags)] == ["in-process client", 1024, 10.0, 30.0, 5.0, 256, 30.0]


def test_port_in_use_is_one_line_and_exit_1_before_the_model_loads():
    """A missing model would fail the load: the port's error comes first, without a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run([sys.executable, "-m", "mistral7b.cli", "serve", "--port", str(port), "--model",
                               "/nonexistent/model"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert done.stderr == f"mistral7b: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


FIT = textwrap.dedent("""
    import importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("settings", sys.argv[4])  # alone: no torch to import
    settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
    print(settings.fit_max_connections(int(sys.argv[3])), resource.getrlimit(resource.RLIMIT_NOFILE)[0],
          settings.RESERVED_FDS)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptor limits")
@pytest.mark.parametrize("soft, hard, wanted", [(256, 256, 1024), (256, 4096, 1024), (256, 4096, 8000), (256, 512, 10)])
def test_max_connections_fits_the_descriptor_limit(soft, hard, wanted):
    """The soft limit is raised to the hard one; the cap leaves RESERVED_FDS descriptors free."""
    from mistral7b.server import settings

    out = subprocess.run([sys.executable, "-c", FIT, str(soft), str(hard), str(wanted), settings.__file__],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    fitted, new_soft, reserved = map(int, out)
    assert new_soft == hard
    assert fitted == min(wanted, hard - reserved)
