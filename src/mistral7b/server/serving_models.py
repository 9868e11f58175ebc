"""The names a server answers to (vLLM's `serving_models`): the base model and its LoRA adapters.

A request picks an adapter by `model: <adapter name>`; `/v1/models` lists the base and every adapter
(`parent`: the base); `POST /v1/load_lora_adapter` ({"lora_name", "lora_path"}) and
`POST /v1/unload_lora_adapter` ({"lora_name"}) change the set at run time, in an engine on a thread of this
process (`--engine-in-process`, or `build_app(LLM(...))`) or in its own process (`remote_adapters`).
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .errors import ERROR_RESPONSES, APIError
from .protocol import ModelCard, ModelList

MODEL_NAME_SHOWN = 100  # characters of an unknown model's name quoted back in the 404


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


class ServedModels:
    """The base model's name and the engine whose adapters are the other names."""

    def __init__(self, engine, base: str):
        self.engine, self.base = engine, base
        self.adapters = getattr(engine, "adapters", None)  # None: an engine client without adapters

    def names(self) -> dict[str, str]:
        return self.adapters.names() if self.adapters is not None else {}

    def resolve(self, asked: str) -> str | None:
        """None for the base model, the adapter's name for an adapter, else a 404 naming `asked`."""
        if asked == self.base:
            return None
        adapters = self.names()
        if asked in adapters:
            return asked
        shown = asked if len(asked) <= MODEL_NAME_SHOWN else f"{asked[:MODEL_NAME_SHOWN]}... ({len(asked)} characters)"
        also = f" and the LoRA adapters {', '.join(map(repr, sorted(adapters)))}" if adapters else ""
        raise APIError(404, f"The model '{shown}' does not exist; this server serves '{self.base}'{also}.",
                       param="model", code="model_not_found")

    def cards(self, created: int, max_model_len) -> list[ModelCard]:
        base = ModelCard(id=self.base, created=created, max_model_len=max_model_len)
        return [base] + [ModelCard(id=name, created=created, max_model_len=max_model_len, root=path,
                                     parent=self.base) for name, path in sorted(self.names().items())]

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        registry = self._registry()
        if body.lora_name == self.base:
            raise APIError(400, f"'{body.lora_name}' is the base model's name", param="lora_name")
        try:
            await run_in_threadpool(self.engine.load_lora, body.lora_name, body.lora_path)
        except (ValueError, OSError) as e:
            param = "lora_name" if body.lora_name in registry.names() else "lora_path"
            raise APIError(400, str(e), param=param) from None
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        registry = self._registry()
        try:
            registry.unload(body.lora_name)
        except LookupError:
            raise APIError(404, f"The LoRA adapter '{body.lora_name}' is not loaded.", param="lora_name",
                           code="model_not_found") from None
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    def _registry(self):
        if self.adapters is None:
            raise APIError(400, "this server's engine does not run LoRA adapters")
        return self.adapters


def add_model_routes(app: FastAPI, models: ServedModels, limit) -> None:
    """GET /v1/models and /v1/models/{id} (OpenAI's list and retrieve), and vLLM's adapter load/unload."""
    created_at = int(time.time())

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models():
        return ModelList(data=models.cards(created_at, limit()))

    @app.get("/v1/models/{model:path}", summary="Retrieve a model", response_model=ModelCard,
             responses=ERROR_RESPONSES)
    async def retrieve_model(model: str):
        models.resolve(model)
        return next(c for c in models.cards(created_at, limit()) if c.id == model)

    @app.post("/v1/load_lora_adapter", summary="Load a LoRA adapter (PEFT folder) under a name",
              response_model=str, responses=ERROR_RESPONSES)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        return await models.load(body)

    @app.post("/v1/unload_lora_adapter", summary="Unload a LoRA adapter", response_model=str,
              responses=ERROR_RESPONSES)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        return models.unload(body)

