"""Tokenizers and chat templates.

One `Tokenizer` class over two real backends:

* `sentencepiece` for Mistral's own `tokenizer.model*` files, with Mistral's chat format built in
  (token-exact with mistral-common's `encode_chat_completion`, tokenizer v1 and v2/v3);
* `tokenizers` for a Hugging Face `tokenizer.json`, and for the vocabulary embedded in a GGUF file,
  which is rebuilt into a `tokenizers` model the way transformers' GGUF converter does it. These
  carry a Jinja chat template, rendered in a sandbox because it comes from a file.

`StreamDecoder` turns a stream of ids into text pieces that are final, for printing as they come.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path

GUARDRAIL_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)

# Tokens that end an assistant turn in common chat formats. Generation stops on them as on EOS,
# when the tokenizer has them and its chat template writes them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class TokenizerError(ValueError):
    """A tokenizer file that is missing, of unknown format, or corrupt."""


def with_safe_prompt(messages: list[dict]) -> list[dict]:
    """The conversation with the guardrail prompt of the Mistral 7B paper (section 5) in front.

    Like the Mistral API's `safe_prompt`, the guardrail goes before the system prompt: it joins an
    existing first system message ("GUARDRAIL\\n\\nSYSTEM", the "\\n\\n" mistral-common uses to join
    system prompts) instead of adding a second system message, which templates that allow only one
    system message would reject.
    """
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = GUARDRAIL_PROMPT + "\n\n" + messages[0]["content"]
        return messages
    return [{"role": "system", "content": GUARDRAIL_PROMPT}, *messages]


class Tokenizer:
    """Text <-> token ids, plus the chat format of the model the tokenizer belongs to."""

    def __init__(self, name, *, sp=None, hf=None, bos_id=None, eos_id=None, add_bos=True,
                 chat_template=None, bos_token="", eos_token="", extra_stop_ids=()):
        self.name = str(name)  # the file it came from, for messages
        self._sp, self._hf = sp, hf
        self._byte_ids, self._special_ids = set(), set()
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template, self.bos_token, self.eos_token = chat_template, bos_token, eos_token
        if sp is not None:
            self.vocab_size = sp.get_piece_size()
            inst = sp.piece_to_id("[INST]")
            # v2/v3 made [INST] a control token; v1 spells it out as text ("▁[INST]").
            self.mistral_version = "v3" if inst != sp.unk_id() and sp.is_control(inst) else "v1"
        else:
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
            self.mistral_version = None
            if getattr(hf.model, "byte_fallback", False):
                # HF's ByteFallback decoder turns a whole run of <0xXX> tokens into one "\ufffd" per byte
                # as soon as the run is not valid UTF-8, so a later byte can change the text of earlier
                # ones (skipped special tokens don't end a run). The stream decoder waits for runs to end.
                self._byte_ids = {i for t, i in hf.get_vocab().items() if len(t) == 6 and t.startswith("<0x")}
                self._special_ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        stops = {eos_id, *extra_stop_ids}
        for token in END_OF_TURN_TOKENS if chat_template else ():
            if token in chat_template and self.token_to_id(token) is not None:
                stops.add(self.token_to_id(token))
        self.stop_token_ids: set[int] = {i for i in stops if i is not None}

    def __repr__(self):
        backend = f"sentencepiece {self.mistral_version}" if self._sp is not None else "tokenizers"
        return f"Tokenizer({self.name!r}, {backend}, vocab_size={self.vocab_size})"

    # ---- loading ----------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """Load a SentencePiece model, a tokenizer.json, a GGUF file, or a model folder holding one."""
        tokenizer = cls.from_source(path)
        if tokenizer is None:
            raise TokenizerError(f"{path}: no tokenizer found (looked for tokenizer.json, tokenizer.model*, "
                                 "or a GGUF vocabulary)")
        return tokenizer

    @classmethod
    def from_source(cls, path) -> "Tokenizer | None":
        """Like `from_file`, but `None` where the folder or GGUF simply holds no tokenizer."""
        path = Path(path)
        if path.is_dir():
            found = _find_in_folder(path)
            return None if found is None else cls.from_source(found)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such file or folder")
        if _is_gguf(path):
            return cls.from_gguf(path)
        if path.suffix == ".json":
            return _load_tokenizer_json(cls, path)
        if ".model" in path.name:
            return _load_sentencepiece(cls, path)
        raise TokenizerError(f"{path}: unknown tokenizer format (expected a SentencePiece .model, "
                             "a tokenizer.json or a .gguf file)")

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer | None":
        """The tokenizer embedded in a GGUF file (a path, or a `gguf.GGUFReader` already open on it)."""
        return _load_gguf(cls, source)

    # ---- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first if asked for and this tokenizer uses one (`add_bos`).

        SentencePiece models treat the text literally ("[INST]" in user text is not a control token),
        as mistral-common does; `tokenizers` ones match their added special tokens, as HF does.
        """
        ids = self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, leaving out special and control tokens (<s>, </s>, [INST], <|im_end|>...)."""
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        if self._sp is not None:
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        return self._hf.token_to_id(token)

    def decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # ---- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in this model's chat format, ready for the reply to follow."""
        if self._sp is not None:
            return self._mistral_chat(messages, add_generation_prompt)
        if not self.chat_template:
            raise ValueError(f"this tokenizer has no chat template ({self.name})")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text, bos=False)  # the template writes BOS itself if the model wants one

    def _mistral_chat(self, messages, add_generation_prompt):
        """Mistral's instruct format, as mistral-common's InstructTokenizerV1 / V3 write it.

        v1: `<s>▁[INST]▁{system}\\n\\n{user}▁[/INST]▁{reply}</s>...`, system prompt in the FIRST user turn.
        v3: `<s>[INST]▁{user}[/INST]▁{reply}</s>...`, [INST] control tokens, system prompt in the LAST
        user turn, trailing spaces of replies dropped.
        """
        sp = self._sp
        if sp.piece_to_id("[SYSTEM_PROMPT]") != sp.unk_id():
            raise ValueError(f"{self.name}: Mistral tokenizer v7+ ([SYSTEM_PROMPT]) chat format is not supported")
        system, turns = [], []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {role!r}: expected 'system', 'user' or 'assistant'")
            if not isinstance(content, str) or (role != "user" and not content):
                raise ValueError(f"a {role} message needs text content, got {content!r}")
            if role == "system":
                system.append(content)
                continue
            expected = ("user", "assistant")[len(turns) % 2]
            if role != expected:
                raise ValueError(f"chat roles must alternate user/assistant/user/... (system messages aside); "
                                 f"message {len(turns) + len(system)} is {role!r} where {expected!r} was expected")
            turns.append(m)
        if not turns:
            raise ValueError("the conversation has no user message")
        prefix = turns[-1]["role"] == "assistant" and bool(turns[-1].get("prefix"))
        if add_generation_prompt and turns[-1]["role"] == "assistant" and not prefix:
            raise ValueError("the last message must be the user's to generate a reply "
                             "(or an assistant message with 'prefix': True, to continue it)")
        system_prompt = "\n\n".join(system)  # mistral-common joins several system prompts so
        v1 = self.mistral_version == "v1"
        system_turn = 0 if v1 else max(i for i, m in enumerate(turns) if m["role"] == "user")
        ids = [sp.bos_id()]
        for i, m in enumerate(turns):
            content = m["content"]
            if m["role"] == "user":
                if system_prompt and i == system_turn:
                    content = system_prompt + "\n\n" + content
                if v1:
                    ids += sp.encode(f"[INST] {content} [/INST]")
                else:
                    ids += [sp.piece_to_id("[INST]"), *sp.encode(content), sp.piece_to_id("[/INST]")]
            else:
                ids += sp.encode(content if v1 else content.rstrip(" "))
                if not (prefix and i == len(turns) - 1):
                    ids.append(sp.eos_id())
        return ids


