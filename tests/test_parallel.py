"""Tensor parallelism on CPU with gloo: shards loaded per rank against slices of the full model, logits
and greedy generation of N processes against one process, and failures that end cleanly.

The N-process runs spawn real worker processes; each is bounded by the collective timeout (gloo) and
by an alarm, so a broken run fails instead of hanging CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from checkpoints import hf_model, k_quant_model, rel_err, write_gguf, write_mistral

from mistral7b import SamplingParams
from mistral7b.cache import KVCache
from mistral7b.engine import Engine, SpeculativeConfig
from mistral7b.engine.runner import RunnableModel
from mistral7b.loading import load_model
from mistral7b.loading.quantized import save_quantized
from mistral7b.parallel import TensorParallelError, check_world_size, launch, local_config, runtime
from mistral7b.parallel.startup import StartupError
from mistral7b.parallel.loading import load_shard
from mistral7b.quant import QuantModule, cpu_kernels, resolve

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


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    """These tests compare ranks with one process weight for weight, on torch's quantized kernels: with
    cpu_kernels a shard whose width misses the blocks of 32 (w2's 48 columns here) would run on torch's
    kernels beside a one-process model on cpu_kernels, and differ by int8-activation rounding, not by
    the split. `test_ranks_on_cpu_kernels_equal_one_process` covers cpu_kernels."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "0")
        yield


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
    assert isinstance(model, RunnableModel) and model.tensor_parallel_size > 1
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
def assert_greedy_agrees(model, prompts: list[list[int]], got: list[list[int]], want: list[list[int]],
                         tie: float = 1e-4):
    """`got == want`, except that a sequence may part ways at a near-tie: where the two first differ, the
    one-process model scores both tokens within `tie` of the largest logit (all-reduce order moves
    logits by about 1e-6; bf16 partial sums of the int4 kernel by about 1e-2)."""
    for prompt, g, w in zip(prompts, got, want):
        assert len(g) == len(w)
        i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if i is not None:
            logits = model(torch.tensor([prompt + w[:i]]))[0, -1].float()
            gap = (logits[w[i]] - logits[g[i]]).item()
            assert abs(gap) < tie * logits.abs().max().item(), f"token {i}: {g[i]} for {w[i]}, gap {gap:.3g}"


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


def dense_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """module path -> the dense weight it multiplies by (a quantized module's, dequantized), norms too."""
    out = {f"{n}.weight": m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantModule)}
    out.update({n: p for n, p in model.named_parameters() if n not in out})
    return out


