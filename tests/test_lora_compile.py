"""LoRA adapters under the compiled decode step (Inductor on CPU; CUDA graphs on a GPU): a batch that
mixes adapters and the base model equals the eager engine, and loading an adapter after the first
compile changes the answers without compiling again. The "reduce" formulation of the compiled delta
equals the "matmul" one and eager."""

import pytest
import torch

from checkpoints import hf_model, rel_err
from mistral7b.loading.peft import read_adapter
from mistral7b.lora import _masked_delta, _reduced_delta, enable_lora
from mistral7b.sampling import SamplingParams
from test_lora import ALL_LINEARS, peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A saved random base model and three saved adapters (different ranks and targets)."""
    root = tmp_path_factory.mktemp("lora_compile")
    hf = hf_model("mistral", n_kv_heads=2, window=8, seed=7)
    hf.save_pretrained(root / "base")
    for i, (r, t) in enumerate(zip((8, 4, 6), (ALL_LINEARS, ["q_proj", "v_proj", "lm_head"], ["down_proj", "o_proj"]))):
        peft_adapter(hf, root / f"a{i}", r, seed=200 + i, targets=t)
    return root, hf.config.vocab_size


def _run(engine, prompts, params, loras):
    requests = [engine.add(p, params, lora=lora) for p, lora in zip(prompts, loras)]
    while engine.has_work():
        engine.step()
    return requests


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_decode_mixes_adapters_and_loads_without_recompiling(adapters):
    """Compiled and eager engines (same weights, same adapters in the same slots) give the same greedy
    tokens and log-probabilities to 1e-4 for a batch of a0, none and a1; then a2 replaces a1 in its
    slot and the compiled step answers with it, as eager does, with no new graph."""
    from mistral7b import LLM

    root, vocab = adapters
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9, 7)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    compiled, eager = (LLM(str(root / "base"), device="cpu", max_batch=3, max_loras=2, compile=c).engine
                       for c in (True, False))
    for engine in (compiled, eager):
        for name in ("a0", "a1"):
            engine.load_lora(name, root / name)
    loras = ["a0", None, "a1"]
    first, want = _run(compiled, prompts, params, loras), _run(eager, prompts, params, loras)
    assert [r.output_ids for r in first] == [r.output_ids for r in want]
    for got, w in zip(first, want):
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
    assert len({tuple(r.output_ids) for r in want}) == 3  # the adapters really change the answers

    graphs = _graphs()
    assert graphs > 0  # the step was compiled
    for engine in (compiled, eager):
        engine.unload_lora("a1")
        engine.load_lora("a2", root / "a2")  # into a1's slot, after the first compile
    assert compiled.adapters.slots["a2"] == 2
    loras = ["a0", None, "a2"]
    got, want = _run(compiled, prompts, params, loras), _run(eager, prompts, params, loras)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    for g_, w in zip(got, want):
        assert [lp.logprob for lp in g_.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
    assert got[2].logprobs != first[2].logprobs  # the slot's new contents reached the compiled step
    assert _graphs() == graphs  # read in place: no recompile


def test_compiled_decode_logits_equal_eager_within_1e_4(adapters):
    """One decode step of the compiled model with rows on two adapters and none, against eager."""
    from mistral7b import LLM

    root, vocab = adapters
    model = LLM(str(root / "base"), device="cpu", max_batch=3).model
    bank = enable_lora(model, max_loras=2, max_rank=8)
    for slot, name in ((1, "a0"), (2, "a1")):
        adapter = read_adapter(root / name, model.config)
        bank.write(slot, adapter.weights, adapter.scale)
    caches = [model.new_cache(3, max_seq_len=16) for _ in range(2)]
    step = model.compile_decode(caches[0])
    prompt = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(4))
    slots = torch.tensor([2, 0, 1])
    positions = torch.arange(6).expand(3, 6)
    with torch.no_grad():
        for cache in caches:
            model(prompt, positions, cache, kv_len=6, adapters=slots)
        token, at = prompt[:, -1:], torch.full((3, 1), 6)
        got = step(token, at, 7, slots)
        want = model(token, at, caches[1], kv_len=7, adapters=slots)
        base = model(token, at, caches[1], kv_len=7)
    assert (got - want).abs().max().item() < 1e-4
    assert (base - want)[[0, 2]].abs().max().item() > 1e-2 and (base - want)[1].abs().max().item() < 1e-4


def test_compiled_decode_with_an_int8_base_equals_eager(adapters):
    """The delta adds to the quantized kernel's output in the compiled step too (int8, CPU kernels)."""
    from mistral7b import LLM

    root, vocab = adapters
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(5)).tolist() for n in (6, 4)]
    runs = []
    for compile_ in (True, False):
        engine = LLM(str(root / "base"), device="cpu", dtype="float32", quantize="int8", max_batch=2, max_loras=1,
                     compile=compile_).engine
        engine.load_lora("a0", root / "a0")
        runs.append(_run(engine, prompts, params, ["a0", None]))
    for got, want in zip(*runs):
        assert got.output_ids == want.output_ids
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)


