"""The fast GGUF header reader gives exactly the stock `gguf.GGUFReader`'s fields and tensors."""

import gguf
import numpy as np
import pytest

from mistral7b.gguf_reader import FastGGUFReader


def assert_same_reader(path):
    stock, fast = gguf.GGUFReader(str(path)), FastGGUFReader(str(path))
    assert list(stock.fields) == list(fast.fields)
    for key, want in stock.fields.items():
        got = fast.fields[key]
        assert (got.offset, got.types, got.data, len(got.parts)) == (want.offset, want.types, want.data, len(want.parts)), key
        for a, b in zip(got.parts, want.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), key
        assert got.contents() == want.contents(), key
    assert [t.name for t in fast.tensors] == [t.name for t in stock.tensors]
    for got, want in zip(fast.tensors, stock.tensors):
        assert (got.tensor_type, got.data_offset, got.n_bytes) == (want.tensor_type, want.data_offset, want.n_bytes)
        assert np.array_equal(got.shape, want.shape) and np.array_equal(got.data, want.data)


def test_fields_of_every_kind(tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    words = ["".join(chr(c) for c in rng.integers(32, 0x2FF, rng.integers(0, 12))) for _ in range(300)]
    w.add_array("test.strings", words)
    w.add_array("test.empty", [])
    w.add_array("test.floats", rng.standard_normal(257).astype(np.float32).tolist())
    w.add_array("test.ints", rng.integers(-(2**31), 2**31, 100).tolist())
    w.add_array("test.nested", [[1, 2], [3, 4, 5]])
    w.add_string("test.text", "lighthouse \u00e9t\u00e9")
    w.add_uint32("test.count", int(rng.integers(0, 2**32)))
    w.add_bool("test.flag", True)
    for i in range(3):
        w.add_tensor(f"t{i}", rng.standard_normal((4, 8 * (i + 1))).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_reader(path)


def test_default_model_file():
    from mistral7b.default_model import default_model_path

    assert_same_reader(default_model_path())


@pytest.mark.parametrize("keep", [0.002, 0.01, 0.5])
def test_truncated_header_is_an_error(tmp_path, keep):
    from mistral7b.default_model import default_model_path

    data = default_model_path().read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises((ValueError, IndexError)):
        FastGGUFReader(str(path))


def test_released_pages_read_back_the_same(tmp_path):
    path = tmp_path / "released.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = FastGGUFReader(str(path))
    before = np.array(reader.tensors[0].data)
    reader.release_pages()
    assert np.array_equal(reader.tensors[0].data, before) and before[5, 7] == 5 * 64 + 7
