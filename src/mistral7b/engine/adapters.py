"""The engine's LoRA adapters: names to slots of the model's `LoRABank`, loaded and unloaded at run time.

The bank is made on the first load (`max_loras` slots of rank up to `max_lora_rank`). A request holds
its adapter's slot until it finishes: unloading takes the name away at once, and the slot is reused
only once no request still running or waiting holds it. Any thread may load or unload; a load writes
only a slot that no row reads, so it never disturbs a forward in flight. Each load gets a key (its
name and load number) that no other load shares, even one of the same name or into the same slot: the
prefix cache keys an adapter's blocks by it.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from ..lora import LoRARequest, enable_lora


class UnknownAdapter(LookupError):
    """No adapter of that name is loaded (the server answers 404)."""


class AdapterRegistry:
    def __init__(self, model, max_loras: int, max_rank: int, in_use):
        """`in_use()`: the slots that requests still running or waiting hold (the scheduler knows)."""
        self.model, self.max_loras, self.max_rank, self.in_use = model, max_loras, max_rank, in_use
        self.slots: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self.keys: dict[int, str] = {}  # slot -> the key of the adapter last loaded into it
        self.loads = itertools.count(1)
        self.lock = threading.RLock()  # Engine.add holds it from looking a slot up until the request is queued

    def load(self, name: str, path: str | Path) -> int:
        """Read the PEFT adapter at `path` into a free slot under `name`; its slot. A ValueError if the
        name is taken, the folder is not an adapter we can run, or every slot is held."""
        from ..loading.peft import read_adapter

        if not isinstance(name, str) or not name:
            raise ValueError("an adapter needs a non-empty name")
        with self.lock:
            if name in self.slots:
                raise ValueError(f"adapter {name!r} is already loaded")
            adapter = read_adapter(path, self.model.config)
            bank = enable_lora(self.model, self.max_loras, self.max_rank)
            slot = self._free_slot()
            bank.write(slot, adapter.weights, adapter.scale)
            self.slots[name], self.paths[name] = slot, str(path)
            self.keys[slot] = f"{name}#{next(self.loads)}"
            return slot

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.slots:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            del self.slots[name], self.paths[name]

    def slot(self, lora: LoRARequest | str | None) -> int:
        """The slot a request runs with: 0 for none; a LoRARequest not yet loaded is loaded first."""
        if lora is None:
            return 0
        name = lora if isinstance(lora, str) else lora.name
        with self.lock:
            if name in self.slots:
                return self.slots[name]
        if isinstance(lora, LoRARequest):
            try:
                return self.load(lora.name, lora.path)
            except ValueError:
                if name in self.slots:  # another thread loaded it meanwhile
                    return self.slots[name]
                raise
        raise UnknownAdapter(f"adapter {name!r} is not loaded")

    def key(self, slot: int) -> str | None:
        """The key of the adapter in `slot` (None for 0, the base model); stable while a request holds the slot."""
        return self.keys[slot] if slot else None

    def names(self) -> dict[str, str]:
        """name -> path of every adapter loaded."""
        with self.lock:
            return dict(self.paths)

    def _free_slot(self) -> int:
        taken = set(self.slots.values()) | set(self.in_use())
        for slot in range(1, self.max_loras + 1):
            if slot not in taken:
                return slot
        raise ValueError(f"all {self.max_loras} LoRA slots are in use (max_loras); unload an adapter first")
