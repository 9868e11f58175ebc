"""Memory and FLOP arithmetic for a model config: pure functions, no tensors.

KV cache: `2 (K,V) x n_layers x n_kv_heads x head_dim x bytes x tokens x batch`. A layer with a
sliding window W keeps a rolling buffer of `min(tokens, W)` positions; one without keeps all of them.
For Mistral 7B v0.1 in bf16 that is 128 KiB per token with GQA (8 KV heads) against 512 KiB with
MHA (32), 4 GiB at 32k tokens, and a flat 0.5 GiB with the W = 4096 rolling buffer.

Attention FLOPs of a prefill over n tokens, counting the two matmuls QK^T and PV at 2 FLOPs per
multiply-add each: `4 x n_layers x n_heads x head_dim x K`, where K counts the (query, key) pairs
that are attended: `K = sum_{i<n} (i+1) = n(n+1)/2` with full causal attention, and
`K = sum_{i<n} min(i+1, W)` with a window of W (query i sees keys i-W < j <= i).

Receptive field: after k layers a token can draw on information up to k x W positions back, so the
last layer reaches n_layers x W tokens (32 x 4096 = 131072 for v0.1).
"""

from __future__ import annotations

from .config import ModelConfig

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """Binary units, exact where the figure is: 131072 -> '128 KiB', 2**29 -> '512 MiB'."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text} {_UNITS[unit]}"


def format_count(n: float) -> str:
    """Decimal SI prefixes for counts of parameters and FLOPs: 7241732096 -> '7.24 G'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}"
    return f"{n:g} "


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2, n_kv_heads: int | None = None) -> int:
    """Bytes of K and V that one token adds over all layers: 2 x n_layers x n_kv_heads x head_dim x bytes."""
    return 2 * config.n_layers * (n_kv_heads or config.n_kv_heads) * config.head_dim * dtype_bytes


def cached_positions(config: ModelConfig, seq_len: int, rolling: bool = True) -> list[int]:
    """Positions each layer holds for a sequence of `seq_len` tokens: min(seq_len, W) with a rolling
    buffer on a windowed layer, else seq_len."""
    return [min(seq_len, w) if rolling and w is not None else seq_len for w in config.layer_windows()]


def kv_cache_bytes(
    config: ModelConfig,
    seq_len: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    n_kv_heads: int | None = None,
    rolling: bool = False,
) -> int:
    """KV cache bytes for `batch` sequences of `seq_len` tokens; `rolling` uses the window's buffer,
    `n_kv_heads` overrides the config's (n_heads gives the MHA figure)."""
    per_position = 2 * (n_kv_heads or config.n_kv_heads) * config.head_dim * dtype_bytes
    return batch * per_position * sum(cached_positions(config, seq_len, rolling))


def attended_pairs(seq_len: int, window: int | None) -> int:
    """(query, key) pairs of a causal prefill over `seq_len` tokens: sum_{i<n} min(i+1, W)."""
    n = seq_len
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def attention_flops(config: ModelConfig, seq_len: int, batch: int = 1, windowed: bool = True) -> int:
    """FLOPs of the QK^T and PV matmuls in a prefill of `seq_len` tokens:
    4 x n_heads x head_dim x attended_pairs, summed over layers (each layer with its own window)."""
    per_pair = 4 * config.n_heads * config.head_dim
    return batch * per_pair * sum(attended_pairs(seq_len, w if windowed else None) for w in config.layer_windows())


def decode_attention_flops(config: ModelConfig, position: int, windowed: bool = True) -> int:
    """FLOPs of QK^T and PV for one new token at `position` (0-based): it attends min(position+1, W) keys."""
    per_key = 4 * config.n_heads * config.head_dim
    return per_key * sum(min(position + 1, w) if windowed and w is not None else position + 1 for w in config.layer_windows())


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: every linear layer and the output head
    (the embedding table is a lookup unless it is tied to the head; norms are elementwise)."""
    c = config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    ffn = 3 * c.dim * c.hidden_dim
    return c.n_layers * (attn + ffn) + c.vocab_size * c.dim


def linear_flops_per_token(config: ModelConfig) -> int:
    """2 FLOPs per multiply-add of every weight a token passes through (attention scores excluded)."""
    return 2 * matmul_params(config)


def receptive_field(config: ModelConfig) -> int | None:
    """Tokens back that the last layer can draw on: n_layers x W (sum of windows); None if some layer
    has full attention (then it is the whole sequence)."""
    windows = config.layer_windows()
    if any(w is None for w in windows):
        return None
    return sum(windows)


def weight_bytes(config: ModelConfig) -> dict[str, int]:
    """Bytes of the weights by storage type (n_params x bytes per parameter; int4 packs two per byte)."""
    n = config.n_params
    return {"float32": 4 * n, "bfloat16": 2 * n, "float16": 2 * n, "int8": n, "int4": n // 2}


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every block linear as the model stores them (fused as the weight map says), all layers."""
    from .weights import module_shapes

    return [shape for module, shape in module_shapes(config).items() if module.startswith("layers.")]


