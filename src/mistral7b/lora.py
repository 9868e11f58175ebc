"""LoRA adapters, many at once: a bank of adapter slots beside the model's linears, and the batched delta.

`enable_lora(model, max_loras, max_rank)` wraps every block linear and the head in a `LoRALinear` that
adds `B_s A_s x` to the base output, s the slot of each batch row (0: no adapter). Each linear's slots
are stacked into A [S, parts * R, in] and B^T [S, parts * R, out] (x A^T B^T then reads B^T row by row:
on one CPU thread 0.06 ms against 0.10 reading B, for 2 rows of a 32000-row head). A forward groups its
rows by slot once (an `AdapterRows`, the model's forward argument that every linear is handed, not
state on the bank) and runs one `x_g A_s^T B_s^T` per slot present, added into the output rows
(punica's SGMV idea): never a per-row copy of B (the head's is vocab x rank), rows on no adapter cost
nothing, and the base kernel (dense or quantized) is untouched. A fused linear (q, k, v or gate, up)
stacks its parts' A along the rank and places each part's B in its own rows and rank columns, so the
product is exactly the parts' deltas side by side.
The slots are allocated once, so loading an adapter copies into place. Grouping reads the row slots on
the host once per forward (a sync on a GPU); a compiled step (torch.compile, CUDA graphs) instead
masks every slot's product by each row's slot: one graph for any mix of adapters, and a load changes
the slots' contents, never the graph. That delta has three formulations (`LoRABank.delta`): "matmul"
(`_masked_delta`), "reduce" (`_reduced_delta`, mat-vecs as broadcast-multiply-sums that
Inductor fuses with the mask and the add), "triton" (the default: lora_triton's shrink and expand
kernels, which read only each row's own slot; on CUDA they serve eager forwards too, with no host sync;
elsewhere, or past 64 rows, "matmul"'s paths) and "fused" (the same in one kernel a linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import lora_triton
from .weights import head_slot, weight_map


@dataclass(frozen=True)
class LoRARequest:
    """The adapter a request runs with: a name (its handle) and the PEFT folder it is read from."""

    name: str
    path: str


class AdapterRows:
    """One forward's adapters: `index` [B], each batch row's slot (0: none), and, in eager forwards,
    its rows grouped by slot, computed on first use and shared by every linear of that forward."""

    def __init__(self, index: Tensor):
        self.index, self._groups = index, None

    def groups(self) -> list[tuple[int, Tensor | slice]]:
        """(slot, its rows) for each slot present but 0 and -1 (none, as in the compiled deltas): rows as
        a slice where they are contiguous (no gather), else an index tensor. Reads the slots on the host
        (a sync on a GPU)."""
        if self._groups is None:
            rows: dict[int, list[int]] = {}
            for row, slot in enumerate(self.index.tolist()):
                if slot > 0:
                    rows.setdefault(slot, []).append(row)
            self._groups = [(slot, _rows(r, self.index.device)) for slot, r in sorted(rows.items())]
        return self._groups


DELTAS = ("matmul", "reduce", "triton", "fused")
DEFAULT_DELTA = "triton"


class LoRABank:
    """The adapter slots of one model: per linear module, the stacked A and B^T. Slot 0 stays zero (the
    base model); the tensors are allocated once, so loading writes in place and a compiled step that
    reads them needs no recompiling.

    `delta`, the compiled step's formulation (eager forwards group rows by slot, but with "triton" or
    "fused" where they run): "matmul" (two cuBLAS mms, a mask and an add per linear), "reduce" (one
    shrink reduction with the mask, one expand reduction with the add, as Inductor emits for one-row
    matmuls), "triton" (the default: lora_triton's two kernels, eager forwards included, where they
    run: CUDA, at most 64 rows; elsewhere "matmul"'s paths) or "fused" (its one kernel, where "triton"
    runs). H100, 7B shape, 4 rank-16 adapters, compiled b8: matmul x1.26 the base step, reduce x1.32,
    triton x1.17 (b1: matmul x1.19-1.20, triton x1.16). A compiled step guards on it: changing it
    recompiles the adapter graph."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, delta: str = DEFAULT_DELTA):
        param = next(model.parameters())
        self.config, self.max_loras, self.max_rank = model.config, max_loras, max_rank
        self.delta = delta
        slots = 1 + max_loras
        self.parts: dict[str, int] = {}
        for slot in _linear_slots(model.config):
            self.parts[slot.module] = self.parts.get(slot.module, 0) + 1
        self.a: dict[str, Tensor] = {}
        self.bt: dict[str, Tensor] = {}
        self.part_ends = _part_ends(model.config)
        for module, parts in self.parts.items():
            rows, cols = _shape(model.config, module)
            on = dict(device=param.device, dtype=param.dtype)
            self.a[module] = torch.zeros(slots, parts * max_rank, cols, **on)
            self.bt[module] = torch.zeros(slots, parts * max_rank, rows, **on)
        self.counters = lora_triton.new_counters(param.device)  # "fused"'s, made here: never inside a graph

    @property
    def delta(self) -> str:
        return self._delta

    @delta.setter
    def delta(self, value: str) -> None:
        if value not in DELTAS:
            raise ValueError(f"LoRA delta must be one of {', '.join(map(repr, DELTAS))}, got {value!r}")
        self._delta = value

    def write(self, slot: int, weights: dict[str, tuple[Tensor, Tensor]], scale: float) -> None:
        """Fill `slot` with an adapter: canonical weight name -> (A [r, in], B [out, r]); B is scaled here."""
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"LoRA slot {slot} is not in 1..{self.max_loras}")
        self.clear(slot)
        slots = _slot_map(self.config)
        part_of = _part_numbers(self.config)
        with torch.no_grad():
            for name, (a, b) in weights.items():
                s = slots[name]
                r, lo = a.shape[0], part_of[name] * self.max_rank
                if r > self.max_rank:
                    raise ValueError(f"adapter rank r={r} exceeds max_lora_rank={self.max_rank}")
                self.a[s.module][slot, lo : lo + r] = a
                self.bt[s.module][slot, lo : lo + r, s.lo : s.hi] = (b * scale).t()

    def clear(self, slot: int) -> None:
        with torch.no_grad():
            for module in self.parts:
                self.a[module][slot].zero_()
                self.bt[module][slot].zero_()

    def rows(self, index: Tensor) -> AdapterRows:
        """A forward's `AdapterRows` from its slots [B] (the model's `adapters` argument)."""
        if not isinstance(index, Tensor) or index.dim() != 1:
            raise ValueError("adapters must be a 1-d tensor of LoRA slots, one per batch row")
        return AdapterRows(index)

    def mark_static(self) -> None:
        """Tell torch.compile the slots keep their addresses: CUDA graphs then read them in place
        (loads included) instead of copying every slot into the graph's inputs on each replay."""
        for t in (*self.a.values(), *self.bt.values(), self.counters):
            torch._dynamo.mark_static_address(t)

    def add_delta(self, module: str, x: Tensor, out: Tensor, adapters: AdapterRows) -> Tensor:
        """out (x's base output [B, ..., out]) plus B_s A_s x on each row, s = that row's slot."""
        a, bt = self.a[module], self.bt[module]
        if self.delta in ("triton", "fused") and lora_triton.available(x):
            counters = self.counters if self.delta == "fused" else None
            return lora_triton.lora_delta(x, a, bt, adapters.index, out, self.part_ends[module], counters)
        if torch.compiler.is_compiling():
            if self.delta == "reduce":  # only compiled: eagerly its broadcasts would be materialized
                return _reduced_delta(a, bt, x, adapters.index, out)
            return out + _masked_delta(a, bt, x, adapters.index).to(out.dtype)
        for slot, rows in adapters.groups():
            delta = (torch.nn.functional.linear(x[rows].to(a.dtype), a[slot]) @ bt[slot]).to(out.dtype)
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)
        return out


