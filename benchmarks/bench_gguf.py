"""Random-weight GGUF files at a given llama shape, for benchmarks that need a model size and not a model.

The weights are written as quantized blocks directly, tensor by tensor (never as floats, never all in
memory at once): a Q4_0 block is an fp16 scale d ~ N(0, sigma) (random sign, so the weights have
mean zero) and 16 random bytes of nibbles; a Q8_0 block an fp16 scale and 32 random int8. Norms are
F32 ones. The tokenizer metadata is copied from another GGUF (the default model's), so our tokenizer
and llama.cpp's both read the file. The files are cached by shape in ~/.cache/mistral7b/bench/.

    python benchmarks/bench_gguf.py 1b     # writes (or finds) the file and prints its path
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    context: int = 4096
    rope_theta: float = 10000.0
    layer_type: str = "Q4_0"  # the attention and feed-forward matrices
    embd_type: str = "Q4_0"  # token_embd (a row gather per token)
    head_type: str = "Q8_0"  # output (read whole every token)
    more_bits_type: str | None = None  # llama.cpp's Q4_K_M: attn_v and ffn_down of some layers (`more_bits`)


SHAPES = {
    # TinyLlama-1.1B's shape (its vocabulary is replaced by the copied tokenizer's)
    "1b": Shape("1b", dim=2048, n_layers=22, hidden=5632, n_heads=32, n_kv_heads=4, context=2048),
    # Mistral-7B's shape, Q4_0 (about 3.8 GB)
    "7b": Shape("7b", dim=4096, n_layers=32, hidden=14336, n_heads=32, n_kv_heads=8, context=4096),
    # Mistral-7B's shape as llama.cpp's Q4_K_M mixes types (the most downloaded GGUF; about 4.4 GB)
    "7b-q4km": Shape("7b-q4km", dim=4096, n_layers=32, hidden=14336, n_heads=32, n_kv_heads=8, context=4096,
                     layer_type="Q4_K", embd_type="Q4_K", head_type="Q6_K", more_bits_type="Q6_K"),
    # a few MB, for tests
    "tiny": Shape("tiny", dim=128, n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, context=256),
}

BLOCK = 32
RECIPE = 2  # in the file name: a change to how the weights are drawn writes new files
# Scale sigmas: a weight's std is about 4.6 sigma in Q4_0 and 73 sigma in Q8_0. The layers' weights are
# small (std ~0.01); the embedding's are ~1 so that each position's token still shows through the
# residual stream at the last layer (else greedy decoding settles on one token and repeats it), and
# the head's ~0.1 so that greedy picks win by margins that numerical noise rarely flips.
BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210}
BLOCK_VALUES = {"Q4_0": 32, "Q8_0": 32, "Q4_K": 256, "Q6_K": 256}
LAYER_SIGMA = 0.02 / 8
SIGMAS = {"token_embd.weight": {"Q4_0": 1 / 4.6, "Q8_0": 1 / 73},
          "output.weight": {"Q4_0": 0.1 / 4.6, "Q8_0": 0.1 / 73}}
# K-quants: where the fp16 super-scales sit (d, and Q4_K's dmin), and a weight's std in units of d:
# Q4_K ~ d x sub-scale (0-63) x q (0-15), ~250; Q6_K ~ d x sub-scale (int8) x (q - 32), ~1,200. The same
# stds as above (0.0115 in the layers, 1 and 0.1 for the embedding and the head).
F16_AT = {"Q4_K": (0, 2), "Q6_K": (208,)}
SPREAD = {"Q4_K": 250, "Q6_K": 1200}
STDS = {"token_embd.weight": 1.0, "output.weight": 0.1}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistral7b" / "bench"


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: str, sigma: float) -> np.ndarray:
    """uint8 [rows, cols / 32 * block bytes]: GGUF blocks with random fp16 scales and random quants."""
    assert cols % BLOCK == 0, cols
    n = rows * cols // BLOCK
    size = BLOCK_BYTES[qtype]
    blocks = np.empty((n, size), dtype=np.uint8)
    blocks[:, :2] = rng.normal(0.0, sigma, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    quants = np.frombuffer(rng.bytes(n * (size - 2)), dtype=np.uint8).reshape(n, size - 2)
    if qtype == "Q8_0":
        quants = quants.view(np.int8).clip(-127, 127).view(np.uint8)  # int8 -128 is not produced by llama.cpp
    blocks[:, 2:] = quants
    return blocks.reshape(rows, -1)


def random_k_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: str, std: float) -> np.ndarray:
    """uint8 [rows, cols / 256 * block bytes]: K-quant blocks of random bytes (sub-scales and quants), with
    fp16 super-scales that give the weights about `std` (Q4_K's positive, as llama.cpp writes them)."""
    n = rows * cols // BLOCK_VALUES[qtype]
    blocks = np.frombuffer(rng.bytes(n * BLOCK_BYTES[qtype]), dtype=np.uint8).reshape(n, -1).copy()
    for at in F16_AT[qtype]:
        scale = rng.normal(0.0, std / SPREAD[qtype], n).astype(np.float16)
        blocks[:, at:at + 2] = (np.abs(scale) if qtype == "Q4_K" else scale).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


def layer_std(name: str) -> float:
    return STDS.get(name, 4.6 * LAYER_SIGMA)


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_plan(shape: Shape, vocab: int) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    """(name, numpy shape [rows, cols] or [n], type) for every tensor, in file order."""
    head_dim = shape.dim // shape.n_heads
    kv = shape.n_kv_heads * head_dim
    plan = [("token_embd.weight", (vocab, shape.dim), shape.embd_type)]
    for i in range(shape.n_layers):
        t = shape.layer_type
        more = shape.more_bits_type if shape.more_bits_type and more_bits(i, shape.n_layers) else t
        plan += [
            (f"blk.{i}.attn_norm.weight", (shape.dim,), "F32"),
            (f"blk.{i}.attn_q.weight", (shape.dim, shape.dim), t),
            (f"blk.{i}.attn_k.weight", (kv, shape.dim), t),
            (f"blk.{i}.attn_v.weight", (kv, shape.dim), more),
            (f"blk.{i}.attn_output.weight", (shape.dim, shape.dim), t),
            (f"blk.{i}.ffn_norm.weight", (shape.dim,), "F32"),
            (f"blk.{i}.ffn_gate.weight", (shape.hidden, shape.dim), t),
            (f"blk.{i}.ffn_up.weight", (shape.hidden, shape.dim), t),
            (f"blk.{i}.ffn_down.weight", (shape.dim, shape.hidden), more),
        ]
    plan += [("output_norm.weight", (shape.dim,), "F32"), ("output.weight", (vocab, shape.dim), shape.head_type)]
    return plan


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    if qtype == "F32":
        return 4 * int(np.prod(shape))
    rows, cols = shape
    return rows * cols // BLOCK_VALUES[qtype] * BLOCK_BYTES[qtype]


def read(path: Path):
    """A GGUF reader: this project's fast one (the stock reader takes seconds on a 49k vocabulary)."""
    try:
        from mistral7b.utils import read_gguf
    except ImportError:
        import gguf

        return gguf.GGUFReader(path)
    return read_gguf(path)


def copy_tokenizer(writer, source: Path) -> int:
    """Copies every tokenizer.* key of `source` into `writer`; returns the vocabulary size."""
    import gguf

    reader = read(source)
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
        if key == "tokenizer.ggml.tokens":
            vocab = len(field.data)
    return vocab


def add_metadata(writer, shape: Shape, vocab: int) -> None:
    import gguf

    writer.add_name(f"random llama {shape.name} ({shape.layer_type}, benchmarks/bench_gguf.py)")
    file_type = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M}[shape.layer_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(vocab)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.hidden)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_rope_dimension_count(shape.dim // shape.n_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)


def write(shape: Shape, path: Path, tokenizer_source: Path, seed: int = 0) -> None:
    """Writes the file to `path` (through a temporary name, so an interrupted write leaves no file)."""
    import gguf

    tmp = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(tmp, "llama")
    vocab = copy_tokenizer(writer, tokenizer_source)
    add_metadata(writer, shape, vocab)
    plan = tensor_plan(shape, vocab)
    for name, dims, qtype in plan:
        if qtype == "F32":
            writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes(dims, qtype))
        else:
            raw = (dims[0], dims[1] // BLOCK_VALUES[qtype] * BLOCK_BYTES[qtype])
            writer.add_tensor_info(name, raw, np.dtype(np.uint8), nbytes(dims, qtype),
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims, qtype in plan:
        if qtype == "F32":
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        else:
            if qtype in F16_AT:
                writer.write_tensor_data(random_k_blocks(rng, dims[0], dims[1], qtype, layer_std(name)))
            else:
                sigma = SIGMAS.get(name, {}).get(qtype, LAYER_SIGMA)
                writer.write_tensor_data(random_blocks(rng, dims[0], dims[1], qtype, sigma))
    writer.close()
    tmp.rename(path)


def ensure(name: str, tokenizer_source: Path | None = None, directory: Path | None = None) -> Path:
    """The cached file for shape `name`, written first if missing."""
    if tokenizer_source is None:
        from mistral7b.default_model import default_model_path

        tokenizer_source = default_model_path()
    shape = SHAPES[name]
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"random-llama-{name}-{shape.layer_type}-r{RECIPE}.gguf"
    if not path.is_file():
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write(shape, path, tokenizer_source)
    return path


def weight_bytes_per_token(path: Path) -> int:
    """Tensor bytes one decode step reads: all tensors, less the token embedding unless it is also the
    head (tied), where a step reads only one row of it."""
    tensors = read(path).tensors
    names = {t.name for t in tensors}
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or "output.weight" not in names)


if __name__ == "__main__":
    print(ensure(sys.argv[1] if len(sys.argv) > 1 else "1b"))
