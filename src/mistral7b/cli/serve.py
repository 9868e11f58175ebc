"""`mistral7b serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse

from ..server.settings import (API_KEY_ENV, DEFAULT_BODY_TIMEOUT, DEFAULT_ENGINE_STEP_TIMEOUT, DEFAULT_HEADER_TIMEOUT,
                               DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                               DEFAULT_MAX_QUEUE, DEFAULT_SHUTDOWN_TIMEOUT, ENGINE_DEATH_GRACE_S, ENGINE_DIED_EXIT)
from .common import (CLIError, add_batch_invariant_option, add_kv_cache_dtype_option, add_compile_option, add_quantize_options,
                     add_speculative_options, device_of, dtype_name, load_llm, model_source, port_number, positive_int,
                     quantize_of, speculative_of)

# A modest default budget: on CUDA 1 GiB holds 2 x 4096 positions of Mistral 7B's KV in bf16 (128 KiB a
# token), i.e. a few long system prompts; on CPU 0.25 GiB is 8k tokens of SmolLM2-135M's fp32 KV (30 KiB a
# token), next to a model of ~0.5 GiB. A miss costs a copy of each block (~370x cheaper than computing it).
DEFAULT_PREFIX_GIB = {"cuda": 1.0, "cpu": 0.25}

NAME = "serve"
HELP = "OpenAI-compatible HTTP server"
DESCRIPTION = f"""Serve the model over HTTP (OpenAI-compatible API).

The engine runs in its own process (it loads the model; the HTTP process tokenises, detokenises and
streams), so the two do not share one interpreter lock. If the engine process dies, every open
request gets an error at once, /health answers 503 for {ENGINE_DEATH_GRACE_S:g} seconds, and the server exits
with status {ENGINE_DIED_EXIT} for a supervisor (systemd, Kubernetes) to restart it; an engine process that sends
nothing for --engine-step-timeout seconds while requests are open is killed, with the same result.
--engine-in-process keeps the engine on a thread of the HTTP process instead.