def _masked_delta(a: Tensor, bt: Tensor, x: Tensor, index: Tensor) -> Tensor:
    """Every row's delta with no host sync and no branch on the slots (a compiled step's, whose graph
    must not depend on which adapters a batch runs): x against every slot's A, each row's products
    zeroed but its own slot's, then one product with all the B^T stacked. Slot 0 (zero) is skipped, so
    rows on no adapter (or index -1) get exactly 0. Costs S*R*(in+out) a token, small beside the base
    linear; never a per-row copy of B (the head's is vocab x rank)."""
    slots, rank = a.shape[0] - 1, a.shape[1]
    xa = torch.nn.functional.linear(x.to(a.dtype), a[1:].flatten(0, 1))  # [B, ..., S * R]
    own = index[:, None] == torch.arange(1, slots + 1, device=index.device)  # [B, S]
    own = own.view(own.shape[0], *[1] * (x.dim() - 2), slots, 1).to(xa.dtype)
    xa = (xa.unflatten(-1, (slots, rank)) * own).flatten(-2)
    return xa @ bt[1:].flatten(0, 1)


def _reduced_delta(a: Tensor, bt: Tensor, x: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """`out + _masked_delta(...)` as two broadcast-multiply-sums, for Inductor to fuse: the shrink with
    each row's slot mask (one reduction kernel over `in`), the expand with the add into `out` (one over
    S * R), where the matmuls take two mms, a mask and an add. Compiled only: eagerly x * A alone would
    materialize B x S*R x in. Accumulates in fp32; rows on no adapter (or index -1) get 0, so exactly `out`."""
    slots, rank = a.shape[0] - 1, a.shape[1]
    acc = torch.promote_types(a.dtype, torch.float32)
    slot_of = torch.arange(slots * rank, device=index.device) // rank + 1  # each column's slot
    own = (index[:, None] == slot_of).view(index.shape[0], *[1] * (x.dim() - 2), slots * rank)
    xa = (x[..., None, :].to(acc) * a[1:].flatten(0, 1).to(acc)).sum(-1) * own  # [B, ..., S * R]
    return (out.to(acc) + (xa[..., :, None] * bt[1:].flatten(0, 1).to(acc)).sum(-2)).to(out.dtype)


class LoRALinear(nn.Module):
    """A linear (any kernel: dense or quantized) plus each row's LoRA delta, when the forward runs adapters."""

    def __init__(self, base: nn.Module, bank: LoRABank, module: str):
        super().__init__()
        self.base, self.module = base, module
        self.__dict__["bank"] = bank  # shared by every wrapper; not a submodule (its tensors are not weights)

    def forward(self, x: Tensor, adapters: AdapterRows | None = None) -> Tensor:
        out = self.base(x)
        if adapters is None:
            return out
        return self.bank.add_delta(self.module, x, out, adapters)


def _rows(rows: list[int], device) -> Tensor | slice:
    if rows[-1] - rows[0] == len(rows) - 1:
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def enable_lora(model: nn.Module, max_loras: int, max_rank: int, delta: str | None = None) -> LoRABank:
    """Wrap the model's block linears and head in `LoRALinear`s over one new bank (idempotent). `delta`:
    the compiled step's formulation, "matmul", "reduce" or "triton" (LoRABank); None keeps the bank's,
    DEFAULT_DELTA for a new one."""
    if getattr(model, "lora", None) is not None:
        if delta is not None:
            model.lora.delta = delta
        return model.lora
    if not isinstance(max_loras, int) or max_loras < 1 or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_loras and max_lora_rank must be positive integers, got {max_loras!r}, {max_rank!r}")
    bank = LoRABank(model, max_loras, max_rank, DEFAULT_DELTA if delta is None else delta)
    for module in bank.parts:
        parent_name, _, attr = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(getattr(parent, attr), bank, module))
    model.lora = bank
    return bank


