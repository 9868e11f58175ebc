"""Run under TRITON_INTERPRET=1: the batch-invariant kernels (batch_invariant.py, the invariant launches of
quant/triton_mm.py and flash_decode.py), interpreted on the CPU in float32 on fresh random awkward shapes:
each against a float64 reference, and row i of a launch over the first m rows (or of a permutation of the
rows, or of a batch with a longer neighbour) bitwise equal to row i of the whole launch. One line per
check; exits non-zero on any failure."""

from __future__ import annotations

import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mistral7b.batch_invariant import invariant_mm, invariant_rms_norm
from mistral7b.attention import sdpa_attention
from mistral7b.flash_decode import flash_decode, invariant_split_plan, split_plan
from mistral7b.quant.kernels import pack_int4, pack_scales_zeros
from mistral7b.quant.triton_mm import int4_rows, int8_rows

G = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
FAILURES = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{name}: {detail} {'ok' if ok else 'FAIL'}")
    if not ok:
        FAILURES.append(name)


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = ((got.double() - want).norm() / want.norm()).item()
    check(name, err < 1e-5 and got.shape == want.shape, f"rel err {err:.1e}")


def rows_invariant(name: str, f, x: torch.Tensor) -> None:
    """f(x[:m]) is f(x)[:m] bit for bit for several m, and f(x[perm]) is f(x)[perm]."""
    whole = f(x)
    m_values = sorted({1, 2, int(torch.randint(3, x.shape[0], (1,), generator=G)), x.shape[0] - 1})
    prefixes = all(torch.equal(f(x[:m]), whole[:m]) for m in m_values)
    perm = torch.randperm(x.shape[0], generator=G)
    check(f"{name} rows", prefixes and torch.equal(f(x[perm]), whole[perm]), f"m {m_values}, a permutation")


def shape(lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi, (1,), generator=G))


def dense_cases() -> None:
    m, n, k = shape(33, 70), shape(33, 100), shape(130, 300)  # no multiple of a tile
    x, w = torch.randn(m, k + 3, generator=G)[:, :k], torch.randn(n, k, generator=G)  # a strided x, as activations
    close(f"invariant_mm M {m} N {n} K {k}", invariant_mm(x, w), x.double() @ w.double().t())
    rows_invariant(f"invariant_mm M {m} N {n} K {k}", lambda a: invariant_mm(a, w), x)
    d = shape(100, 300)
    x, weight = torch.randn(m, d, generator=G) * 3, torch.rand(d, generator=G) + 0.5
    want = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)) * weight.double()
    close(f"invariant_rms_norm M {m} D {d}", invariant_rms_norm(x, weight, 1e-5), want)
    rows_invariant(f"invariant_rms_norm M {m} D {d}", lambda a: invariant_rms_norm(a, weight, 1e-5), x)


