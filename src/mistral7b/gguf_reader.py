"""`gguf.GGUFReader` with its per-element header parsing made cheap.

The stock reader slices a `np.memmap` once per value, and every memmap slice runs Python code
(`memmap.__array_finalize__`); with a 49k-entry vocabulary plus 49k merges that is about 250k slices
and 6 s on the project's 2-core CPU. Here the same bytes are sliced as a plain ndarray over the same
mapping, and arrays of strings or scalars are walked in one loop instead of one recursive call per
element. The fields, parts and tensors are the reader's own (tests compare them with the stock reader's).
"""

from __future__ import annotations

import mmap
import sys

import numpy as np


def _import_gguf_without_mistral_common():
    """`gguf.vocab` imports mistral_common when it is installed (a dev dependency here: 1-4 s of a
    2-core box's start-up) for tokenizer classes this project never uses. Hide it for that one import;
    a later `import mistral_common` anywhere else works as usual."""
    if "gguf" in sys.modules or "mistral_common" in sys.modules:
        return
    sys.modules["mistral_common"] = None  # makes `import mistral_common.<anything>` raise ImportError
    try:
        import gguf  # noqa: F401
    finally:
        del sys.modules["mistral_common"]


_import_gguf_without_mistral_common()
from gguf import GGUFReader, GGUFValueType  # noqa: E402


class FastGGUFReader(GGUFReader):
    def release_pages(self, start: int = 0, length: int | None = None) -> None:
        """Drop this process's resident pages of the file mapping, or of bytes [start, start + length)
        of it (whole pages inside that range): the weights are copied out while loading, ~100 MB of RSS
        for the default model. The mapping stays valid: pages read again come back from the page cache."""
        mapping = getattr(self.data, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        if length is None:
            mapping.madvise(mmap.MADV_DONTNEED)
            return
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (start + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, end - first)

    def _plain(self) -> np.ndarray:
        plain = self.__dict__.get("_plain_data")
        if plain is None:  # `self.data` is the memmap the base __init__ opened first
            plain = self._plain_data = self.data.view(np.ndarray)
        return plain

    def _get(self, offset, dtype, count=1, override_order=None):
        dtype = np.dtype(dtype)
        count = int(count)
        end = offset + dtype.itemsize * count
        arr = self._plain()[offset:end].view(dtype)
        if arr.shape[0] != count:  # the base reader's error, for a header that runs past the file
            raise ValueError(f"cannot read {count} values of {dtype} at offset {offset}: the file ends first")
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs, raw_type):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n = GGUFValueType(raw_itype[0]), int(alen[0])
        offs = orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        if itype == GGUFValueType.STRING:
            offs = self._string_parts(offs, n, parts)
        elif itype in self.gguf_scalar_to_np:
            values = self._get(offs, self.gguf_scalar_to_np[itype], n)
            parts += list(values.reshape(n, 1))
            offs += int(values.nbytes)
        else:  # nested arrays: rare and small, the stock path
            return super()._get_field_parts(orig_offs, raw_type)
        step = 2 if itype == GGUFValueType.STRING else 1
        data = list(range(2 + step - 1, len(parts), step))
        types = [GGUFValueType.ARRAY] + ([itype] if n else [])
        return offs - orig_offs, parts, data, types

    def _string_parts(self, offs: int, n: int, parts: list) -> int:
        """Append (length, bytes) of `n` strings from `offs`; returns the offset after them."""
        plain, u64 = self._plain(), np.dtype(np.uint64)
        view = memoryview(plain)
        size = plain.shape[0]
        for _ in range(n):
            if offs + 8 > size:
                raise ValueError(f"a string at offset {offs} runs past the end of the file")
            length = int.from_bytes(view[offs : offs + 8], "little")
            end = offs + 8 + length
            if end > size:
                raise ValueError(f"a string of {length} bytes at offset {offs} runs past the end of the file")
            parts.append(plain[offs : offs + 8].view(u64))
            parts.append(plain[offs + 8 : end])
            offs = end
        return offs