def _linear_slots(config):
    """The weight slots an adapter may target: every block linear's part, and the head."""
    return [s for s in weight_map(config).values() if s.quantizable and s.module != "tok_embeddings"] + (
        [head_slot(config)] if config.tie_embeddings else [])


def _slot_map(config) -> dict:
    return {s.name: s for s in _linear_slots(config)}


def _part_ends(config) -> dict[str, list[int]]:
    """module -> the output columns where each part but the last ends (lora_delta's `part_ends`: part j's
    columns read only its ranks of B^T). weight_map lays a fused module's parts out in column order, the
    order `_part_numbers` counts them in."""
    ends: dict[str, list[int]] = {}
    for s in _linear_slots(config):
        ends.setdefault(s.module, []).append(s.hi)
    return {module: hi[:-1] for module, hi in ends.items()}


def _part_numbers(config) -> dict[str, int]:
    """canonical name -> its place among its module's parts (q 0, k 1, v 2; gate 0, up 1; others 0)."""
    seen: dict[str, int] = {}
    numbers = {}
    for s in _linear_slots(config):
        numbers[s.name] = seen.get(s.module, 0)
        seen[s.module] = numbers[s.name] + 1
    return numbers


def _shape(config, module: str) -> tuple[int, int]:
    slots = [s for s in _linear_slots(config) if s.module == module]
    return max(s.hi for s in slots), slots[0].cols


def linear_names(config) -> frozenset[str]:
    """The canonical weight names an adapter can target (the loader refuses any other)."""
    return frozenset(_slot_map(config))