def expected_shard(weights: dict[str, torch.Tensor], c, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s weights cut by hand from the one-process model's: whole GQA groups of q/k/v,
    1/N of the SwiGLU units, wo/w2 by input features, everything else whole."""
    q, kv, hidden = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim

    def part(n):
        return slice(rank * n // world, (rank + 1) * n // world)

    out = {}
    for name, p in weights.items():
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


@pytest.mark.parametrize("fmt,quantize", [("hf", "none"), ("mistral-safetensors", "none"), ("mistral-pth", "none"),
                                          ("gguf-Q8_0", "none"), ("gguf-Q4_1", None), ("hf", "int8"),
                                          ("ours-int4", None)])
def test_each_rank_loads_its_slices(tiny, tmp_path, fmt, quantize):
    """Each rank's weights equal the one-process model's, cut by hand: dense, a GGUF's blocks kept (wo's
    split falls on a block boundary, 64 = 2 x 32 columns; w2's does not, 96 / 2 = 48, so w2 is read
    dense), and int8 (per-channel scales of whole rows, as one process has them)."""
    hf, path, _ = tiny
    if fmt.startswith("mistral"):
        path = write_mistral(hf, tmp_path / "m", fmt="safetensors" if fmt.endswith("safetensors") else "pth")
    elif fmt.startswith("gguf"):
        path = write_gguf(hf, tmp_path / "m.gguf", qtype=fmt.partition("-")[2])
    elif fmt == "ours-int4":  # our quantized checkpoint, int4 g32: w2's split (48) falls inside a group
        path = save_quantized(load_model(path, quantize=resolve("int4", 32)), tmp_path / "q")
    quant = resolve(quantize)
    full = load_model(path, quantize=quant)
    full_dense = dense_weights(load_model(path, quantize="none"))
    for rank in range(2):
        shard, config = load_shard(path, rank, 2, quant=quant)
        assert config == full.config and shard.config == local_config(full.config, 2)
        quantized = {f"{n}.weight" for n, m in shard.named_modules() if isinstance(m, QuantModule)}
        got = dense_weights(shard)
        want = expected_shard(dense_weights(full), full.config, rank, 2)
        want_dense = expected_shard(full_dense, full.config, rank, 2)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], (want if name in quantized else want_dense)[name]), (fmt, rank, name)
        if fmt in ("gguf-Q4_1", "ours-int4"):
            assert {"layers.0.attention.wqkv.weight", "layers.0.attention.wo.weight"} <= quantized
            assert "layers.0.feed_forward.w2.weight" not in quantized
        if quantize == "int8":
            assert len(quantized) == 4 * config.n_layers + 1  # the block linears and the head


def test_each_rank_loads_its_slices_of_a_q4_k_m_mix(tmp_path, monkeypatch):
    """llama.cpp's Q4_K_M mix (Q4_K, with Q6_K for v and w2) over 2 ranks: each rank holds exactly its cut of
    the one-process model, on the CPU's kernels too, where Q6_K's groups of 16 are requantized onto int8
    blocks of 32 (a rank requantizes its own columns of w2: the groups fall alike)."""
    types = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
             "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "1")  # every width here is a multiple of 32
    path = k_quant_model(tmp_path, types, np.random.default_rng())
    full = load_model(path)
    labels = {n: m.fmt.label() for n, m in full.named_modules() if isinstance(m, QuantModule)}
    assert labels["layers.0.feed_forward.w2"] == f"int8 g{32 if cpu_kernels.available() else 16} (from Q6_K)"
    for rank in range(2):
        shard, _ = load_shard(path, rank, 2, quant=None)
        got, want = dense_weights(shard), expected_shard(dense_weights(full), full.config, rank, 2)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (rank, name)
        assert {n: m.fmt.label() for n, m in shard.named_modules() if isinstance(m, QuantModule)} == labels


# ------------------------------------------------------------------------ two ranks, random Mistral


class TestTwoRanks:
    """Two ranks on the random Mistral; the class scope closes them before three ranks start."""

    @torch.no_grad()
    def test_logits_match_one_process(self, tiny, tp2):
        ref = tiny[2]
        tokens = torch.randint(0, VOCAB, (2, 3 * W + 3))
        assert rel_err(tp2(tokens), ref(tokens)) < 1e-5
        # Chunked prefill past the window into a rolling cache, then decode, on cache rows 1 and 2.
        caches = (tp2.new_cache(3), KVCache(ref.config, 3))
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
        with pytest.raises(ValueError, match="a packed .ragged. batch needs a cache"):  # refused on rank 0 alone
            tp2(tokens, packed=torch.tensor([0, 1]))
        assert rel_err(tp2(tokens), full) < 1e-5  # the ranks still run

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
        caches = (tp2.new_cache(2), KVCache(ref.config, 2))
        step = tp2.compile_decode(caches[0], mode=None, backend="eager")
        tokens = torch.randint(0, VOCAB, (2, W + 3))
        kv_len = tokens.shape[1]  # one bound for every step (as the engine's buckets): a single trace
        for i in range(tokens.shape[1]):  # past the window: the rolling buffer wraps
            positions = torch.tensor([[i], [max(i - 2, -1)]])  # row 1 starts later (-1: an idle row)
            got = step(tokens[:, i : i + 1], positions, kv_len)
            want = ref(tokens[:, i : i + 1], positions, caches[1], rows=slice(0, 2), kv_len=kv_len)
            assert rel_err(got, want) < 1e-5


    def test_speculative_greedy_matches_one_process(self, tiny, tp2, monkeypatch):
        """Speculative decoding over two ranks (issue 22): n-gram, and a one-process draft model, past the
        window, against plain greedy in one process. Rejected drafts are forgotten on every rank; the
        verify runs eagerly (drafts of different lengths packed), then as its own compiled step on every rank
        (dynamo's eager backend)."""
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
        prompts = [(torch.randint(0, VOCAB, (4,), generator=g).tolist() * 6)[:n] for n in (2 * W + 3, W + 1)]
        want = greedy(Engine(tiny[2], None, max_batch=2, chunk_size=5), prompts, 3 * W)
        draft = load_model(tiny[1])  # the same weights: it agrees except where ranks and one process part
        ngram = SpeculativeConfig("ngram", 3, draft_by_match=(), backoff=False)  # every match drafts k
        for spec, compiled in ((ngram, False), (SpeculativeConfig("draft", 2, draft="x", backoff=False), False),
                               (ngram, True)):
            engine = tp_engine(tp2, monkeypatch, max_batch=2, chunk_size=5, speculative=spec,
                               draft_model=draft if spec.method == "draft" else None)
            if compiled:
                engine.runner.compiled = True  # power-of-two widths, kv_len buckets
                engine.runner.compiled_verify = tp2.compile_decode(engine.runner.cache, backend="eager")
            forgotten, packed = [], []
            forget = type(engine.runner.cache).forget_rows
            monkeypatch.setattr(type(engine.runner.cache), "forget_rows",
                                lambda cache, *a: (forgotten.append(a), forget(cache, *a))[1])
            encode = runtime.encode_forward
            monkeypatch.setattr(runtime, "encode_forward", lambda *a: (packed.append(a[-1] is not None), encode(*a))[1])
            got = greedy(engine, prompts, 3 * W)
            assert any(packed) != compiled  # eagerly, ragged drafts go packed to every rank
            assert_greedy_agrees(tiny[2], prompts, got, want)
            stats = engine.speculator.stats
            assert stats.verify_rows > 0 and stats.draft_tokens > 0, spec
            # The draft shares the target's weights, so it is accepted; n-gram's drafts are accepted only
            # when the random model repeats itself (0 of 17 in about 1 run in 4 here, whichever the seed).
            assert stats.accepted_tokens > 0 or spec.method == "ngram", spec
            assert forgotten or stats.accepted_tokens == stats.draft_tokens
            monkeypatch.undo()


# ------------------------------------------------------- quantized, launches in a row, bounded start-up


def test_launches_in_a_row_quantized_and_bounded(tiny, tmp_path):
    """Several launches in one process that already holds a model: a rank that stops answering fails
    the launch within the start timeout, naming the rank and the step, and leaves no process; then
    int8 and int4 shards give one process's greedy tokens (same quantization), and the head split by
    vocabulary gives its logits."""
    import multiprocessing
    import threading

    def freeze_rank_1():  # SIGSTOP: alive, silent (a hung rank)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for p in multiprocessing.active_children():
                if p.name == "mistral7b-tp1" and p.pid:
                    os.kill(p.pid, signal.SIGSTOP)
                    return
            time.sleep(0.005)

    threading.Thread(target=freeze_rank_1, daemon=True).start()
    started = time.monotonic()
    with deadline(60), pytest.raises(StartupError, match=r"rank 1 of 2 did not answer within 3s during start-up step"):
        launch(tiny[1], 2, device="cpu", timeout_s=TIMEOUT_S, start_timeout_s=3)
    assert time.monotonic() - started < 30 and not multiprocessing.active_children()

    hf128 = hf_model("mistral", seed=int(torch.randint(0, 2**31, ())), window=W, vocab=VOCAB + 1, hidden=128)
    hf128.save_pretrained(tmp_path / "h128")  # shard widths multiples of 32 (int4 g32), an even vocabulary
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (W + 3, 4)]
    for path, quant in ((tiny[1], resolve("int8")), (tmp_path / "h128", resolve("int4", 32))):
        one = load_model(path, quantize=quant)
        with deadline(120):
            model = launch(path, 2, device="cpu", timeout_s=TIMEOUT_S, quant=quant)
        try:
            assert isinstance(model.shard.layers[0].feed_forward.w2, QuantModule)
            # The quantized kernels take bf16 activations: each rank's partial sums are rounded before the
            # all-reduce (a wrong slice, group or scale would be off by O(1), not O(1e-2)).
            tokens = torch.tensor(prompts[:1])
            assert rel_err(model(tokens), one(tokens)) < 2e-2
            want = greedy(Engine(one, None, max_batch=2, chunk_size=5), prompts, 8)
            got = greedy(Engine(model, None, max_batch=2, chunk_size=5), prompts, 8)
            assert_greedy_agrees(one, prompts, got, want, tie=3e-2)
        finally:
            model.close()
    with deadline(120):
        model = launch(tmp_path / "h128", 2, device="cpu", head="vocab", timeout_s=TIMEOUT_S)
    try:
        tokens = torch.randint(0, VOCAB, (2, W + 2))
        assert rel_err(model(tokens), load_model(tmp_path / "h128")(tokens)) < 1e-5
    finally:
        model.close()