def test_reduced_delta_equals_the_matmuls_and_leaves_base_rows_exact():
    """Compiled, the broadcast-sum delta (fp32) equals `out + _masked_delta` to 1e-5 relative, for one
    token and several per row; rows on slot 0 or index -1 get exactly `out`."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    a, bt = torch.randn(4, 8, 48, generator=g), torch.randn(4, 8, 40, generator=g)
    a[0], bt[0] = 0, 0  # slot 0 stays zero in a bank
    index = torch.tensor([2, 0, 1, -1, 3])
    reduced = torch.compile(_reduced_delta, fullgraph=True, dynamic=False)
    for t in (1, 3):
        x, out = torch.randn(5, t, 48, generator=g), torch.randn(5, t, 40, generator=g)
        got = reduced(a, bt, x, index, out)
        assert rel_err(got, out + _masked_delta(a, bt, x, index)) < 1e-5
        assert torch.equal(got[[1, 3]], out[[1, 3]])
        assert rel_err(got[[0, 2, 4]], out[[0, 2, 4]]) > 1e-2  # the adapters' rows do change


def test_compiled_reduce_delta_logits_equal_matmul_and_eager(adapters):
    """One compiled decode step, rows on three adapters and none, fresh random tokens: the "reduce" delta
    gives the "matmul" delta's logits and eager's; switching the bank's delta recompiles the step."""
    from mistral7b import LLM

    root, vocab = adapters
    model = LLM(str(root / "base"), device="cpu", max_batch=5).model
    bank = enable_lora(model, max_loras=3, max_rank=8)
    for slot, name in ((1, "a0"), (2, "a1"), (3, "a2")):
        adapter = read_adapter(root / name, model.config)
        bank.write(slot, adapter.weights, adapter.scale)
    cache = model.new_cache(5, max_seq_len=16)
    torch._dynamo.reset()  # else the earlier tests' widths and lengths make this one's symbolic: slower to compile
    step = model.compile_decode(cache)
    prompt = torch.randint(0, vocab, (5, 6))
    slots = torch.tensor([3, 0, 1, 2, 0])
    token, at = prompt[:, -1:], torch.full((5, 1), 6)
    with torch.no_grad():
        model(prompt, torch.arange(6).expand(5, 6), cache, kv_len=6, adapters=slots)
        want = model(token, at, cache, kv_len=7, adapters=slots)  # eager: rows grouped by slot
        matmul = step(token, at, 7, slots)  # rewrites position 6's keys and values with the same ones
        graphs = _graphs()
        bank.delta = "reduce"
        reduce = step(token, at, 7, slots)
    assert _graphs() == graphs + 1  # the bank's delta is guarded on: the reduce form was compiled
    assert rel_err(reduce, matmul) < 1e-5 and (reduce - want).abs().max().item() < 1e-4
    assert rel_err(matmul, want) < 1e-5


def test_delta_must_be_one_of_the_formulations():
    from mistral7b import ModelConfig, Transformer

    config = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=50)
    with pytest.raises(ValueError, match="'matmul', 'reduce', 'triton', 'fused', got 'bgmv'"):
        enable_lora(Transformer(config), 1, 4, delta="bgmv")
    model = Transformer(config)
    bank = enable_lora(model, 1, 4)
    assert bank.delta == "triton"  # the default (the matmul paths off CUDA)
    assert enable_lora(model, 1, 4, delta="reduce") is bank and bank.delta == "reduce"
    with pytest.raises(ValueError, match="LoRA delta must be one of"):
        bank.delta = "bmm"
    assert bank.delta == "reduce"
