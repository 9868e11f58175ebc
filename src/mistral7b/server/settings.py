"""Server defaults that the command line shares; importing this needs no web framework."""

from __future__ import annotations

import os

API_KEY_ENV = "MISTRAL7B_API_KEY"
DEFAULT_MAX_QUEUE = 256  # requests waiting before the server answers 429
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_CONNECTIONS = 1024  # open connections; more get a 503 (lowered to fit the descriptor limit)
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds for a connection to send complete request headers
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256  # open connections from one client address (one cannot take every slot)
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a request body to arrive once its headers have; then 408
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's default)
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds running requests get to finish after SIGTERM or SIGINT
RESERVED_FDS = 128  # descriptors kept for the model, the log and the engine, outside the connection cap
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# When the engine process dies: open requests fail at once, /health answers 503 for this long (so probes
# and load balancers see it), then `serve` exits with this status (EX_SOFTWARE) for a supervisor to restart.
ENGINE_DEATH_GRACE_S = 2.0
ENGINE_DIED_EXIT = 70
# An engine process that sends nothing for this long while requests are open is taken as hung and killed
# (compiles happen before it reports ready, so a step never legitimately takes minutes).
DEFAULT_ENGINE_STEP_TIMEOUT = 300.0
# Engine.warmup compiles each power-of-two decode width once (tens of seconds each at the 7B shape on a GPU).
WARMUP_NOTICE = "compiling the decode step before serving, once per power-of-two batch width up to max_batch"


def fit_max_connections(max_connections: int) -> int:
    """`max_connections`, lowered to fit the soft descriptor limit after raising that to the hard
    limit (as vLLM does), so that the cap rather than EMFILE turns clients away."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return max_connections
    infinite = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != infinite and (hard == infinite or hard > soft):
        wanted = max_connections + RESERVED_FDS if hard == infinite else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
            soft = max(soft, wanted)
        except (ValueError, OSError):
            pass
    return max_connections if soft == infinite else max(1, min(max_connections, soft - RESERVED_FDS))


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else $MISTRAL7B_API_KEY, else None (no auth); an empty string counts as none."""
    return api_key or os.environ.get(API_KEY_ENV) or None
