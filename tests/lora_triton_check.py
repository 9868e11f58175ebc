"""Run under TRITON_INTERPRET=1: the LoRA kernels (lora_triton.py), the shrink and expand pair and the fused
kernel, interpreted on the CPU, against float64 references from fresh random tensors (fp32: the
interpreter's bf16 is not the GPU's): 2-d and 3-d activations with strided rows, K, N and the rank off the
tiles, mixed slots (0, -1, repeats), int32 and int64 slots, fused linears' parts (B^T's other parts' rows
are random here, so reading them shows); the fused kernel's counters back at zero; a model with
delta="triton" and "fused" against "matmul" (eager, rows grouped by slot), eager and as a compiled decode
step (aot_eager, fullgraph); the fake kernel; the row limit. Exits non-zero on a failure."""

from __future__ import annotations

import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from checkpoints import hf_model, ours_from_hf, rel_err
from mistral7b import lora_triton
from mistral7b.lora import _slot_map, enable_lora
from mistral7b.lora_triton import MAX_ROWS, lora_delta

SEED = int.from_bytes(os.urandom(4), "little")
G = torch.Generator().manual_seed(SEED)


def report(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{name}: {detail + ' ' if detail else ''}{'ok' if ok else 'FAIL'}")
    return ok


def bank_tensors(slots: int, pr: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, bt = torch.randn(slots + 1, pr, k, generator=G), torch.randn(slots + 1, pr, n, generator=G) / pr ** 0.5
    a[0], bt[0] = 0, 0  # slot 0: no adapter
    return a, bt


def reference(x, a, bt, index, out, part_ends=()) -> torch.Tensor:
    """out + x a[s]^T bt[s] in float64, s each batch row's slot (slot 0 for index -1: zero), bt[s] zero
    outside each part's own ranks x columns (as a bank stores it)."""
    own = index.long().clamp(min=0)
    bt = bt.double().clone()
    ends, rank = [0, *part_ends, bt.shape[-1]], bt.shape[1] // (len(part_ends) + 1)
    for part, (lo, hi) in enumerate(zip(ends, ends[1:])):
        bt[:, part * rank : (part + 1) * rank, :lo] = 0
        bt[:, part * rank : (part + 1) * rank, hi:] = 0
    a_rows, bt_rows = a.double()[own], bt[own]  # [B, PR, K], [B, PR, N]
    xa = torch.einsum("b...k,brk->b...r", x.double(), a_rows)
    return out.double() + torch.einsum("b...r,brn->b...n", xa, bt_rows)


def kernel_case(name: str, x, out, index, slots: int, pr: int, part_ends=(), *, counters) -> int:
    """The two-kernel and the fused forms (with `counters`) on the same inputs; failures."""
    a, bt = bank_tensors(slots, pr, x.shape[-1], out.shape[-1])
    want, none = reference(x, a, bt, index, out, part_ends), index <= 0
    failures = 0
    for fused in (False, True):
        got = lora_delta(x, a, bt, index, out, list(part_ends), counters if fused else None)
        err = ((got.double() - want).norm() / want.norm()).item()
        ok = got.shape == out.shape and got.dtype == out.dtype and err < 1e-5 and torch.equal(got[none], out[none])
        ok = ok and rel_err(got[~none], out[~none]) > 1e-2
        form = "fused" if fused else "two kernels"
        failures += not report(f"{form}, {name}", ok, f"{tuple(got.shape)} rel err {err:.1e}")
    return failures


def kernel_cases() -> int:
    """Strided rows (x and out are views), K, N and PR off the first tiles (BLOCK_K 256 / 512, BLOCK_R 8 / 16,
    BLOCK_N 64 / 128), parts ending inside a column tile."""
    counters = lora_triton.new_counters(torch.device("cpu"))  # one set for every launch, as a bank has
    index = torch.tensor([2, 0, 1, -1, 2, 3, 0])
    x, out = torch.randn(7, 2105, generator=G)[:, :2100], torch.randn(7, 203, generator=G)[:, :200]
    failures = kernel_case("2-d, K 2100 (3 splits, the last partial), slots 2 0 1 -1 2 3 0, int64", x, out, index,
                           3, 12, counters=counters)
    failures += kernel_case("the same as 3 parts (q, k, v) ending at 90 and 130", x, out, index, 3, 12, (90, 130),
                            counters=counters)
    index = torch.tensor([1, -1, 3], dtype=torch.int32)
    x, out = torch.randn(3, 4, 527, generator=G)[..., :520], torch.randn(3, 4, 130, generator=G)
    failures += kernel_case("3-d [3, 4, 520], slots 1 -1 3, int32", x, out, index, 3, 16, counters=counters)
    failures += kernel_case("the same as 2 parts (gate, up) ending at 65", x, out, index, 3, 16, (65,),
                            counters=counters)
    x = torch.randn(5, 2, 64, generator=G).transpose(0, 1)  # rows no single stride reaches: copied
    failures += kernel_case("3-d transposed [2, 5, 64], slots 2 2", x, torch.randn(2, 5, 70, generator=G),
                            torch.tensor([2, 2]), 2, 5, counters=counters)
    left = counters.tolist()
    return failures + (not report("fused counters after its launches", left == [0, 0, 0], f"{left}"))


def random_adapter(config, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (torch.randn(rank, s.cols, generator=G) / s.cols ** 0.5,
                   torch.randn(s.hi - s.lo, rank, generator=G) / rank ** 0.5)
            for name, s in _slot_map(config).items()}


def counting_calls() -> list[int]:
    """Count lora_delta's calls from the bank (its module attribute, which add_delta reads)."""
    calls, op = [0], lora_triton.lora_delta

    def counted(*args):
        calls[0] += 1
        return op(*args)

    lora_triton.lora_delta = counted
    return calls


def model_case(delta: str) -> bool:
    """A random model with two random adapters: delta="triton" or "fused" (every linear through the kernels)
    against "matmul" (eager: rows grouped by slot), logits to 1e-5; the adapters do move them."""
    model = ours_from_hf(hf_model("mistral", n_kv_heads=2, window=8, seed=SEED % (1 << 30)))
    bank = enable_lora(model, max_loras=2, max_rank=8, delta=delta)
    bank.write(1, random_adapter(model.config, 8), 2.0)
    bank.write(2, random_adapter(model.config, 3), 0.5)
    tokens, slots = torch.randint(0, model.config.vocab_size, (4, 5), generator=G), torch.tensor([2, 0, 1, 2])
    calls = counting_calls()
    with torch.no_grad():
        got = model(tokens, adapters=slots)
        bank.delta = "matmul"
        want, plain = model(tokens, adapters=slots), model(tokens)
    lora_triton.lora_delta = lora_delta
    err, moved = rel_err(got, want), rel_err(want, plain)
    ok = err < 1e-5 and moved > 1e-2 and calls[0] == len(bank.parts) and torch.equal(got[1], plain[1])
    return report(f"model delta {delta} vs matmul", ok,
                  f"rel err {err:.1e}, adapters move {moved:.1e}, {calls[0]} calls")


def compiled_case(delta: str) -> bool:
    """The model's compiled decode step (aot_eager, fullgraph: a graph break raises) with delta="triton" or "fused":
    the custom op in its graph, the logits equal to eager "matmul"'s."""
    model = ours_from_hf(hf_model("mistral", n_kv_heads=2, window=8, seed=SEED % (1 << 29)))
    bank = enable_lora(model, max_loras=2, max_rank=4, delta=delta)
    for slot in (1, 2):
        bank.write(slot, random_adapter(model.config, 4), 1.0)
    caches = [model.new_cache(3, max_seq_len=16) for _ in range(2)]
    prompt, slots = torch.randint(0, model.config.vocab_size, (3, 6), generator=G), torch.tensor([2, 0, 1])
    with torch.no_grad():
        for cache in caches:
            model(prompt, torch.arange(6).expand(3, 6), cache, kv_len=6, adapters=slots)
        token, at = prompt[:, -1:], torch.full((3, 1), 6)
        graphs = []

        def recording(gm, inputs):  # aot_eager, keeping each graph dynamo hands over
            graphs.append(gm)
            return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

        got = model.compile_decode(caches[0], backend=recording)(token, at, 7, slots)  # fullgraph: a break raises
        ops = sum(str(node.target) == "mistral7b.lora_delta.default" for gm in graphs for node in gm.graph.nodes)
        bank.delta = "matmul"
        want = model(token, at, caches[1], kv_len=7, adapters=slots)
    err = rel_err(got, want)
    ok = len(graphs) == 1 and ops == len(bank.parts) and err < 1e-5
    return report(f"compiled decode step, {delta}", ok, f"{len(graphs)} graph (fullgraph), {ops} lora_delta ops, "
                  f"rel err {err:.1e}")


def fake_and_limit_cases() -> int:
    """The fake kernel's output is the real one's (shape, strides, dtype: out's); past MAX_ROWS rows the op
    refuses and `available` says no."""
    a, bt, index = torch.zeros(3, 8, 32), torch.zeros(3, 8, 48), torch.tensor([1, 0])
    x, out = torch.randn(2, 3, 32), torch.randn(2, 3, 48, dtype=torch.float64)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = lora_delta(*(mode.from_tensor(t) for t in (x, a, bt, index, out)), [])
    real = lora_delta(x, a, bt, index, out, [])
    layouts = {(t.shape, t.stride(), t.dtype) for t in (fake, real, out)}
    failures = not report("fake kernel", len(layouts) == 1, "the real output's shape, strides and dtype")
    rows = MAX_ROWS // 2 + 1
    many = torch.randn(2, rows, 32)
    try:
        lora_delta(many, a, bt, index, torch.randn(2, rows, 48), [])
        refused = "accepted"
    except ValueError as e:
        refused = str(e)
    ok = f"at most {MAX_ROWS} rows" in refused and not lora_triton.available(many) and lora_triton.available(x)
    return failures + (not report(f"{2 * rows} rows", ok, refused))


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(f"seed {SEED}")
    failures = kernel_cases() + fake_and_limit_cases()
    for delta in ("triton", "fused"):
        failures += (not model_case(delta)) + (not compiled_case(delta))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
