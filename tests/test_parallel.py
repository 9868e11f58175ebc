"""Tensor parallelism on CPU with gloo: shards loaded per rank against slices of the full model, logits
and greedy generation of N processes against one process, and failures that end cleanly.

The N-process runs spawn real worker processes; each is bounded by the collective timeout (gloo) and
by an alarm, so a broken run fails instead of hanging CI.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest
import torch

from checkpoints import hf_model, rel_err, write_gguf, write_mistral

from mistral7b import SamplingParams
from mistral7b.cache import KVCache
from mistral7b.engine import Engine
from mistral7b.loading import load_model
from mistral7b.parallel import TensorParallelError, check_world_size, launch, local_config
from mistral7b.parallel.loading import gguf_table, load_shard

W = 8  # sliding window of the random Mistral
VOCAB = 97
DEFAULT_MODEL = "/root/.cache/mistral7b/SmolLM2-135M-Instruct.Q4_1.gguf"
TIMEOUT_S = 30  # every collective of the spawned runs

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def deadline(seconds: int):
    """Fail (rather than hang) when a block runs past `seconds`."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Mistral-shaped HF checkpoint with a window (4 heads, 2 KV heads) and its one-process model."""
    path = tmp_path_factory.mktemp("tiny")
    hf = hf_model("mistral", seed=int(torch.randint(0, 2**31, ())), window=W, vocab=VOCAB)
    hf.save_pretrained(path)
    return hf, path, load_model(path)


@pytest.fixture(scope="class")  # one tensor-parallel model per process: closed before the next starts
def tp2(tiny):
    with deadline(120):
        model = launch(tiny[1], 2, device="cpu", timeout_s=TIMEOUT_S)
    yield model
    model.close()


def tp_engine(model, monkeypatch, **kwargs) -> Engine:
    """An engine over the tensor-parallel model: the runner takes its cache from `model.new_cache`."""
    engine = Engine(model, None, **kwargs)
    assert type(engine.runner.cache).__name__ == "ShardedKVCache"
    return engine


