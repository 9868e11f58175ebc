"""The Mistral 7B transformer: GQA + sliding-window attention, RoPE, RMSNorm, SwiGLU.

Weights use one internal layout whatever the checkpoint: q/k rows in HF's rotate-half order, and the
projections fused (QKV in one matrix, SwiGLU's gate and up in another) so that decode reads each
layer's activations once. Loaders convert at load time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_fused
from .attention import attention, check_decode_kernel
from .cache import KVCache
from .config import ModelConfig
from .utils import own_code

# One-row decode graphs compile with Inductor's coordinate-descent tuning, as gpt-fast's do: a one-row
# matmul then becomes Inductor's own tuned mat-vec, fused with its neighbours, instead of cuBLAS's split-K
# and reduce. H100, 2026-12-05, 7B shape: b1 decode 168.2 -> 181.4 tok/s; b8 1,319 -> 1,308 (no one-row
# matmul there), so wider graphs keep the shorter compile.
SINGLE_ROW_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


def fused(cpu=None):
    """On CUDA, compile an elementwise chain into one kernel: eagerly it is several passes over
    memory, which shows in prefill. On a CPU, eagerly, `cpu` (a `cpu_fused` function, None where it
    does not apply) does it in one call: there each op's dispatch is what costs. Inside an outer
    torch.compile it is simply traced. Each kind of CUDA call (dtypes, which sizes are 1: dynamo
    specialises both) gets a code object of its own, so that several models and dtypes in one process
    never reach dynamo's recompile limit of 8 a code object (the smoke suite did, on an H100, 2026-12-06)."""

    def decorate(fn):
        compiled = {}

        @functools.wraps(fn)
        def wrapper(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            if args[0].is_cuda:
                kind = tuple((a.dtype, tuple(n == 1 for n in a.shape)) for a in args if isinstance(a, Tensor))
                if kind not in compiled:
                    compiled[kind] = torch.compile(own_code(fn), dynamic=True)
                return compiled[kind](*args)
            out = None if cpu is None else cpu(*args)
            return fn(*args) if out is None else out

        return wrapper

    return decorate


@fused(cpu=cpu_fused.rms_norm)
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in fp32 and cast back before the weight, as the reference implementations do.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin tables [B, 1, T, head_dim] in fp32, computed from positions so any
    position works; `apply_rope` multiplies by them as they are (no per-layer reshaping)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


@fused(cpu=cpu_fused.apply_rope)
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x [B, H, T, hd], in fp32: x * cos + rotate_half(x) * sin, with rotate_half's
    sign folded into the sin table (the same products, bit for bit)."""
    x32 = x.float()
    return (x32 * cos + x32.roll(x32.shape[-1] // 2, dims=-1) * sin).type_as(x)


@dataclass
class AttentionInputs:
    """What every layer's attention reads in one forward pass, built once in `Transformer.forward`
    (mistral-inference's `CacheInputMetadata`): token positions [B, T], the rope tables, the cache rows
    of these sequences, kv_len (1 + the largest position held after this pass, or None), each row's
    LoRA slot (a lora.AdapterRows, or None: the base model), and a memo that lets layers share what
    depends on positions alone: cache slots, key positions and masks. `packed`: a ragged batch's tokens
    (`Transformer.forward`), or None."""

    positions: Tensor
    rope: tuple[Tensor, Tensor]
    rows: slice | Tensor
    kv_len: int | None
    decode_kernel: str = "flash"
    adapters: object = None
    invariant: bool = False  # batch_invariant.apply: attention whose arithmetic ignores the other rows
    packed: Tensor | None = None
    memo: dict = field(default_factory=dict)


def unpacked(x: Tensor, packed: Tensor, slots: int) -> Tensor:
    """A ragged batch's rows x [N, 1, F] placed at their indices `packed` in a [slots, F] grid, zeros
    elsewhere (padding: `Transformer.forward`)."""
    return x.new_zeros(slots, x.shape[-1]).index_copy_(0, packed, x.reshape(-1, x.shape[-1]))


def check_packed(packed: Tensor | None, cache, last_only: bool) -> None:
    """A ragged batch (`Transformer.forward`'s `packed`) runs against a cache and returns every logit."""
    if packed is not None and (cache is None or last_only):
        raise ValueError("a packed (ragged) batch needs a cache and all its logits")


def project(linear: nn.Module, x: Tensor, adapters) -> Tensor:
    """linear(x), plus each row's LoRA delta when this forward runs adapters (the linear is then a
    lora.LoRALinear): the slots are an argument, not state, so a compiled step sees them as an input."""
    return linear(x) if adapters is None else linear(x, adapters)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = window
        self.wqkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Tensor parallelism (mistral7b.parallel) swaps in an all-reduce of the ranks' partial sums.
        self.reduce: nn.Module = nn.Identity()

    def forward(self, x: Tensor, inputs: AttentionInputs, cache) -> Tensor:
        positions, memo, packed = inputs.positions, inputs.memo, inputs.packed
        batch, t = positions.shape
        heads, kv_heads = self.n_heads, self.n_kv_heads
        qkv = project(self.wqkv, x, inputs.adapters)
        if packed is not None:
            qkv = unpacked(qkv, packed, batch * t)
        qkv = qkv.view(batch, t, heads + 2 * kv_heads, self.head_dim).transpose(1, 2)
        # One rotation for the q and k heads together: at batch 1 on a CPU each op's dispatch costs
        # about as much as its arithmetic, so half the calls is what counts.
        q, k = apply_rope(qkv[:, : heads + kv_heads], *inputs.rope).split([heads, kv_heads], dim=1)
        v = qkv[:, heads + kv_heads :]
        if cache is None:
            out = attention(q, k, v, positions, positions, self.window, self_only=True, memo=memo)
        else:
            # kv_len == t: the sequence starts here, so the keys are exactly these tokens.
            k, v, k_pos = cache.update(k, v, positions, inputs.rows, inputs.kv_len, memo)
            out = attention(q, k, v, positions, k_pos, self.window, self_only=inputs.kv_len == t, memo=memo,
                            decode_kernel=inputs.decode_kernel, invariant=inputs.invariant, cache_slots=cache.size,
                            written_first=cache.writes_first(positions))
        out = out.transpose(1, 2).reshape(batch, t, heads * self.head_dim)
        if packed is not None:
            out = out.view(batch * t, 1, -1)[packed]
        return self.reduce(project(self.wo, out, inputs.adapters))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 stored as one matrix `w13`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.reduce: nn.Module = nn.Identity()  # an all-reduce under tensor parallelism

    def forward(self, x: Tensor, adapters=None) -> Tensor:
        return self.reduce(project(self.w2, swiglu(project(self.w13, x, adapters)), adapters))


@fused()
def swiglu(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, window)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache) -> Tensor:
        h = x + self.attention(self.attention_norm(x), inputs, cache)
        return h + self.feed_forward(self.ffn_norm(h), inputs.adapters)


def embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """nn.Embedding, left uninitialised when built on the meta device (loading): initialising a meta
    tensor means nothing, and meta `normal_` imports torch._dynamo, seconds on a small CPU."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    return nn.Embedding(vocab_size, dim)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, w) for w in config.layer_windows())
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.decode_kernel = "flash"  # CUDA decode attention (attention.check_decode_kernel)
        self.lora = None  # a lora.LoRABank once adapters are enabled (lora.enable_lora)

    tensor_parallel_size = 1  # parallel.TensorParallelModel: the ranks it is split over
    batch_invariant = False  # set by batch_invariant.apply (CUDA)
    tune_single_row = True  # compile_decode's one-row CUDA graphs with SINGLE_ROW_OPTIONS (benchmarks turn it off)

    def new_cache(self, max_batch: int = 1, device=None, dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = None, spare_slots: int = 0) -> KVCache:
        """A KV cache for this model (KVCache's arguments; a tensor-parallel model's is sharded)."""
        return KVCache(self.config, max_batch, device, dtype, max_seq_len, spare_slots)

    def compile_decode(self, cache: KVCache, mode: str | None = None, backend: str = "inductor"):
        """The decode step `(tokens [B, 1], positions [B, 1], kv_len, adapters=None) -> logits` over all
        of `cache`'s rows, compiled: the cache keeps fixed addresses, so CUDA graphs (mode
        "reduce-overhead") update it in place. dynamic=None: after a second kv_len the length becomes
        symbolic (one recompile), and graphs are then recorded per kv_len without compiling again
        (the per-forward memo's keys must not hash it). Each power-of-two width of rows compiles once;
        with CUDA graphs, one row compiles apart with SINGLE_ROW_OPTIONS (`tune_single_row`)."""
        # Widths 1, 2, 4, ... max_batch, plus kv_len turning symbolic: past dynamo's default limit of 8
        # at 128 rows, where the step would fail (fullgraph) instead of compiling.
        widths = max(cache.max_batch - 1, 0).bit_length() + 1
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, widths + 4)
        for layer in cache.layers:
            for t in (layer.k, layer.v, layer.pos):
                torch._dynamo.mark_static_address(t)
        if self.lora is not None:
            self.lora.mark_static()

        def decode(tokens: Tensor, positions: Tensor, kv_len: int, adapters: Tensor | None = None) -> Tensor:
            return self(tokens, positions, cache, rows=slice(0, tokens.shape[0]), kv_len=kv_len, adapters=adapters)

        step = torch.compile(own_code(decode), mode=mode, backend=backend, fullgraph=True)
        if not (self.tune_single_row and mode == "reduce-overhead" and backend == "inductor"
                and not self.batch_invariant):  # tuning picks tiles per graph: the invariant mode fixes them
            return step
        single_row = torch.compile(own_code(decode), options=SINGLE_ROW_OPTIONS, fullgraph=True)

        def by_width(tokens: Tensor, positions: Tensor, kv_len: int, adapters: Tensor | None = None) -> Tensor:
            return (single_row if tokens.shape[0] == 1 else step)(tokens, positions, kv_len, adapters)

        return by_width

    def use_decode_kernel(self, name: str) -> None:
        """Switch CUDA decode's attention kernel; before compiling (benchmarks compare them)."""
        self.decode_kernel = check_decode_kernel(name)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        rows: slice | Tensor | None = None,
        kv_len: int | None = None,
        last_only: bool = False,
        adapters: Tensor | None = None,
        packed: Tensor | None = None,
    ) -> Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with `last_only`).

        Without a cache, positions are 0..T-1 and attention is causal over the tokens given. With one,
        `positions` [B, T] say where each token sits, `rows` which cache rows hold these sequences (a
        slice or an index tensor), and
        `kv_len` (optional) 1 + the largest position held after this call, so short sequences read
        only the leading cache slots. `adapters` [B] (a device tensor) is each row's LoRA slot, 0 for
        none, handed to every linear with the other per-forward inputs (None: the base model alone).

        A ragged batch (a speculative verify whose rows have drafts of different lengths) gives `packed`,
        the indices into the flattened [B * T] grid of the tokens that run. They go through the linears
        as N rows of one token, so padding costs no matmul row (on a CPU each row is paid for); attention
        sees the grid. Padding's queries, keys and values are zeros, its logits too. Its
        positions follow its row's tokens, so it is written to the cache as a verify's rejected tokens
        are, to be forgotten as theirs are (`KVCache.forget_rows`): at -1, a row's padding and tokens
        could write one slot in one scatter.
        """
        batch, t = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(t, device=tokens.device).expand(batch, t)
        check_packed(packed, cache, last_only)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        if adapters is not None:
            if self.lora is None:
                raise ValueError("adapters given, but this model has no LoRA slots (lora.enable_lora)")
            adapters = self.lora.rows(adapters if packed is None else adapters[packed // t])
        rows = slice(0, batch) if rows is None else rows
        inputs = AttentionInputs(positions, rope, rows, kv_len, self.decode_kernel, adapters,
                                 invariant=self.batch_invariant, packed=packed)
        cache_layers = cache.layers if cache is not None else [None] * len(self.layers)
        x = self.tok_embeddings(tokens if packed is None else tokens.reshape(-1, 1)[packed])
        for layer, layer_cache in zip(self.layers, cache_layers):
            x = layer(x, inputs, layer_cache)
        if last_only:
            x = x[:, -1:]
        logits = project(self.output, self.norm(x), adapters).float()
        return logits if packed is None else unpacked(logits, packed, batch * t).view(batch, t, -1)

