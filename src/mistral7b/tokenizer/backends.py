"""Tokenizer backends: one `Tokenizer` class over `sentencepiece` (Mistral's own `tokenizer.model*`,
with Mistral's chat format built in) and `tokenizers` (a Hugging Face `tokenizer.json`, or a GGUF's
vocabulary rebuilt by `gguf_vocab`, both with a Jinja chat template rendered by `templates`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..utils import is_gguf
from .chat import mistral_chat
from .content import encode_rendered, mask_specials
from .detokenize import StreamDecoder, bytes_to_unicode
from .templates import render_chat_template

# Tokens that end an assistant turn in common chat formats. Generation stops on them as on EOS,
# when the tokenizer has them and its chat template writes them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


class TokenizerError(ValueError):
    """A tokenizer file that is missing, of unknown format, or corrupt."""


class Tokenizer:
    """Text <-> token ids, plus the chat format of the model the tokenizer belongs to."""

    def __init__(self, name, *, sp=None, hf=None, bos_id=None, eos_id=None, add_bos=True,
                 chat_template=None, bos_token="", eos_token="", extra_stop_ids=()):
        self.name = str(name)  # the file it came from, for messages
        self._sp, self._hf = sp, hf
        self._byte_ids, self._special_ids = set(), set()
        self._byte_level = False  # a GPT-2 byte-level vocabulary: tokens spelled in `bytes_to_unicode`
        self._special_texts: list[str] = []  # the special tokens' text, which chat content may not produce
        self._hf_as_text = None  # a copy of `hf` that splits special-token text (made when first needed)
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
            added = hf.get_added_tokens_decoder()
            self._special_ids = {i for i, t in added.items() if t.special}
            self._special_texts = [t.content for t in added.values() if t.special]
            self._byte_level = hf.decoder is not None and b'"ByteLevel"' in hf.decoder.__getstate__()
            if getattr(hf.model, "byte_fallback", False):
                # HF's ByteFallback decoder turns a whole run of <0xXX> tokens into one "\ufffd" per byte
                # as soon as the run is not valid UTF-8, so a later byte can change the text of earlier
                # ones (skipped special tokens don't end a run). The stream decoder waits for runs to end.
                self._byte_ids = {i for t, i in hf.get_vocab().items() if len(t) == 6 and t.startswith("<0x")}
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
        if is_gguf(path):
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
        from .gguf_vocab import gguf_tokenizer_args

        args = gguf_tokenizer_args(source)
        return None if args is None else cls(**args)

    # ---- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first if asked for and this tokenizer uses one (`add_bos`).

        SentencePiece models treat the text literally ("[INST]" in user text is not a control token),
        as mistral-common does; `tokenizers` ones match their added special tokens, as HF does, unless
        `special` is False: then "<|im_end|>" is plain text, split into ordinary tokens.
        """
        if not text.isascii():
            _check_unicode(text)
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = (self._hf if special else self._text_only()).encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos and self.bos_id is not None else ids

    def _text_only(self):
        """The `tokenizers` tokenizer with special tokens split (a copy: the flag is shared state)."""
        if self._hf_as_text is None:
            import tokenizers

            copy = tokenizers.Tokenizer.from_str(self._hf.to_str())
            copy.encode_special_tokens = True
            self._hf_as_text = copy
        return self._hf_as_text

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, leaving out special and control tokens (<s>, </s>, [INST], <|im_end|>...)."""
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for inside a longer text: a "▁" piece keeps its space, a byte
        token is its one byte (even where it is not UTF-8 by itself), and special tokens are b""
        as `decode` leaves them out."""
        i = int(token_id)
        if self._sp is not None:
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                return b"" if self._sp.is_control(i) else self._sp.decode([i]).encode()
            piece = self._sp.id_to_piece(i)
            return bytes([int(piece[3:5], 16)]) if self._sp.is_byte(i) else piece.replace("▁", " ").encode()
        token = self._hf.id_to_token(i)
        if token is None or i in self._special_ids:
            return b""
        if i in self._byte_ids:
            return bytes([int(token[3:5], 16)])
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in token):
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        return token.encode() if self._byte_level else token.replace("▁", " ").encode()

    def token_to_id(self, token: str) -> int | None:
        if self._sp is not None:
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        return self._hf.token_to_id(token)

    def decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # ---- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> list[int]:
        """Token ids of a conversation in this model's chat format, ready for the reply to follow.

        Control-token text inside messages (and `variables`, such as `tools`) stays text (`content`).
        """
        if self._sp is not None:
            if self._sp.piece_to_id("[SYSTEM_PROMPT]") != self._sp.unk_id():
                raise ValueError(f"{self.name}: Mistral tokenizer v7+ ([SYSTEM_PROMPT]) chat format is not supported")
            return mistral_chat(self._sp, self.mistral_version, messages, add_generation_prompt)
        if not self.chat_template:
            raise ValueError(f"this tokenizer has no chat template ({self.name})")
        (messages, variables), unmask = mask_specials((messages, variables), self._special_texts)
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **variables)
        if not unmask:  # the template writes BOS itself if the model wants one
            return self.encode(text, bos=False)
        return encode_rendered(text, unmask, self._special_texts, self.token_to_id,
                               lambda piece: self.encode(piece, bos=False, special=False))



def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # the backends' own errors would be TypeErrors about their argument types
        raise ValueError("the text contains a lone UTF-16 surrogate (such as \\ud800), which is not valid "
                         "Unicode text") from None


def _find_in_folder(folder: Path) -> Path | None:
    """The tokenizer file of a model folder: HF's tokenizer.json first, then Mistral's tokenizer.model*."""
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    models = sorted(p for p in folder.glob("tokenizer.model*") if p.is_file())
    # Plain "tokenizer.model" sorts first; otherwise the highest version (tokenizer.model.v3) wins.
    return None if not models else models[0] if models[0].name == "tokenizer.model" else models[-1]



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