def quant_cases() -> None:
    """int8 and int4 through the invariant launch: M = 1 used the multiply-and-sum variant, more rows a dot."""
    m, n, k = shape(65, 90), shape(20, 70), shape(100, 300)  # more rows than the few-row kernels take
    x = torch.randn(m, k, generator=G)
    q = torch.randint(-128, 128, (n, k), generator=G, dtype=torch.int8)
    scale = torch.rand(n, generator=G) / 64 + 1e-3
    close(f"int8 invariant M {m} N {n} K {k}", int8_rows(x, q, scale, invariant=True),
          x.double() @ (q.double() * scale.double()[:, None]).t())
    rows_invariant(f"int8 invariant M {m} N {n} K {k}", lambda a: int8_rows(a, q, scale, invariant=True), x)
    group, k = 64, 512
    q4 = torch.randint(0, 16, (n, k), generator=G, dtype=torch.uint8)
    s, z = torch.rand(n, k // group, generator=G) / 16 + 1e-3, torch.randn(n, k // group, generator=G) / 8
    packed = pack_int4(q4, torch.device("cpu"), "halves")
    sz = pack_scales_zeros(s, z, torch.device("cpu")).float()
    w = (q4.double() - 8).view(n, -1, group) * sz[:, :n, 0].t().double()[..., None] + sz[:, :n, 1].t().double()[..., None]
    x = torch.randn(m, k, generator=G)
    close(f"int4 invariant M {m} N {n} K {k}", int4_rows(x, packed, group, sz, n, invariant=True),
          x.double() @ w.view(n, k).t())
    rows_invariant(f"int4 invariant M {m} N {n} K {k}", lambda a: int4_rows(a, packed, group, sz, n, invariant=True), x)


def cache_row(position: int, slots: int, kv_heads: int, head_dim: int):
    """One cache row that has held positions 0..position (rolling over `slots`), and its key positions."""
    k, v = (torch.randn(kv_heads, slots, head_dim, generator=G) for _ in range(2))
    k_pos = torch.full((slots,), -1, dtype=torch.long)
    held = torch.arange(max(0, position - slots + 1), position + 1)
    k_pos[held % slots] = held
    return k, v, k_pos


def decode_cases() -> None:
    """A row alone over its own kv_len against the same row beside a longer neighbour (more slots read)
    and an idle row; the plans differ there (4 processors: the CPU's), the invariant one does not."""
    heads, kv_heads, head_dim, window = 8, 2, 32, None
    alone_len, batch_len = shape(200, 300), shape(700, 1100)
    check("split plans", split_plan(1, kv_heads, alone_len, 4)[1] != split_plan(3, kv_heads, batch_len, 4)[1]
          and invariant_split_plan(alone_len)[1] == invariant_split_plan(batch_len)[1], f"{alone_len} vs {batch_len} keys")
    rows = [cache_row(alone_len - 1, batch_len, kv_heads, head_dim), cache_row(batch_len - 1, batch_len, kv_heads, head_dim),
            cache_row(-1, batch_len, kv_heads, head_dim)]
    k, v, k_pos = (torch.stack(t) for t in zip(*rows))
    q = torch.randn(3, heads, 1, head_dim, generator=G)
    q_pos = torch.tensor([[alone_len - 1], [batch_len - 1], [-1]])
    together = flash_decode(q, k, v, q_pos, k_pos, window, invariant=True)
    alone = flash_decode(q[:1], k[:1, :, :alone_len], v[:1, :, :alone_len], q_pos[:1], k_pos[:1, :alone_len], window,
                         invariant=True)
    check("flash_decode invariant: alone == beside a longer row", torch.equal(alone[0], together[0]))
    swapped = flash_decode(q.flip(0), k.flip(0), v.flip(0), q_pos.flip(0), k_pos.flip(0), window, invariant=True)
    check("flash_decode invariant: rows reversed", torch.equal(swapped.flip(0)[:2], together[:2]))
    close("flash_decode invariant vs default", together[:2], flash_decode(q, k, v, q_pos, k_pos, window)[:2].double())


def geometry_case() -> None:
    """The same keys in rolling buffers of W and W + 4 slots (a plain cache and a speculating one), past
    several wraps: the invariant launch walks positions, so both give the same bits, and both SDPA's result."""
    heads, kv_heads, head_dim, window = 8, 2, 32, 64
    position = int(torch.randint(3 * window, 5 * window, (1,), generator=G))
    keys, values = (torch.randn(kv_heads, position + 1, head_dim, generator=G) for _ in range(2))
    q = torch.randn(1, heads, 1, head_dim, generator=G)
    outs = []
    for slots in (window, window + 4):
        held = torch.arange(position - slots + 1, position + 1)
        k, v = torch.empty(kv_heads, slots, head_dim), torch.empty(kv_heads, slots, head_dim)
        k_pos = torch.empty(slots, dtype=torch.long)
        k[:, held % slots], v[:, held % slots], k_pos[held % slots] = keys[:, held], values[:, held], held
        args = (q, k[None], v[None], torch.tensor([[position]]), k_pos[None], window)
        outs.append(flash_decode(*args, invariant=True))
        close(f"flash_decode invariant, wrapped, {slots} slots", outs[-1], sdpa_attention(*args).double())
    check("flash_decode invariant: W and W + 4 slots", torch.equal(outs[0], outs[1]), f"position {position}")


def verify_cases() -> None:
    """A speculative verify of T tokens written first into a rolling buffer of W + k slots, two rows at
    different positions (one past a wrap): each query token's output bitwise equal to flash_decode's at
    that position over the buffer as its decode step finds it (the later tokens not yet written)."""
    from mistral7b.attention import invariant_attention

    heads, kv_heads, head_dim, window, spare = 8, 2, 32, 64, 4
    slots, t = window + spare, int(torch.randint(2, spare + 2, (1,), generator=G))
    starts = [int(torch.randint(0, slots, (1,), generator=G)), int(torch.randint(2 * slots, 4 * slots, (1,), generator=G))]
    before = [cache_row(p - 1, slots, kv_heads, head_dim) for p in starts]  # positions up to p - 1 held
    new_k, new_v = (torch.randn(2, kv_heads, t, head_dim, generator=G) for _ in range(2))

    def written(upto: int):  # each row's buffer once its first `upto` new tokens are in
        ks, vs, ps = [], [], []
        for row, (p, (k, v, k_pos)) in enumerate(zip(starts, before)):
            k, v, k_pos = k.clone(), v.clone(), k_pos.clone()
            for j in range(upto):
                k[:, (p + j) % slots], v[:, (p + j) % slots], k_pos[(p + j) % slots] = new_k[row, :, j], new_v[row, :, j], p + j
            ks.append(k), vs.append(v), ps.append(k_pos)
        return torch.stack(ks), torch.stack(vs), torch.stack(ps)

    q = torch.randn(2, heads, t, head_dim, generator=G)
    q_pos = torch.tensor([[p + j for j in range(t)] for p in starts])
    k, v, k_pos = written(t)
    got = invariant_attention(q, k, v, q_pos, k_pos, window, False, None, slots, written_first=True)
    same = all(torch.equal(got[:, :, j : j + 1], flash_decode(q[:, :, j : j + 1], *written(j + 1)[:2], q_pos[:, j : j + 1],
                                                             written(j + 1)[2], window, invariant=True))
               for j in range(t))
    check("invariant verify == each token's decode step", same, f"{t} tokens at positions {starts}, {slots} slots")


def model_case() -> None:
    """A small model switched by `apply`: every linear and norm runs the interpreted kernels, and the
    logits stay the plain model's (float32, within rounding)."""
    from mistral7b.batch_invariant import InvariantLinear, InvariantRMSNorm, apply
    from mistral7b.config import ModelConfig
    from mistral7b.model import Transformer

    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=80,
                         sliding_window=8, max_seq_len=64, tie_embeddings=bool(torch.randint(0, 2, (1,), generator=G)))
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=G)))
    model = Transformer(config).eval()
    tokens = torch.randint(0, 80, (3, 11), generator=G)
    with torch.no_grad():
        want = model(tokens).double()
        switched = apply(model, True)
        got = model(tokens)
    kinds = {type(m) for m in model.modules()}
    check("apply switches the model", switched == 2 * 4 + 2 * 2 + 2 and InvariantLinear in kinds
          and InvariantRMSNorm in kinds and model.batch_invariant, f"{switched} modules")
    close(f"switched model logits (tied {config.tie_embeddings})", got, want)


