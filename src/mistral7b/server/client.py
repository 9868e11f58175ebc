"""What the server needs of an engine, wherever it runs (vLLM's `EngineClient`): `driver.EngineDriver`
steps an engine on a thread of this process, `engine_client.EngineProcessClient` drives one in a
process of its own. The app and the serving classes see either through this protocol alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from ..engine.config import ModelInfo
from ..engine.speculative import SpecStats

if TYPE_CHECKING:
    from ..engine.adapters import AdapterRegistry
    from ..engine.request import Request
    from ..sampling import SamplingParams
    from ..tokenizer import Tokenizer
    from .driver import Subscriber
    from .remote_adapters import RemoteAdapters


@dataclass(frozen=True)
class EngineStats:
    """The engine's queue and counters as of its last step (/metrics and /health read them)."""

    running: int  # sequences holding a cache row
    waiting: int  # sequences queued for one
    steps: int
    aborted: int
    prefix: dict | None = None  # the prefix cache's counters (PrefixCache.metrics); None: it is off
    spec: SpecStats | None = None  # speculative decoding's counters; None: it is off


@runtime_checkable
class EngineClient(Protocol):
    name: str | None  # the checkpoint's source: the served model's default name
    tokenizer: Tokenizer | None  # None: prompts are token ids
    adapters: AdapterRegistry | RemoteAdapters | None  # the LoRA adapters (names, unload); None: none
    dead: str | None  # why the engine is gone for good, or None
    on_death: list[Callable[[], None]]  # run once if the engine dies
    model_info: ModelInfo  # read once `unavailable()` is None: an engine process reports it when ready

    def encode_prompt(self, prompt: str | list[int]) -> list[int]: ...

    def chat_prompt(self, messages: list[dict], safe_prompt: bool = False) -> list[int]: ...

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the engine would refuse the request."""

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sub: Subscriber,
               lora: str | None = None) -> Request:
        """Queue a request; its steps' outputs reach `sub` on its event loop."""

    def abort(self, request: Request) -> None: ...

    def pending_aborts(self) -> int:
        """Aborted requests that still hold rows until the engine's next step."""

    def fail_open(self, message: str) -> None:
        """Fail every open request with `message` (a shutdown ending what is left)."""

    def load_lora(self, name: str, path) -> None: ...

    def stats(self) -> EngineStats: ...

    def unavailable(self) -> str | None:
        """Why the engine cannot serve generation now (starting, or dead), or None."""

    def start(self) -> EngineClient:
        """Get ready to serve: an engine on a thread compiles here, an engine process reports later."""

    def close(self) -> None: ...