@torch.no_grad()
def test_ranks_on_cpu_kernels_equal_one_process(tmp_path, monkeypatch):
    """int4 g32 on cpu_kernels (int8 activations, the CPU default) over 2 ranks, every shard width a
    multiple of 32: each rank quantizes the same blocks of activations as one process does and sums in
    float32, so the logits agree to float32 summation order and greedy tokens are equal. Its draws come from
    conftest's per-test seed: that order can move an activation across an int8 rounding boundary, which
    moves the logits by ~1e-3 (one draw in a CI run before the seeds were fixed, 2.5e-3; eight others
    2.4e-7 to 8.0e-7)."""
    monkeypatch.setenv("MISTRAL7B_INT8_ACTIVATIONS", "1")
    hf = hf_model("mistral", seed=int(torch.randint(0, 2**31, ())), window=W, vocab=VOCAB + 1, hidden=128)
    hf.save_pretrained(tmp_path / "h128")
    quant = resolve("int4", 32)
    one = load_model(tmp_path / "h128", quantize=quant)
    assert one.layers[0].feed_forward.w2.integer  # on cpu_kernels
    with deadline(120):
        model = launch(tmp_path / "h128", 2, device="cpu", timeout_s=TIMEOUT_S, quant=quant)
    try:
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
        prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (W + 3, 5)]
        assert rel_err(model(torch.tensor(prompts[:1])), one(torch.tensor(prompts[:1]))) < 1e-4
        want = greedy(Engine(one, None, max_batch=2, chunk_size=5), prompts, 8)
        got = greedy(Engine(model, None, max_batch=2, chunk_size=5), prompts, 8)
        assert_greedy_agrees(one, prompts, got, want, tie=1e-4)
    finally:
        model.close()


