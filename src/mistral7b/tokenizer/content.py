"""Control tokens in chat content are text.

A Jinja chat template writes its control tokens (`<|im_start|>`, `<|im_end|>`...) as text, and the
rendered prompt is tokenized with special tokens parsed. Content that spells a control token would
then become the real token: `<|im_end|>\\n<|im_start|>system` in a user message opens a system turn.
As mistral-common does for its SentencePiece formats (and HF's `encode_special_tokens`), the text
of messages and tools is tokenized with special tokens split into ordinary pieces; only the tokens
the template itself writes are control tokens.

How: every special token's text inside the messages and tools is swapped for one private-use
character (Supplementary Private Use Area-B, not otherwise present in the input) before rendering,
so the template sees ordinary text. The rendered prompt is cut at the special tokens it holds (all the
template's), and each piece between them is encoded with the swapped text restored and special tokens
split, the same pieces HF's added-token matching would cut the prompt into.
"""

from __future__ import annotations

import re

_PRIVATE_USE = range(0x100000, 0x10FFFE)


def _strings(value):
    """Every string inside nested dicts (keys too) and lists."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _replace(value, pattern: re.Pattern, swap: dict[str, str]):
    """`value` with every match of `pattern` in its strings replaced through `swap`."""
    if isinstance(value, str):
        return pattern.sub(lambda m: swap[m.group(0)], value)
    if isinstance(value, dict):
        return {_replace(k, pattern, swap): _replace(v, pattern, swap) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace(v, pattern, swap) for v in value]
    return value


def special_pattern(specials) -> re.Pattern:
    """A regex matching any of `specials`, the longest first (as added-token matching does)."""
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def mask_specials(inputs, specials: list[str]):
    """(inputs with special-token text swapped for private-use characters, {character: token text}),
    or (inputs, {}) when no string in them holds a special token."""
    if not specials:
        return inputs, {}
    pattern = special_pattern(specials)
    found = {m.group(0) for s in _strings(inputs) for m in pattern.finditer(s)}
    if not found:
        return inputs, {}
    used = {c for s in _strings(inputs) for c in s if ord(c) >= _PRIVATE_USE.start}
    free = (chr(c) for c in _PRIVATE_USE if chr(c) not in used)
    swap = {token: next(free) for token in sorted(found)}
    return _replace(inputs, pattern, swap), {c: token for token, c in swap.items()}


def encode_rendered(text: str, unmask: dict[str, str], specials: list[str], token_id, encode_as_text) -> list[int]:
    """Ids of a prompt rendered from masked inputs: its special tokens (the template's) as control
    tokens (`token_id(text)`), the text between them through `encode_as_text` with `unmask` undone."""
    restore = special_pattern(unmask) if unmask else None
    ids: list[int] = []
    start = 0
    for m in special_pattern(specials).finditer(text):
        ids += _encode_piece(text[start:m.start()], restore, unmask, encode_as_text)
        ids.append(token_id(m.group(0)))
        start = m.end()
    return ids + _encode_piece(text[start:], restore, unmask, encode_as_text)


def _encode_piece(piece: str, restore, unmask, encode_as_text) -> list[int]:
    if not piece:
        return []
    if restore is not None:
        piece = restore.sub(lambda m: unmask[m.group(0)], piece)
    return encode_as_text(piece)
