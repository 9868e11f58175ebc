"""The OpenAI-compatible HTTP server over the continuous-batching engine, split as vLLM splits it:
`protocol` (request and response models), `serving*` (the endpoints), `app` (`build_app`, the routes,
`serve`), `driver` (the engine thread), `engine_client` / `engine_process` / `wire` (the engine in a
process of its own), `metrics` (Prometheus), `errors` (OpenAI-shaped errors), and
`settings` (defaults the command line shares, importable without FastAPI)."""

_EXPORTS = {"build_app": "app", "serve": "app", "ServerThread": "app", "default_model_name": "app",
            "EngineDriver": "driver", "driver_for": "driver"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    # Lazy, so that `mistral7b.server.settings` (the CLI's defaults) imports without FastAPI.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
