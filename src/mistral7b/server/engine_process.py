"""The engine process (vLLM's EngineCore): loads the model itself, then schedules and runs it for the HTTP
process at the other end of a `multiprocessing` connection (`engine_client` starts it, spawned: CUDA
cannot fork, and a model cannot be sent).

It keeps what needs the model or the device: scheduling, sampling, logprobs and grammar state. It
sends token ids back, one message per step (`wire`); the HTTP process detokenises them and applies
stop strings. When the HTTP process goes away (the connection's EOF) it exits; it ignores SIGINT and
SIGTERM, which the HTTP process handles by draining its requests before it stops this one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

log = logging.getLogger("mistral7b.engine_process")


@dataclass
class EngineLoad:
    """What the engine process loads: `LLM`'s arguments, as JSON-friendly values."""

    source: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: dict | bool | None = None  # QuantConfig's fields, False (--quantize none) or None
    engine: dict = field(default_factory=dict)  # EngineConfig's fields
    # Instead of LLM: "module:function", called with `factory_args`, giving an object with `.engine`
    # (benchmarks/serve_load.py builds random-weight presets so). The module must be on sys.path.
    factory: str | None = None
    factory_args: dict = field(default_factory=dict)
    tensor_parallel_size: int = 1  # the engine process then starts the other ranks itself

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "EngineLoad":
        return cls(**json.loads(text))

    def load(self):
        if self.factory is not None:
            import importlib

            module, _, name = self.factory.partition(":")
            return getattr(importlib.import_module(module), name)(**self.factory_args)
        from ..engine import EngineConfig
        from ..llm import LLM
        from ..quant import QuantConfig

        quantize = QuantConfig(**self.quantize) if isinstance(self.quantize, dict) else self.quantize
        return LLM(self.source, device=self.device, dtype=self.dtype, engine_config=EngineConfig.from_dict(self.engine),
                   quantize=quantize, tensor_parallel_size=self.tensor_parallel_size)


def main(conn, load_json: str) -> None:
    """The process's entry point (spawned by `EngineProcessClient.start`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: engine process: %(message)s", stream=sys.stderr)
    # Ctrl-C reaches the whole process group, and systemd sends SIGTERM to the whole cgroup: the HTTP
    # process drains its requests first, so this one ignores both and stops when told to (or at the EOF
    # of the connection, if the HTTP process is gone).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from ..engine.config import ModelInfo
    from . import wire
    from .settings import WARMUP_NOTICE

    llm = None
    try:
        llm = EngineLoad.from_json(load_json).load()
        engine = llm.engine
        engine.output.detokenize = False  # the HTTP process does it
        if engine.compiled:
            log.warning(WARMUP_NOTICE)
            engine.warmup()
    except Exception as e:
        log.exception("the engine could not start")
        conn.send_bytes(wire.encode({"op": "fatal", "message": f"{type(e).__name__}: {e}"}))
        if llm is not None:  # loaded, then warm-up failed: stop a tensor-parallel model's ranks before exiting
            llm.close()
        sys.exit(1)
    conn.send_bytes(wire.encode({"op": "ready", "pid": os.getpid(), "info": dataclasses.asdict(ModelInfo.of(engine))}))
    try:
        EngineLoop(engine, conn).run()
    except (EOFError, OSError):  # the HTTP process is gone
        pass
    finally:  # before multiprocessing's exit, which would wait forever on a tensor-parallel model's ranks
        llm.close()


class EngineLoop:
    """Read requests and aborts, step, send each step's outputs; block on the connection while idle."""

    def __init__(self, engine, conn):
        from . import wire

        self.engine, self.conn, self.wire = engine, conn, wire
        self.requests: dict = {}  # id -> the engine's Request, until it finishes
        self.steps = self.aborted = 0

    def run(self) -> None:
        while True:
            changed = self._read(block=not self.engine.has_work())
            if self.engine.has_work():
                self._step()
            elif changed:
                self._send([])  # aborts only: the counters changed

    def _read(self, block: bool) -> bool:
        """Apply every message waiting (after waiting for one, if `block`); raise EOFError at the end."""
        changed, timeout = False, None if block else 0
        while self.conn.poll(timeout):
            self._handle(self.wire.decode(self.conn.recv_bytes()))
            changed, timeout = True, 0
        return changed

    def _handle(self, message: dict) -> None:
        op = message["op"]
        if op == "add":
            rid = message["id"]
            try:
                params = self.wire.params_of(message["params"])
                self.requests[rid] = self.engine.add(message["prompt"], params, rid, lora=message.get("lora"))
            except Exception as e:  # validated by the HTTP side already: this is unexpected
                self._send_failed([rid], f"the engine rejected the request: {type(e).__name__}: {e}")
        elif op == "abort":
            for rid in message["ids"]:
                request = self.requests.pop(rid, None)
                if request is not None and not request.finished:
                    self.engine.abort(request)
                    self.aborted += request.finish_reason == "abort"
        elif op in ("load_lora", "unload_lora"):
            self._adapter_call(message)
        elif op == "stop":
            raise SystemExit(0)
        else:
            raise ValueError(f"unknown message {op!r}")

    def _adapter_call(self, message: dict) -> None:
        """Load or unload an adapter (between steps: a load writes only a slot no row reads) and answer
        with the error, if any, as the HTTP side re-raises it (`remote_adapters`)."""
        error = kind = None
        try:
            if message["op"] == "load_lora":
                self.engine.load_lora(message["name"], message["path"])
            else:
                self.engine.unload_lora(message["name"])
        except LookupError as e:
            error, kind = str(e), "lookup"
        except (ValueError, OSError) as e:
            error, kind = str(e), "value"
        answer = {"op": "lora", "call": message["call"], "error": error, "kind": kind,
                  "names": self.engine.adapters.names()}
        self.conn.send_bytes(self.wire.encode(answer))

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as e:  # the model failed: drop every request in flight, keep serving
            log.exception("engine step failed")
            ids = list(self.requests)
            for request in self.requests.values():
                self.engine.abort(request)
            self.requests.clear()
            self._send_failed(ids, f"the engine failed: {type(e).__name__}")
            return
        self.steps += 1
        self._send(self._outputs(deltas))

    def _outputs(self, deltas) -> list:
        """One entry per request of the step: its tokens in order, the last delta's finish reason."""
        by_request: dict = {}
        for d in deltas:
            by_request.setdefault(d.request.id, (d.request, []))[1].append(d)
        outputs = []
        for rid, (request, ds) in by_request.items():
            tokens = [t for d in ds for t in d.token_ids]
            start = len(request.output_ids) - len(tokens)  # logprobs, if asked for, align with output_ids
            logprobs = None if request.logprobs is None else request.logprobs[start : start + len(tokens)]
            accepting = [d.accepting for d in ds]
            outputs.append(self.wire.output(request, tokens, ds[-1].finish_reason, logprobs, start == 0, accepting))
            if request.finished:
                self.requests.pop(rid, None)
        return outputs

    def _send(self, outputs: list) -> None:
        prefix = self.engine.prefix
        speculator = self.engine.speculator
        stats = {"steps": self.steps, "aborted": self.aborted, "prefix": prefix.metrics() if prefix else None,
                 "spec": dataclasses.asdict(speculator.stats) if speculator is not None else None}
        self.conn.send_bytes(self.wire.encode({"op": "step", "out": outputs, "stats": stats}))

    def _send_failed(self, ids: list[str], message: str) -> None:
        self.conn.send_bytes(self.wire.encode({"op": "failed", "ids": ids, "message": message}))