class StreamDecoder:
    """Incremental detokenizer: ids in, final text out, never half a character.

    The standard sliding window (vLLM's `detokenize_incrementally`, HF's TextStreamer): decode the
    ids from `prefix` on, and emit what the newest ids added to the text of the ids up to `read`.
    Decoding a few already-printed ids along with the new ones keeps the context SentencePiece
    needs: its decoder drops the "▁" space of the first piece it sees, and a window that starts
    before the new piece drops it from both texts, so the difference keeps the space.
    Text ending in U+FFFD is held back: the next ids may finish the UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._byte_ids, self._special_ids = tokenizer._byte_ids, tokenizer._special_ids
        self._in_byte_run = False
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this have had their text emitted
        self._emitted = 0  # characters emitted so far

    def push(self, token_id: int) -> str:
        """The text that `token_id` makes final, possibly ""."""
        self._ids.append(int(token_id))
        if self._byte_ids and token_id not in self._special_ids:
            self._in_byte_run = token_id in self._byte_ids
        if self._in_byte_run:
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd") or not new_text.startswith(prefix_text):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        chunk = new_text[len(prefix_text):]
        self._emitted += len(chunk)
        return chunk

    def flush(self) -> str:
        """Whatever is left: held-back bytes, or text that only a full decode shows."""
        # One full decode settles it exactly, so pushes + flush always equals decode(ids).
        rest = self._decode(self._ids)[self._emitted:]
        self._emitted += len(rest)
        self._prefix = self._read = len(self._ids)
        return rest


# ---- chat templates ---------------------------------------------------------------------------


def _raise_exception(message):
    raise ValueError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson: unlike Jinja's own, it keeps non-ASCII text and does not escape HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The template comes from a downloaded file: the sandbox keeps it from reaching Python internals.
    # trim_blocks/lstrip_blocks and these helpers are what HF renders templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"malformed chat template: {e}") from e


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The conversation as text, rendered by a Jinja chat template in a sandbox."""
    from jinja2 import TemplateError

    compiled = _compile_template(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e


# ---- loaders ----------------------------------------------------------------------------------


def _find_in_folder(folder: Path) -> Path | None:
    """The tokenizer file of a model folder: HF's tokenizer.json first, then Mistral's tokenizer.model*."""
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    models = sorted(p for p in folder.glob("tokenizer.model*") if p.is_file())
    # Plain "tokenizer.model" sorts first; otherwise the highest version (tokenizer.model.v3) wins.
    return None if not models else models[0] if models[0].name == "tokenizer.model" else models[-1]


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF" or path.suffix == ".gguf"


def _load_sentencepiece(cls, path: Path) -> Tokenizer:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own wording
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from e
    bos, eos = sp.bos_id(), sp.eos_id()
    return cls(path, sp=sp, bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None, add_bos=bos >= 0)


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e


def _load_tokenizer_json(cls, path: Path) -> Tokenizer:
    import tokenizers

    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
    config_path = path.with_name("tokenizer_config.json")
    config = _read_json(config_path) if config_path.is_file() else {}
    bos_token, eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    bos_id = hf.token_to_id(bos_token) if bos_token else None
    eos_id = hf.token_to_id(eos_token) if eos_token else None
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # no word from the config: do what the file's post-processor does
        with_special = hf.encode("", add_special_tokens=True).ids
        add_bos = bool(with_special) and with_special[0] == bos_id
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and path.with_name("chat_template.jinja").is_file():
        template = path.with_name("chat_template.jinja").read_text(encoding="utf-8")
    # Models that end turns with a token of their own list it in generation_config.json (Llama 3: <|eot_id|>).
    gen_path = path.with_name("generation_config.json")
    extra = _read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None
    extra = [extra] if isinstance(extra, int) else list(extra or ())
    return cls(path, hf=hf, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos), chat_template=template,
               bos_token=bos_token or "", eos_token=eos_token or "", extra_stop_ids=extra)


# -- GGUF: rebuild the vocabulary as a `tokenizers` model, after transformers' GGUF converter
#    (integrations/gguf/gguf_tokenizer_mapping.py), with llama.cpp's pre-tokenizer choices.

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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    for b in range(256):  # the rest (space, controls...) get characters from 256 on, in byte order
        spelling.setdefault(b, chr(256 + len(spelling) - len(printable)))
    return spelling


def _gguf_byte_level(meta):
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE from the file's tokens and merges."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    spelling = _bytes_to_unicode()
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


def _load_gguf(cls, source) -> Tokenizer | None:
    from tokenizers import AddedToken

    if isinstance(source, (str, os.PathLike)):
        from .loading.gguf import read  # shares the reader the model loader opened

        path = Path(source)
        try:
            reader = read(path)
        except Exception as e:  # bad magic, truncation, nonsense sizes: all surface as assorted errors
            raise TokenizerError(f"{path}: not a valid GGUF file ({e})") from e
    else:
        reader, path = source, Path(getattr(getattr(source, "data", None), "filename", None) or "<gguf>")
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
    return cls(path, hf=hf, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos), chat_template=meta.get("chat_template"),
               bos_token=bos_token, eos_token=eos_token)
