"""Server defaults that the command line shares; importing this needs no web framework."""

from __future__ import annotations

import os

API_KEY_ENV = "MISTRAL7B_API_KEY"
DEFAULT_MAX_QUEUE = 256  # requests waiting before the server answers 429
DEFAULT_MAX_BODY_BYTES = 1 << 20
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else $MISTRAL7B_API_KEY, else None (no auth); an empty string counts as none."""
    return api_key or os.environ.get(API_KEY_ENV) or None
