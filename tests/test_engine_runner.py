"""The model runner's compiled decode step: many compiled runners in one process."""

from __future__ import annotations

import pytest
import torch

from mistral7b.cache import KVCache
from mistral7b.config import ModelConfig
from mistral7b.engine import Engine, runner
from mistral7b.model import SINGLE_ROW_OPTIONS, Transformer, own_code
from mistral7b.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_runners_do_not_share_a_recompile_budget(eager_dynamo):
    """Ten engines over ten models of different structure (as bf16, int8 and int4 modules are), each
    compiled: before each runner compiled a code object of its own, the ninth hit dynamo's recompile
    limit (8) and failed, as issue 21's quant bench did on the GPU. Dynamo with the eager backend
    keeps the test fast and is where the limit lives."""
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompt = torch.randint(0, 97, (5,)).tolist()
    for layers in range(1, 11):
        config = ModelConfig(dim=32, n_layers=layers, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                             vocab_size=97, sliding_window=8, max_seq_len=64)
        model = Transformer(config).eval()
        engine = Engine(model, None, max_batch=2, compile=True)
        compiled = engine.add(prompt, params)
        while not compiled.finished:
            engine.step()
        eager = Engine(model, None, max_batch=2)
        plain = eager.add(prompt, params)
        while not plain.finished:
            eager.step()
        assert compiled.output_ids == plain.output_ids


@pytest.mark.parametrize("tuned, invariant", [(True, False), (False, False), (True, True)])
def test_one_row_cuda_graph_step_compiles_apart(monkeypatch, tuned, invariant):
    """With CUDA graphs (mode "reduce-overhead") a one-row step runs a compiled function of its own,
    with SINGLE_ROW_OPTIONS (coordinate-descent tuning: Inductor's tuned mat-vecs), and wider steps the
    mode's; `tune_single_row` off or the invariant mode (tiles fixed, never tuned per graph) keep one.
    torch.compile is recorded and left eager (no GPU here): each step's logits equal a plain forward's."""
    compiles, ran = [], []

    def record(fn, mode=None, options=None, **kwargs):
        compiles.append(options or mode)
        return lambda *args: (ran.append(options or mode), fn(*args))[1]

    monkeypatch.setattr(torch, "compile", record)
    config = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=97,
                         sliding_window=8, max_seq_len=64)
    model = Transformer(config).eval()
    model.tune_single_row, model.batch_invariant = tuned, invariant
    cache = KVCache(config, max_batch=4)
    step = model.compile_decode(cache, "reduce-overhead")
    split = tuned and not invariant
    assert compiles == (["reduce-overhead", SINGLE_ROW_OPTIONS] if split else ["reduce-overhead"])
    first = torch.randint(0, 97, (4, 1))
    fresh = KVCache(config, max_batch=4)
    for width, position in ((4, 0), (1, 1)):  # row 0's second token attends to its first
        tokens = first if width == 4 else torch.randint(0, 97, (1, 1))
        positions = torch.full((width, 1), position)
        with torch.no_grad():
            logits = step(tokens, positions, 16)
            expected = model(tokens, positions, fresh, rows=slice(0, width), kv_len=16)
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
        assert ran[-1] == (SINGLE_ROW_OPTIONS if split and width == 1 else "reduce-overhead")


def test_own_code_is_a_distinct_code_object():
    def fn(x):
        return x + offset

    offset = 1
    copy = own_code(fn)
    assert copy(1) == 2 and copy.__code__ is not fn.__code__ and copy.__closure__ is fn.__closure__


def test_the_runner_drives_a_transformer_through_its_interface():
    """A plain Transformer is a RunnableModel: the runner's cache is the one its `new_cache` makes, with
    the speculative spare slots, and it is one process (tensor-parallel models are checked in test_parallel)."""
    config = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=97,
                         sliding_window=8, max_seq_len=64)
    model = Transformer(config).eval()
    assert isinstance(model, runner.RunnableModel) and model.tensor_parallel_size == 1
    made = runner.ModelRunner(model, 2, None, compile=False, spare_slots=3)
    assert type(made.cache) is KVCache and made.cache.max_batch == 2
    assert min(layer.size for layer in made.cache.layers) == config.sliding_window + 3


