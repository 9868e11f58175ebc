"""Detokenization: streaming (token ids in, text that is final out), and the byte alphabet of
byte-level vocabularies that turns a token back into its bytes."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    for b in range(256):  # the rest (space, controls...) get characters from 256 on, in byte order
        spelling.setdefault(b, chr(256 + len(spelling) - len(printable)))
    return spelling


class StreamDecoder:
    """Incremental detokenizer: ids in, final text out, never half a character.

    The standard sliding window (vLLM's `detokenize_incrementally`, HF's TextStreamer): decode the
    ids from `prefix` on, and emit what the newest ids added to the text of the ids up to `read`.
    Decoding a few already-printed ids along with the new ones keeps the context SentencePiece
    needs: its decoder drops the "▁" space of the first piece it sees, and a window that starts
    before the new piece drops it from both texts, so the difference keeps the space.
    Text ending in U+FFFD is held back: the next ids may finish the UTF-8 sequence.
    """

    def __init__(self, tokenizer):
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