def greedy(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [engine.add(p, params) for p in prompts]
    with deadline(120):
        while not all(r.finished for r in requests):
            engine.step()
    return [r.output_ids for r in requests]


@torch.no_grad()
def assert_greedy_agrees(model, prompts: list[list[int]], got: list[list[int]], want: list[list[int]]):
    """`got == want`, except that a sequence may part ways at a near-tie: where the two first differ, the
    one-process model scores both tokens within 1e-4 (all-reduce order moves logits by about 1e-6)."""
    for prompt, g, w in zip(prompts, got, want):
        assert len(g) == len(w)
        i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if i is not None:
            logits = model(torch.tensor([prompt + w[:i]]))[0, -1].float()
            gap = (logits[w[i]] - logits[g[i]]).item()
            assert abs(gap) < 1e-4 * logits.abs().max().item(), f"token {i}: {g[i]} for {w[i]}, gap {gap:.3g}"


# ------------------------------------------------------------------------------- shards, in process


def test_world_size_must_divide_kv_heads(tiny):
    config = tiny[2].config  # 2 KV heads
    for bad in (3, 4, 0, -2):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            check_world_size(config, bad)
    with pytest.raises(ValueError, match="does not divide this model's 2 KV heads; choose one of 1, 2"):
        launch(tiny[1], 3, device="cpu")  # refused before any process starts
    with pytest.raises(ValueError, match="unknown head split"):
        check_world_size(config, 2, head="columns")
    local = local_config(config, 2)
    assert (local.n_heads, local.n_kv_heads, local.hidden_dim, local.dim) == (2, 1, 48, config.dim)


def expected_shard(full: torch.nn.Module, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s parameters cut by hand from the one-process model: whole GQA groups of q/k/v,
    1/N of the SwiGLU units, wo/w2 by input features, everything else whole."""
    c = full.config
    q, kv, hidden = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim

    def part(n):
        return slice(rank * n // world, (rank + 1) * n // world)

    out = {}
    for name, p in full.state_dict().items():
        if name.endswith("wqkv.weight"):
            wq, wk, wv = p.split([q, kv, kv])
            p = torch.cat([wq[part(q)], wk[part(kv)], wv[part(kv)]])
        elif name.endswith("w13.weight"):
            w1, w3 = p.split([hidden, hidden])
            p = torch.cat([w1[part(hidden)], w3[part(hidden)]])
        elif name.endswith("wo.weight"):
            p = p[:, part(q)]
        elif name.endswith("w2.weight"):
            p = p[:, part(hidden)]
        out[name] = p
    return out


@pytest.mark.parametrize("fmt", ["hf", "mistral-safetensors", "mistral-pth", "gguf-Q8_0", "gguf-Q4_1"])
def test_each_rank_loads_its_slices(tiny, tmp_path, fmt):
    hf, path, _ = tiny
    if fmt.startswith("mistral"):
        path = write_mistral(hf, tmp_path / "m", fmt="safetensors" if fmt.endswith("safetensors") else "pth")
    elif fmt.startswith("gguf"):  # wo's split is block-aligned (64 = 2 x 32 columns), w2's is not (96 / 2 = 48)
        path = write_gguf(hf, tmp_path / "m.gguf", qtype=fmt.partition("-")[2])
    full = load_model(path, quantize=False)  # shards of a GGUF run dequantized
    # A spawned worker reads a GGUF through the tensor table that rank 0 parsed.
    prepared = (path, full.config.to_dict(), gguf_table(path)) if fmt.startswith("gguf") else None
    for rank in range(2):
        for how in [None] + [prepared] * (prepared is not None):
            shard, config = load_shard(path, rank, 2, prepared=how)
            assert config == full.config and shard.config == local_config(full.config, 2)
            got, want = shard.state_dict(), expected_shard(full, rank, 2)
            assert got.keys() == want.keys()
            for name in want:
                assert torch.equal(got[name], want[name]), (fmt, rank, name, how is None)


# ------------------------------------------------------------------------ two ranks, random Mistral


class TestTwoRanks:
    """Two ranks on the random Mistral; the class scope closes them before three ranks start."""

    @torch.no_grad()
    def test_logits_match_one_process(self, tiny, tp2):
        ref = tiny[2]
        tokens = torch.randint(0, VOCAB, (2, 3 * W + 3))
        assert rel_err(tp2(tokens), ref(tokens)) < 1e-5
        # Chunked prefill past the window into a rolling cache, then decode, on cache rows 1 and 2.
        caches = (tp2.new_cache(tp2.config, 3), KVCache(ref.config, 3))
        rows = slice(1, 3)
        for start in range(0, tokens.shape[1], 5):
            chunk = tokens[:, start : start + 5]
            positions = torch.arange(start, start + chunk.shape[1]).expand_as(chunk)
            got, want = (m(chunk, positions, c, rows=rows, kv_len=start + chunk.shape[1]) for m, c in zip((tp2, ref), caches))
            assert rel_err(got, want) < 1e-5
        full = ref(tokens)
        assert rel_err(got[:, -1], full[:, -1]) < 1e-5  # and the chunks equal one full forward
        index = torch.tensor([2, 1])  # rows as an index tensor, out of order
        for step in range(3):
            token = torch.randint(0, VOCAB, (2, 1))
            positions = torch.full((2, 1), tokens.shape[1] + step)
            got, want = (m(token, positions, c, rows=index, kv_len=None) for m, c in zip((tp2, ref), caches))
            assert rel_err(got, want) < 1e-5
        with pytest.raises(TypeError, match="new_cache"):
            tp2(tokens, positions, caches[1])

    def test_greedy_generation_matches_one_process(self, tiny, tp2, monkeypatch):
        """Batched, with chunked prefill (chunks of 5) of prompts past the window, against one process."""
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
        prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 2 * W + 5, W + 1, 1)]
        want = greedy(Engine(tiny[2], None, max_batch=3, chunk_size=5), prompts, 12)
        got = greedy(tp_engine(tp2, monkeypatch, max_batch=3, chunk_size=5), prompts, 12)
        assert_greedy_agrees(tiny[2], prompts, got, want)
        assert len(set(map(tuple, want))) > 1  # the prompts lead somewhere different

    @torch.no_grad()
    def test_compiled_decode_matches_one_process(self, tiny, tp2):
        """Every rank traces its decode step with the all-reduces inside one graph (dynamo's eager
        backend here: inductor takes a minute per rank on two cores; the GPU run uses CUDA graphs)."""
        ref = tiny[2]
        caches = (tp2.new_cache(tp2.config, 2), KVCache(ref.config, 2))
        step = tp2.compile_decode(caches[0], mode=None, backend="eager")
        tokens = torch.randint(0, VOCAB, (2, W + 3))
        kv_len = tokens.shape[1]  # one bound for every step (as the engine's buckets): a single trace
        for i in range(tokens.shape[1]):  # past the window: the rolling buffer wraps
            positions = torch.tensor([[i], [max(i - 2, -1)]])  # row 1 starts later (-1: an idle row)
            got = step(tokens[:, i : i + 1], positions, kv_len)
            want = ref(tokens[:, i : i + 1], positions, caches[1], rows=slice(0, 2), kv_len=kv_len)
            assert rel_err(got, want) < 1e-5


# ----------------------------------------------------------------- three ranks, the default model


@pytest.fixture(scope="module")
def default_model():
    if not os.path.exists(DEFAULT_MODEL):
        pytest.fail(f"the default model is missing: {DEFAULT_MODEL}")
    return load_model(DEFAULT_MODEL, quantize=False)  # as its shards run


@pytest.fixture(scope="class")
def tp3(default_model):
    """The default model (3 KV heads) on 3 ranks, its head split by vocabulary (tied to the embedding)."""
    with deadline(180):
        model = launch(DEFAULT_MODEL, 3, device="cpu", head="vocab", timeout_s=TIMEOUT_S)
    yield model
    model.close()


class TestThreeRanks:
    """The default model on three ranks; the last test kills one of them."""

    @torch.no_grad()
    def test_default_model_three_ranks(self, default_model, tp3, monkeypatch):
        tokens = torch.randint(0, default_model.config.vocab_size, (1, 24))
        assert rel_err(tp3(tokens), default_model(tokens)) < 1e-5
        prompts = [tokens[0, :n].tolist() for n in (9, 5)]
        want = greedy(Engine(default_model, None, max_batch=2, chunk_size=4), prompts, 4)
        got = greedy(tp_engine(tp3, monkeypatch, max_batch=2, chunk_size=4), prompts, 4)
        assert_greedy_agrees(default_model, prompts, got, want)

    def test_dead_rank_fails_the_request_and_stops_the_others(self, tp3, monkeypatch):
        """Defined last: it kills a rank of the shared three-rank model."""
        engine = tp_engine(tp3, monkeypatch, max_batch=1)
        assert greedy(engine, [[1, 2, 3]], 2)  # alive
        workers = tp3._processes
        os.kill(workers[1].pid, signal.SIGKILL)
        workers[1].join(timeout=10)
        started = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 2 of 3 \(pid \d+\) was killed by SIGKILL"):
            greedy(engine, [[4, 5, 6]], 2)
        assert time.monotonic() - started < TIMEOUT_S + 10
        workers[0].join(timeout=10)
        assert not any(p.is_alive() for p in workers)  # rank 1 is stopped too
        with pytest.raises(TensorParallelError, match="rank 2 of 3"):  # and the model stays failed
            greedy(engine, [[7]], 1)