def quantized_linear_bytes(n: int, k: int, method: str, group_size: int | None, device: str = "cuda") -> int:
    """Resident bytes of one [n, k] linear as our quantized modules hold it on `device`:
    int4: two values per byte plus a bf16 scale and zero per group (rows padded to the kernel's
    block: 8 on CUDA, 16 on CPU), in the largest supported group size up to `group_size` that
    divides k (as the loader picks it); int8: one byte per value plus one bf16 scale per row. On a CPU
    running cpu_kernels (int8 activations, the default), a matrix whose width and groups fall on blocks
    of 32 holds its values unpadded plus a float16 scale (int4: and offset) per block of 32."""
    from .quant import cpu_kernels
    from .quant.config import fitting_group_size

    group = (fitting_group_size(k, group_size) or group_size) if method == "int4" else k
    if device == "cpu" and cpu_kernels.supports(k, group):
        per_block = 2 if method == "int4" else 1
        return (n * k // 2 if method == "int4" else n * k) + n * (k // cpu_kernels.BLOCK) * 2 * per_block
    if method == "int4":
        rows = -(-n // (8 if device == "cuda" else 16)) * (8 if device == "cuda" else 16)
        return rows * k // 2 + (k // group) * rows * 2 * 2
    return n * k + n * 2


def quantized_weight_bytes(config: ModelConfig, method: str, group_size: int | None = 128,
                           quantize_head: bool = True, dtype_bytes: int = 2, device: str = "cuda") -> dict[str, int]:
    """Weight bytes with the block linears (and the head, unless `quantize_head=False`) quantized to
    "int8" (per channel) or "int4" (groups of `group_size`); embeddings and norms in `dtype_bytes`.
    A tied head quantized is a second copy of the table. Mistral 7B int4 g128: 3.76 GiB."""
    group = group_size if method == "int4" else None
    linears = sum(quantized_linear_bytes(n, k, method, group, device) for n, k in linear_shapes(config))
    table = config.vocab_size * config.dim
    if quantize_head:
        head = quantized_linear_bytes(config.vocab_size, config.dim, method, group, device)
    else:
        head = 0 if config.tie_embeddings else table * dtype_bytes
    norms = (2 * config.n_layers + 1) * config.dim * dtype_bytes
    out = {"linears": linears, "head": head, "embeddings": table * dtype_bytes, "norms": norms}
    out["total"] = sum(out.values())
    return out


def ffn_params(config: ModelConfig) -> int:
    return config.n_layers * 3 * config.dim * config.hidden_dim


def attention_params(config: ModelConfig) -> int:
    return config.n_layers * config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)


def report(config: ModelConfig, seq_lens: list[int], batch: int = 1, dtype_bytes: int = 2, quant=None) -> dict:
    """Everything the `memory` command shows, as plain numbers (bytes, FLOPs, tokens); with `quant`
    (a mistral7b.quant.QuantConfig) also "quantized_weight_bytes" for that format."""
    windows = config.layer_windows()
    distinct = sorted({w for w in windows if w is not None})
    rows = []
    for n in seq_lens:
        gqa = kv_cache_bytes(config, n, batch, dtype_bytes)
        rolling = kv_cache_bytes(config, n, batch, dtype_bytes, rolling=True)
        full = attention_flops(config, n, batch, windowed=False)
        windowed = attention_flops(config, n, batch, windowed=True)
        rows.append(
            {
                "seq_len": n,
                "kv_cache_bytes": {
                    "mha": kv_cache_bytes(config, n, batch, dtype_bytes, n_kv_heads=config.n_heads),
                    "gqa": gqa,
                    "gqa_rolling": rolling,
                },
                "rolling_saving": gqa / rolling,
                "attention_flops": {"full": full, "window": windowed},
                "attention_flops_ratio": full / windowed,
                "decode_attention_flops_at_end": {
                    "full": batch * decode_attention_flops(config, n - 1, windowed=False),
                    "window": batch * decode_attention_flops(config, n - 1, windowed=True),
                },
                "linear_flops": batch * n * linear_flops_per_token(config),
            }
        )
    return {
        "config": config.to_dict(),
        "batch": batch,
        "dtype_bytes": dtype_bytes,
        "n_params": config.n_params,
        "params": {
            "attention": attention_params(config),
            "feed_forward": ffn_params(config),
            "embeddings": config.vocab_size * config.dim * (1 if config.tie_embeddings else 2),
        },
        "weight_bytes": weight_bytes(config),
        **({"quantized_weight_bytes": {"format": quant.label, **quantized_weight_bytes(
            config, quant.method, quant.group_size, quant.quantize_head, dtype_bytes)}} if quant is not None else {}),
        "kv_bytes_per_token": {
            "mha": batch * kv_bytes_per_token(config, dtype_bytes, config.n_heads),
            "gqa": batch * kv_bytes_per_token(config, dtype_bytes),
        },
        "windows": distinct,
        "receptive_field": receptive_field(config),
        "linear_flops_per_token": linear_flops_per_token(config),
        "seq_lens": rows,
        "formulas": {
            "kv_cache": "2 (K,V) x n_layers x n_kv_heads x head_dim x bytes x tokens x batch; "
            "a rolling buffer holds min(tokens, W) positions per windowed layer",
            "attention_flops": "4 x n_layers x n_heads x head_dim x pairs x batch (QK^T and PV, 2 FLOPs per multiply-add); "
            "pairs = sum_{i<n} (i+1) = n(n+1)/2 for full causal attention, sum_{i<n} min(i+1, W) with a window",
            "receptive_field": "n_layers x W",
            "linear_flops": "2 x (weights in matmuls) per token",
        },
    }