def test_launch_from_an_unguarded_script(tiny, tmp_path):
    """A script without `if __name__ == "__main__"` that launches, then loads a model and launches again:
    spawn must not run the script again in each worker (it would load again, then fail to launch from
    a worker: issue 26's hang). Nothing is left behind: no "leaked semaphore" warning at exit."""
    script = tmp_path / "script.py"
    script.write_text(
        "import torch\nfrom mistral7b.loading import load_model\nfrom mistral7b.parallel import launch\n"
        f"torch.set_num_threads(1)\nlaunch({str(tiny[1])!r}, 2, device='cpu', timeout_s={TIMEOUT_S}).close()\n"
        f"one = load_model({str(tiny[1])!r})\nprint('loaded', flush=True)\n"
        f"model = launch({str(tiny[1])!r}, 2, device='cpu', timeout_s={TIMEOUT_S})\n"
        "tokens = torch.tensor([[1, 2, 3, 4]])\n"
        "print('diff', float((model(tokens) - one(tokens)).abs().max() / one(tokens).abs().max()))\n"
        "model.close()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("loaded") == 1  # once, in the script's own process
    assert float(result.stdout.split("diff")[1]) < 1e-5
    assert "leaked semaphore" not in result.stderr, result.stderr[-2000:]


# ----------------------------------------------------------------- three ranks, the default model


@pytest.fixture(scope="module")
def default_model():
    if not os.path.exists(DEFAULT_MODEL):
        pytest.fail(f"the default model is missing: {DEFAULT_MODEL}")
    return load_model(DEFAULT_MODEL)  # in the file's own formats (Q4_1, Q8_0), as its shards run


@pytest.fixture(scope="class")
def tp3(default_model):
    """The default model (3 KV heads) on 3 ranks, each reading its slices of the Q4_1 blocks as stored."""
    with deadline(180):
        model = launch(DEFAULT_MODEL, 3, device="cpu", timeout_s=TIMEOUT_S)
    yield model
    model.close()


class TestThreeRanks:
    """The default model on three ranks; the last test kills one of them."""

    @torch.no_grad()
    def test_default_model_three_ranks(self, default_model, tp3, monkeypatch):
        """Rank 0 holds exactly its cut of the one-process weights, Q4_1 blocks as stored (wo: 192 = 6 x 32
        columns of each row); on real text the output agrees with one process."""
        from mistral7b.tokenizer import Tokenizer

        wo = tp3.shard.layers[0].attention.wo
        assert isinstance(wo, QuantModule) and wo.fmt.source == "Q4_1" and wo.in_features == 192
        got_w, want_w = dense_weights(tp3.shard), expected_shard(dense_weights(default_model), tp3.config, 0, 3)
        assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w)
        tokenizer = Tokenizer.from_source(DEFAULT_MODEL)
        prompts = [tokenizer.encode(text, bos=True) for text in ("The capital of France is", "Water boils at")]
        tokens = torch.tensor([prompts[0]])
        # The int4 kernel takes and returns bf16: each rank's partial sums of wo/w2 are rounded before the
        # all-reduce, where one process rounds the whole sum once (the weights themselves are equal, above).
        a, b = tp3(tokens), default_model(tokens)
        assert ((a - b).norm() / b.norm()).item() < 3e-2
        want = greedy(Engine(default_model, None, max_batch=2, chunk_size=4), prompts, 4)
        got = greedy(tp_engine(tp3, monkeypatch, max_batch=2, chunk_size=4), prompts, 4)
        assert_greedy_agrees(default_model, prompts, got, want, tie=3e-2)

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