def fakes_match() -> None:
    x, w = torch.randn(5, 40), torch.randn(7, 40)
    for name, op, args in (("invariant_mm", torch.ops.mistral7b.invariant_mm.default, (x, w)),
                           ("invariant_rms_norm", torch.ops.mistral7b.invariant_rms_norm.default, (x, w[0], 1e-5))):
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = op(*args)
        check(f"{name} fake kernel", (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype))


def dots_row_by_row() -> None:
    """The interpreter's tl.dot is numpy's matmul, whose BLAS may round a row by where it sits in the tile
    (OpenBLAS's Haswell kernels do: on an AVX2-only CPU a permuted launch differed in the last bits, where
    AVX-512 ones matched). A GPU's MMA sums every output element in the same order wherever its row sits.
    Row by row, each product is one and the same 1-row matmul, so the check tests the kernels' own tiling."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    whole_tile = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.ndim != 2:
            return whole_tile(self, a, b, d, input_precision, max_num_imprecise_acc)
        rows = [whole_tile(self, TensorHandle(a.data[i : i + 1], a.dtype), b, TensorHandle(d.data[i : i + 1], d.dtype),
                           input_precision, max_num_imprecise_acc) for i in range(a.data.shape[0])]
        return TensorHandle(np.concatenate([r.data for r in rows]), rows[0].dtype)

    InterpreterBuilder.create_dot = create_dot


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    dots_row_by_row()
    dense_cases()
    quant_cases()
    decode_cases()
    geometry_case()
    verify_cases()
    model_case()
    fakes_match()
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
