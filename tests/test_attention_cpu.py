"""attention_cpu: the C kernel against a float64 reference written here, on every variant this CPU runs, and
the property it exists for: a token's output depends only on the keys it sees, not on the slots around them,
the other tokens of the call or the other rows."""

import math
from dataclasses import dataclass
import subprocess
import sys

import pytest
import torch

from mistral7b import attention_cpu, cpu_pool
from mistral7b.native import cpu_variant

VARIANTS = {"vnni": ["portable", "avx2", "vnni"], "avx2": ["portable", "avx2"], "portable": ["portable"]}[cpu_variant()]


@dataclass
class Kernel:
    """One variant's library for keys and values of one dtype; called as slot_attention with float32 k and v
    (a float16 library gets them converted, as a float16 cache holds them)."""

    lib: object
    kv_dtype: torch.dtype

    def __call__(self, q, k, v, q_pos, k_pos, window, order=None):
        k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
        return attention_cpu.slot_attention(q, k, v, q_pos, k_pos, window, order, lib=self.lib)

    def held(self, t):
        """`t` as the cache holds it, in float32: what the reference must attend over."""
        return t.to(self.kv_dtype).float()


@pytest.fixture(scope="module", params=[(v, d) for v in VARIANTS for d in attention_cpu.KV_DTYPES],
                ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def kernel(request):
    variant, kv_dtype = request.param
    return Kernel(attention_cpu.open_variant(variant, kv_dtype), kv_dtype)


def reference(q, k, v, q_pos, k_pos, window):
    """float64, one query at a time: softmax over the keys with k_pos in (q_pos - window, q_pos]."""
    batch, heads, tokens, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for t in range(tokens):
            p = int(q_pos[b, t])
            seen = [s for s in range(k.shape[2]) if 0 <= k_pos[b, s] <= p and (window is None or p - k_pos[b, s] < window)]
            if p < 0 or not seen:
                continue
            for h in range(heads):
                keys, values = k[b, h // group, seen].double(), v[b, h // group, seen].double()
                weights = torch.softmax(keys @ q[b, h, t].double() / math.sqrt(dim), dim=0)
                out[b, h, t] = weights @ values
    return out


def case(batch, heads, kv_heads, tokens, slots, dim, gen):
    """Random q (a transposed view, as the model makes it), K/V as leading slots of a larger buffer, slot
    positions shuffled with some empty, query positions at and past the latest key."""
    q = torch.randn(batch, tokens, heads, dim, generator=gen).transpose(1, 2)
    k = torch.randn(batch + 1, kv_heads, slots + 3, dim, generator=gen)[1:, :, :slots]
    v = torch.randn(batch + 1, kv_heads, slots + 3, dim, generator=gen)[1:, :, :slots]
    k_pos = torch.stack([torch.randperm(slots + 4, generator=gen)[:slots] - 2 for _ in range(batch)]).clamp(min=-1)
    q_pos = (k_pos.max(dim=1, keepdim=True).values + torch.arange(tokens)).clone()
    return q, k, v, q_pos, k_pos


@pytest.mark.parametrize("dim", [16, 64, 72, 128])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("group", [4, 3, 2, 1, 5])  # query heads a KV head: 5 takes the head-by-head loops
def test_matches_reference(kernel, dim, window, group):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v, q_pos, k_pos = case(3, 2 * group, 2, 4, 37, dim, gen)
    q_pos[1, 2] = -1  # an idle query: zeros
    got = kernel(q, k, v, q_pos, k_pos, window)
    want = reference(q, kernel.held(k), kernel.held(v), q_pos, k_pos, window)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.allclose(got.double(), want, atol=2e-6, rtol=1e-5)
    assert torch.equal(got[1, :, 2], torch.zeros_like(got[1, :, 2]))


def test_order_reads_the_listed_slots_in_turn(kernel):
    """With `order`, token t reads the slots order[b, t] lists (up to -1): the result is attention over those
    keys gathered, in that order."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v, q_pos, k_pos = case(2, 4, 2, 3, 20, 32, gen)
    order = torch.full((2, 3, 20), -1, dtype=torch.int32)
    for b in range(2):
        for t in range(3):
            chosen = torch.randperm(20, generator=gen)[: 5 + 4 * t]
            order[b, t, : len(chosen)] = chosen.int()
    got = kernel(q, k, v, q_pos, k_pos, None, order)
    for b in range(2):
        for t in range(3):
            idx = order[b, t][order[b, t] >= 0].long()
            alone = kernel(q[b : b + 1, :, t : t + 1], k[b : b + 1, :, idx], v[b : b + 1, :, idx],
                                                 q_pos[b : b + 1, t : t + 1], k_pos[b : b + 1, idx], None)
            assert torch.equal(got[b, :, t], alone[0, :, 0])


@pytest.mark.parametrize("dim", [64, 40])
def test_a_token_is_computed_as_alone_whatever_surrounds_it(kernel, dim):
    """Bit for bit: each (row, token) of a batched call of several tokens equals a call of that row and token
    alone over only the slots up to its own position, and the invisible slots beyond change nothing."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, tokens, slots = 3, 5, 300
    q = torch.randn(batch, 9, tokens, dim, generator=gen)
    k, v = torch.randn(batch, 3, slots, dim, generator=gen), torch.randn(batch, 3, slots, dim, generator=gen)
    k_pos = torch.arange(slots).expand(batch, slots).clone()
    starts = torch.randint(20, slots - tokens, (batch,), generator=gen)
    k_pos[k_pos >= (starts + tokens)[:, None]] = -1
    q_pos = starts[:, None] + torch.arange(tokens)
    together = kernel(q, k, v, q_pos, k_pos, 64)
    for b in range(batch):
        for t in range(tokens):
            n = int(q_pos[b, t]) + 1
            alone = kernel(q[b : b + 1, :, t : t + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n],
                                                 q_pos[b : b + 1, t : t + 1], k_pos[b : b + 1, :n], 64)
            assert torch.equal(together[b, :, t], alone[0, :, 0]), (b, t)


@pytest.mark.parametrize("group, dim", [(4, 128), (3, 64), (2, 64), (5, 64)])
def test_heads_computed_together_equal_each_head_alone(kernel, group, dim):
    """A KV head's query heads share each key and value row read (up to 4 at once); every head's sums stay
    its own: the same bits as the head attending alone."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v, q_pos, k_pos = case(2, 2 * group, 2, 3, 45, dim, gen)
    together = kernel(q, k, v, q_pos, k_pos, 20)
    for h in range(2 * group):
        g = slice(h // group, h // group + 1)
        alone = kernel(q[:, h : h + 1], k[:, g], v[:, g], q_pos, k_pos, 20)
        assert torch.equal(together[:, h : h + 1], alone), h


def test_threads_and_the_pool_change_no_bit(kernel):
    """The (row, token, KV head) tiles split over 1, 2 or 3 threads of `cpu_pool`, or run without the pool,
    give the same bits, and every tile ran (no output left unwritten)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v, q_pos, k_pos = case(3, 8, 2, 5, 150, 64, gen)
    run = lambda: kernel(q, k, v, q_pos, k_pos, 64)  # noqa: E731
    results = [cpu_pool.decode_threads(run, threads)() for threads in (1, 2, 3)]
    kernel.lib.m7b_use_pool(None)  # the kernels' fallback: every tile on the calling thread
    try:
        results.append(run())
    finally:
        cpu_pool.attach(kernel.lib)
    assert all(torch.equal(r, results[0]) for r in results[1:])
    assert torch.allclose(results[0].double(), reference(q, kernel.held(k), kernel.held(v), q_pos, k_pos, 64), atol=2e-6, rtol=1e-5)


def test_float16_keys_and_values_take_their_own_library():
    """A float16 cache's keys and values go to the library built for them (this CPU's variant). Widening a
    half is exact, so it gives the float32 library's bits over the same values; bfloat16 is not taken."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v, q_pos, k_pos = case(2, 8, 2, 3, 60, 64, gen)
    k, v = k.half(), v.half()
    assert attention_cpu.supports(q, k, v) and not attention_cpu.supports(q, k.bfloat16(), v.bfloat16())
    assert not attention_cpu.supports(q.half(), k, v)
    got = attention_cpu.slot_attention(q, k, v, q_pos, k_pos, 16)
    mine = Kernel(attention_cpu.open_variant(cpu_variant(), torch.float16), torch.float16)
    assert torch.equal(got, mine(q, k, v, q_pos, k_pos, 16))
    wide = attention_cpu.slot_attention(q, k.float(), v.float(), q_pos, k_pos, 16)
    assert torch.equal(got, wide)


def test_switch_off_keeps_sdpa(monkeypatch):
    monkeypatch.setenv("MISTRAL7B_CPU_ATTENTION", "0")
    attention_cpu.library.cache_clear()
    try:
        q = torch.randn(1, 4, 1, 16)
        assert attention_cpu.library() is None and not attention_cpu.supports(q, q, q)
    finally:
        monkeypatch.delenv("MISTRAL7B_CPU_ATTENTION")
        attention_cpu.library.cache_clear()
    assert attention_cpu.supports(q, q, q)


@pytest.mark.parametrize("window", [None, 5])
def test_compiled_step_runs_the_kernel_as_one_op(window):
    """Under torch.compile (Inductor, fullgraph) the kernel is the opaque op mistral7b::slot_attention:
    the bits of the eager call, the op seen in the graph, not SDPA traced in its place."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v, q_pos, k_pos = case(2, 8, 2, 3, 40, 64, gen)
    traced = []

    def backend(gm, inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return torch._inductor.compile(gm, inputs)

    step = torch.compile(lambda *t: attention_cpu.slot_attention(*t, window) * 2.0, backend=backend, fullgraph=True)
    got = step(q, k, v, q_pos, k_pos)
    assert any(t.startswith("mistral7b.slot_attention") for t in traced), traced
    assert not any("attention" in t and "slot" not in t for t in traced), traced
    assert torch.equal(got, attention_cpu.slot_attention(q, k, v, q_pos, k_pos, window) * 2.0)


def test_built_is_a_compile_constant_without_importing_dynamo():
    """`built` carries what torch.compiler.assume_constant_result sets (and nothing else is set by it), so a
    compiled step takes it as a constant; importing the package does not import torch._dynamo (1.9 s)."""
    def plain():
        return True

    marked = torch.compiler.assume_constant_result(plain)
    assert {k: v for k, v in vars(marked).items()} == {"_dynamo_marked_constant": True}
    assert attention_cpu.built._dynamo_marked_constant is True
    q = torch.randn(1, 4, 1, 16)
    assert torch.compile(lambda t: attention_cpu.supports(t, t, t), backend="eager", fullgraph=True)(q)
    code = "import sys, mistral7b, mistral7b.cli; assert 'torch._dynamo' not in sys.modules, 'dynamo imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
