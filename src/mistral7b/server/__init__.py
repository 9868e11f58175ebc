"""The OpenAI-compatible HTTP server over the continuous-batching engine, split as vLLM splits it:
`protocol` (request and response models; `protocol_tools`: those of tools and response_format),
`serving` and `serving_completion`, `serving_chat`, `serving_tokenization` (the endpoints),
`tool_plan` (a chat request's tool path over the `tools` package), `app` (`build_app`, the routes,
`serve`), `connections` (timeouts and caps per connection), `shutdown` (the drain on SIGTERM), `client`
(`EngineClient`: what the server needs of an engine), `driver` (`EngineDriver`: the engine on a thread),
`engine_client` / `engine_process` / `wire` (`EngineProcessClient`: the engine in a process of its own),
`metrics` (Prometheus), `errors` (OpenAI-shaped errors), and `settings` (defaults the command line
shares, importable without FastAPI)."""

_EXPORTS = {"build_app": "app", "serve": "app", "ServerThread": "app", "default_model_name": "app",
            "EngineClient": "client", "EngineDriver": "driver", "EngineProcessClient": "engine_client"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    # Lazy, so that `mistral7b.server.settings` (the CLI's defaults) imports without FastAPI.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
