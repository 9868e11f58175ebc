"""The LoRA adapters of an engine in its own process, as the HTTP process sees them: what `ServedModels`
asks of an in-process `AdapterRegistry` (names, load, unload), each load or unload a round trip over
the connection (`wire.adapter_call`), answered by the engine process between two steps.

The names are the engine's as of its last answer: only this process loads and unloads, so they are
current whenever no call is under way. A request names its adapter; the engine process looks it up
when the request arrives (one unloaded meanwhile fails that request, as in-process).
"""

from __future__ import annotations

import itertools
import threading

from ..engine.adapters import UnknownAdapter
from .errors import APIError


class RemoteAdapters:
    def __init__(self, send):
        """`send(message)`: queue a message to the engine process."""
        self.send = send
        self._names: dict[str, str] = {}
        self._calls = itertools.count()
        self._waiting: dict[int, list] = {}  # call number -> [its Event, the answer once it came]
        self._dead: str | None = None
        self._lock = threading.Lock()

    def names(self) -> dict[str, str]:
        """name -> path of every adapter loaded."""
        with self._lock:
            return dict(self._names)

    def load(self, name: str, path) -> None:
        """Load the PEFT adapter at `path` (read by the engine process) under `name`; a ValueError as
        the engine's own load raises it."""
        self._call({"op": "load_lora", "name": name, "path": str(path)})

    def unload(self, name: str) -> None:
        self._call({"op": "unload_lora", "name": name})

    def _call(self, message: dict) -> None:
        done = threading.Event()
        with self._lock:
            if self._dead is not None:
                raise APIError(503, self._dead, type="server_error", code="engine_dead")
            call = next(self._calls)
            self._waiting[call] = [done, None]
        self.send({**message, "call": call})
        done.wait()
        with self._lock:
            answer = self._waiting.pop(call)[1]
        if answer is None:  # the engine process died first
            raise APIError(503, self._dead, type="server_error", code="engine_dead")
        if answer["error"] is not None:
            raise (UnknownAdapter if answer["kind"] == "lookup" else ValueError)(answer["error"])

    def answered(self, message: dict) -> None:
        """The engine process's answer to a call (the reader thread hands it over)."""
        with self._lock:
            self._names = dict(message["names"])
            waiting = self._waiting.get(message["call"])
            if waiting is not None:
                waiting[1] = message
                waiting[0].set()

    def died(self, why: str) -> None:
        """The engine process is gone: wake every call waiting (each raises a 503), refuse new ones."""
        with self._lock:
            self._dead = why
            for done, _ in self._waiting.values():
                done.set()