On SIGTERM or SIGINT the server drains: new requests and /health get a 503, running requests get
--shutdown-timeout seconds to finish, those left then end with an error (streams: an error event and
[DONE]), and the server exits with status 0, stopping the engine process."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None,
                   help=f"require this bearer token (None: the {API_KEY_ENV} environment variable, if set)")
    p.add_argument("--model-name", default=None, help="model name the API reports (None: from the checkpoint)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="sequences decoded together, each with its own preallocated cache row")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                   help="split the model over N processes (GPUs, or gloo on a CPU); N divides the KV heads")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="cache positions per sequence for layers without a sliding window, and so the longest "
                        "prompt + completion (None: the model's context); windowed layers always keep W")
    add_compile_option(p)
    p.add_argument("--prefix-cache-gib", type=non_negative_float, default=None, metavar="GIB",
                   help="memory for prefix caching (prompt blocks reused across requests, exact under the "
                        f"sliding window); default {DEFAULT_PREFIX_GIB['cuda']} on CUDA, "
                        f"{DEFAULT_PREFIX_GIB['cpu']} on CPU")
    p.add_argument("--no-prefix-cache", action="store_true", help="turn prefix caching off")
    p.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting before the server answers 429")
    p.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                   help="open connections; more get a 503 and are closed (lowered to fit the open-file limit)")
    p.add_argument("--header-timeout", type=positive_seconds, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                   help="close a connection that has not sent complete request headers in this time")
    p.add_argument("--max-connections-per-client", type=positive_int, default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                   metavar="N", help="open connections from one client address; more get a 503 (at most "
                                     "--max-connections; behind a proxy every client has the proxy's address)")
    p.add_argument("--body-timeout", type=positive_seconds, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                   help="answer 408 and close a connection whose request body has not arrived in this time")
    p.add_argument("--keep-alive-timeout", type=positive_seconds, default=DEFAULT_KEEP_ALIVE_TIMEOUT,
                   metavar="SECONDS", help="close a keep-alive connection idle for this long")
    p.add_argument("--shutdown-timeout", type=non_negative_seconds, default=DEFAULT_SHUTDOWN_TIMEOUT,
                   metavar="SECONDS", help="on SIGTERM or SIGINT, time running requests get to finish before they "
                                           "end with an error (a second signal ends them at once)")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine on a thread of the HTTP process, not in a process of its own")
    p.add_argument("--engine-step-timeout", type=non_negative_float, default=DEFAULT_ENGINE_STEP_TIMEOUT,
                   metavar="SECONDS", help="kill an engine process that sends nothing for this long while requests "
                                           "are open (then as if it died); 0: never")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level")
    p.add_argument("--lora-modules", nargs="+", type=lora_module, default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapters to load at start, each served as model NAME")
    p.add_argument("--max-loras", type=positive_int, default=4, help="LoRA adapters loaded at once")
    p.add_argument("--max-lora-rank", type=positive_int, default=16, help="the largest LoRA rank that can be loaded")
    add_quantize_options(p)
    add_speculative_options(p)
    add_batch_invariant_option(p)
    add_kv_cache_dtype_option(p)


def lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GiB >= 0, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    return _seconds(text, lambda value: value > 0, "> 0")


def non_negative_seconds(text: str) -> float:
    return _seconds(text, lambda value: value >= 0, ">= 0")


def _seconds(text: str, ok, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (ok(value) and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds {expected}, got {text!r}")
    return value


def load_lora_modules(client, modules: list[tuple[str, str]]) -> None:
    """Load each adapter (in the engine process, if there is one: it answers once the model is loaded)."""
    from ..server.errors import APIError

    for name, path in modules:
        try:
            client.load_lora(name, path)
        except (ValueError, APIError) as e:  # APIError: the engine process died first
            raise CLIError(f"--lora-modules {name}={path}: {e}") from None


def prefix_cache_gib(args) -> float:
    """--no-prefix-cache: 0; --prefix-cache-gib: as given; else the default for the device."""
    if args.no_prefix_cache:
        return 0.0
    if args.prefix_cache_gib is not None:
        return args.prefix_cache_gib
    from ..utils import default_device

    device = device_of(args) or default_device()  # None: the LLM's own default
    return DEFAULT_PREFIX_GIB["cuda" if device.type == "cuda" else "cpu"]


def run(args) -> int:
    from ..engine import EngineConfig

    try:
        from ..server.app import serve
    except ImportError as e:
        raise CLIError(f"the HTTP server is not available ({e}); install the server dependencies "
                       "with `pip install fastapi uvicorn`") from None
    engine_config = EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_seq_len, compile=args.compile,
                                 prefix_cache_gib=prefix_cache_gib(args), speculative=speculative_of(args),
                                 max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                                 batch_invariant=args.batch_invariant, kv_cache_dtype=args.kv_cache_dtype)
    if args.tensor_parallel_size > 1:
        check_tensor_parallel(args)
    sock = listen_socket(args.host, args.port)  # before the model loads: a taken port fails in a moment
    try:
        client = local_client(args, engine_config) if args.engine_in_process else remote_client(args, engine_config)
        load_lora_modules(client, args.lora_modules)
    except BaseException:
        sock.close()
        raise
    serve(client, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          max_queue=args.max_queue, log_level=args.log_level, max_connections=args.max_connections,
          header_timeout=args.header_timeout, sock=sock, body_timeout=args.body_timeout,
          keep_alive_timeout=args.keep_alive_timeout, max_connections_per_client=args.max_connections_per_client,
          shutdown_timeout=args.shutdown_timeout)
    return 0


def check_tensor_parallel(args) -> None:
    """--tensor-parallel-size against the checkpoint's KV heads, read from its config before anything
    loads (in the engine process the error would come after a traceback)."""
    from ..config import ModelLoadError
    from ..loading import open_checkpoint
    from ..weights import check_world_size

    try:
        check_world_size(open_checkpoint(model_source(args)).config, args.tensor_parallel_size)
    except (ValueError, ModelLoadError) as e:
        raise CLIError(str(e)) from None


def listen_socket(host: str, port: int):
    """The server's socket, bound now; a port in use (or a bad address) is one line and exit status 1."""
    from ..server.connections import bind_socket

    try:
        return bind_socket(host, port)
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def local_client(args, engine_config):
    """The engine on a thread of this process (--engine-in-process)."""
    from ..server.driver import EngineDriver

    return EngineDriver(load_llm(args, engine_config))


def remote_client(args, engine_config):
    """An EngineProcessClient: this process loads the tokenizer, the engine process it starts loads the model."""
    import dataclasses

    from ..server.engine_client import EngineProcessClient
    from ..server.engine_process import EngineLoad

    quantize = quantize_of(args)
    device = device_of(args)
    load = EngineLoad(source=str(model_source(args)), device=None if device is None else str(device),
                      dtype=dtype_name(args), engine=dataclasses.asdict(engine_config),
                      quantize=dataclasses.asdict(quantize) if dataclasses.is_dataclass(quantize) else quantize,
                      tensor_parallel_size=args.tensor_parallel_size)
    return EngineProcessClient.launch(load, step_timeout=args.engine_step_timeout)