def test_compiled_decode_runs_the_smallest_power_of_two_width(eager_dynamo):
    """A lone request decodes one row, not max_batch (one-row kernels: int4 tinygemm 2.2 ms a 7B step
    against 5.1 at 8 rows); three requests run four rows once all decode (one row while the others still
    prefill); the tokens equal the uncompiled engine's."""
    config = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=97,
                         sliding_window=8, max_seq_len=64)
    model = Transformer(config).eval()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 9, 3)]

    def run(engine, batch):
        widths, decode = [], engine.runner.decode_fn
        engine.runner.decode_fn = lambda tokens, *a, **kw: widths.append(tokens.shape[0]) or decode(tokens, *a, **kw)
        requests = [engine.add(p, params) for p in batch]
        while not all(r.finished for r in requests):
            engine.step()
        return [r.output_ids for r in requests], set(widths)

    compiled = Engine(model, None, max_batch=8, compile=True)
    eager = Engine(model, None, max_batch=8)
    lone, lone_widths = run(compiled, prompts[:1])
    three, three_widths = run(compiled, prompts)
    assert lone_widths == {1} and max(three_widths) == 4 and three_widths <= {1, 2, 4}
    assert lone == run(eager, prompts[:1])[0] and three == run(eager, prompts)[0]


def test_graph_thread_wrapper_passes_keyword_arguments():
    """The CUDA-graph step is called with the LoRA slots as `adapters=`: the wrapper must hand them on
    (it took positional arguments only, so LoRA under CUDA graphs failed with a TypeError)."""
    seen = []
    wrapped = runner._on_graph_thread(lambda *args, **kwargs: seen.append((args, kwargs)) or "out")
    slots = torch.tensor([0, 2])
    assert wrapped(1, 2, 3, adapters=slots) == "out"
    assert seen[0][0] == (1, 2, 3) and seen[0][1]["adapters"] is slots


def _run(engine, lengths, max_tokens=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    requests = [engine.add(torch.randint(0, 97, (n,), generator=g).tolist(), SamplingParams(max_tokens=max_tokens,
                                                                                            ignore_eos=True))
                for n in lengths]
    while engine.has_work():
        engine.step()
    return requests


def test_kv_len_turns_symbolic_after_two_buckets(eager_dynamo):
    """Ten kv_len buckets (256 .. 6,144) at one width compile two graphs: the first bucket's, then one with
    kv_len symbolic. A memo key that hashed kv_len compiled one per bucket and failed the ninth
    (FailOnRecompileLimitHit): any request generating past 4,096 positions on a compiled engine."""
    counters = eager_dynamo
    config = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=97,
                         sliding_window=8192, max_seq_len=8192)
    model = Transformer(config).eval()
    engine = Engine(model, None, max_batch=1, compile=True)
    before = counters["unique_graphs"]
    buckets = set()
    for n in (200, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 6000):
        (request,) = _run(engine, [n])
        assert len(request.output_ids) == 3
        buckets.add(engine.runner.kv_len(n + 3))
    assert len(buckets) == 10 and counters["unique_graphs"] - before == 2


def test_every_width_up_to_128_rows_compiles_within_the_limit(eager_dynamo):
    """Widths 1 .. 128 (eight powers of two) each compile once, plus kv_len turning symbolic: nine graphs,
    past dynamo's default recompile limit (8), which compile_decode raises for the cache's rows."""
    counters = eager_dynamo
    config = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=97,
                         sliding_window=512, max_seq_len=1024)
    engine = Engine(Transformer(config).eval(), None, max_batch=128, compile=True)
    before = counters["unique_graphs"]
    _run(engine, [200])
    _run(engine, [300])  # a second kv_len bucket: kv_len symbolic from here
    for width in (2, 4, 8, 16, 32, 64, 128):
        requests = _run(engine, [20] * width, seed=width)
        assert all(len(r.output_ids) == 3 for r in requests)
    assert counters["unique_graphs"] - before == 9


def test_after_warmup_the_served_widths_and_lengths_compile_nothing(eager_dynamo):
    """Engine.warmup compiles width 1 over two kv_len buckets (kv_len symbolic after), then every other
    width the runner uses up to max_batch (2, 4 and 6 here): requests at any width, at kv_len buckets the
    warm-up never saw, compile nothing (6 prompts of 700 tokens also decode at narrower widths while the
    last are prefilled)."""
    counters = eager_dynamo
    config = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=97,
                         sliding_window=2048, max_seq_len=4096)
    engine = Engine(Transformer(config).eval(), None, max_batch=6, compile=True)
    before = counters["unique_graphs"]
    engine.warmup()
    warmed = counters["unique_graphs"]
    assert warmed - before == 5  # width 1 twice (kv_len static, then symbolic), 2, 4 and 6
    for width, length in ((1, 600), (1, 1500), (2, 1000), (6, 700), (6, 20), (4, 20), (3, 900), (5, 30)):
        requests = _run(engine, [length] * width, seed=length)
        assert all(len(r.output_ids) == 3 for r in requests)
    assert counters["unique_graphs"] == warmed
