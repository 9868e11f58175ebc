"""Rebuild the vocabulary embedded in a GGUF file as a `tokenizers` model, after transformers' GGUF
converter (integrations/gguf/gguf_tokenizer_mapping.py), with llama.cpp's pre-tokenizer choices."""

from __future__ import annotations

import os
from pathlib import Path

from .backends import TokenizerError
from .detokenize import bytes_to_unicode

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> the split regex that goes before byte-level BPE. "digits" is the StarCoder
# family (SmolLM's tokenizer included): every digit on its own, then GPT-2's regex, as llama.cpp does.
GGUF_PRE_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell"], "digits"),
}


def _gguf_byte_level(meta):
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE from the file's tokens and merges."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written in plain text rather than the byte alphabet gets respelled, as HF does.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or ()]
    hf = HFTokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                fuse_unk=False))
    split = GGUF_PRE_SPLITS.get(meta.get("pre"))
    if split == "digits":
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif split is not None:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # "gpt2", "default" and others: GPT-2's own regex
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf, alphabet


def _sentencepiece_merges(tokens, scores):
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best-scored result first (transformers' `generate_merges`, which is how SentencePiece BPE ranks)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gguf_sentencepiece(meta):
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback, as HF's LlamaTokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    tokens = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ([tuple(m.split(" ", 1)) for m in meta["merges"]] if meta.get("merges")
              else _sentencepiece_merges(tokens, meta.get("scores") or [0.0] * len(tokens)))
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix_space = meta.get("add_space_prefix", True)  # SentencePiece's add_dummy_prefix
    # Spaces become "▁" in a normalizer, with one "▁" put in front, as in Mistral's own tokenizer.json.
    # (HF's GGUF converter uses Metaspace(prepend_scheme="first"), which adds no "▁" to text that
    # already starts with a space: " hi" -> "▁hi" where SentencePiece and llama.cpp give "▁▁hi".)
    steps = [normalizers.Prepend("▁")] if prefix_space else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    return hf, None


def _gguf_metadata(reader, path) -> dict | None:
    """The tokenizer.* keys of a GGUF, short names ("tokens", "bos_token_id"...); None if it has no vocab."""
    from gguf import GGUFValueType

    def value(field):
        parts = [field.parts[i] for i in field.data]
        if field.types[-1] == GGUFValueType.STRING:
            parts = [bytes(p).decode("utf-8") for p in parts]
        else:
            parts = [p.tolist()[0] for p in parts]
        return parts if field.types[0] == GGUFValueType.ARRAY else parts[0]

    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        return None
    meta = {k.removeprefix("tokenizer.ggml."): value(f) for k, f in fields.items() if k.startswith("tokenizer.ggml.")}
    if "tokenizer.chat_template" in fields:
        meta["chat_template"] = value(fields["tokenizer.chat_template"])
    return meta


def _open_reader(source):
    """(reader, path) of a GGUF path, or of a `gguf.GGUFReader` already open."""
    if isinstance(source, (str, os.PathLike)):
        from ..utils import read_gguf as read  # shares the reader the model loader opened

        path = Path(source)
        try:
            reader = read(path)
        except Exception as e:  # bad magic, truncation, nonsense sizes: all surface as assorted errors
            raise TokenizerError(f"{path}: not a valid GGUF file ({e})") from e
    else:
        reader, path = source, Path(getattr(getattr(source, "data", None), "filename", None) or "<gguf>")
    return reader, path


def gguf_tokenizer_args(source) -> dict | None:
    """Keyword arguments of a `Tokenizer` rebuilt from a GGUF's vocabulary; None if it has none."""
    from tokenizers import AddedToken

    reader, path = _open_reader(source)
    try:
        meta = _gguf_metadata(reader, path)
        if meta is None:
            return None
        kind = meta.get("model")
        builders = {"gpt2": _gguf_byte_level, "llama": _gguf_sentencepiece}
        if kind not in builders:
            raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")
        hf, byte_alphabet = builders[kind](meta)
        tokens, types = meta["tokens"], meta.get("token_type") or ()
        # Control tokens (type 3: <|im_start|>, </s>) become special tokens, so chat text containing them
        # encodes each as one id and decode() drops them. In a byte-level vocabulary one spelled outside
        # the byte alphabet is a llama.cpp mislabel; HF skips those, so do we. User-defined ones (type 4)
        # are matched whole but are not special.
        hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, token_type in zip(tokens, types)
                               if token_type == 3 and (byte_alphabet is None or set(t) <= byte_alphabet)])
        hf.add_tokens([AddedToken(t, normalized=False, special=False) for t, token_type in zip(tokens, types)
                       if token_type == 4])
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"{path}: corrupt GGUF tokenizer metadata ({type(e).__name__}: {e})") from e
    bos_id, eos_id = meta.get("bos_token_id"), meta.get("eos_token_id")
    # llama.cpp adds BOS to SentencePiece vocabularies that don't say otherwise; HF follows it.
    add_bos = meta.get("add_bos_token", kind == "llama")
    bos_token, eos_token = (tokens[i] if i is not None and 0 <= i < len(tokens) else "" for i in (bos_id, eos_id))
    if hasattr(reader, "release_pages"):  # the vocabulary is read last, after the weights were loaded
        reader.release_pages()
    return dict(name=path, hf=hf, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos),
                chat_template=meta.get("chat_template"), bos_token=bos_token, eos_token=eos_token)
