"""The engine on tiny random models (token-id prompts), against HF transformers recomputing the whole
sequence at every step without a cache, and against each request run alone."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from checkpoints import randomize_

from mistral7b import LLM, SamplingParams
from mistral7b.engine import Engine

W = 16  # sliding window of the random Mistral
MAX_POS = 64  # max_position_embeddings of both random models
VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(kind, path, seed):
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                  attn_implementation="eager")
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=W, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model = randomize_(model.float().eval(), torch.Generator().manual_seed(seed))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral")
    hf = _build("mistral", path, seed=int(torch.randint(0, 2**31, ())))
    llm = LLM(str(path), device="cpu", max_batch=2)
    return hf, llm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = _build("llama", path, seed=int(torch.randint(0, 2**31, ())))
    llm = LLM(str(path), device="cpu", max_batch=2)
    return hf, llm


def _prompt(n, g=None):
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    """Greedy tokens and their full-distribution log-probs, recomputing the whole sequence each step."""
    ids, logps = list(prompt), []
    for _ in range(n):
        logits = hf(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        logps.append(logits.log_softmax(-1))
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], logps


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]):
    """Drive an engine until all requests finish; return the requests and the per-step deltas."""
    reqs = [engine.add(p, sp) for p, sp in requests]
    steps = []
    while not all(r.finished for r in reqs):
        steps.append(engine.step())
        assert len(steps) < 10_000
    return reqs, steps


def solo(model, prompt, params):
    (req,), _ = run(Engine(model, None, max_batch=1), [(prompt, params)])
    return req


# ------------------------------------------------------------------------------------- rolling cache


def test_rolling_cache_matches_hf_full_recompute_past_max_positions(mistral):
    hf, llm = mistral
    prompt = _prompt(5)
    n = 6 * W + 4
    assert len(prompt) + n > llm.config.max_seq_len == MAX_POS  # past max_position_embeddings
    out = llm.generate([prompt], SamplingParams(max_tokens=n, logprobs=5))[0]
    ref, ref_logp = hf_greedy(hf, prompt, n)
    assert out.token_ids == ref
    assert out.finish_reason == "length"
    err = max(abs(lp.logprob - ref_logp[i][t].item()) for i, (lp, t) in enumerate(zip(out.logprobs, ref)))
    assert err < 1e-4, err
    # Not a degenerate loop: the window has real work to do.
    assert len(set(ref)) > 10


def test_cache_memory_is_flat_for_windowed_model(mistral):
    hf, llm = mistral
    model, cfg = llm.model, llm.config
    engine = Engine(model, None, max_batch=1)
    formula = 2 * cfg.n_layers * 1 * cfg.n_kv_heads * W * cfg.head_dim * 4  # K,V x layers x heads x W x hd x fp32
    assert engine.cache.nbytes() == formula
    assert llm.engine.cache.nbytes() == 2 * formula  # max_batch=2

    (short,), _ = run(engine, [(_prompt(W - 4), SamplingParams(max_tokens=4))])
    after_short = engine.cache.nbytes()
    prompt_len, max_tokens = 3 * W, 7 * W  # 10W positions in all
    (long,), _ = run(engine, [(_prompt(prompt_len), SamplingParams(max_tokens=max_tokens))])
    assert engine.cache.nbytes() == after_short == formula
    # The buffer holds exactly the last W positions fed (the final token is never fed), slot p % W.
    last = prompt_len + max_tokens - 2
    for layer in engine.cache.layers:
        assert layer.size == W
        pos = layer.pos[0].tolist()
        assert sorted(pos) == list(range(last - W + 1, last + 1))
        assert all(p % W == slot for slot, p in enumerate(pos))
    assert len(short.output_ids) == 4 and len(long.output_ids) == max_tokens


def test_no_window_model_rejects_too_long_and_allows_exact_fit(llama):
    hf, llm = llama
    prompt = _prompt(40)
    with pytest.raises(ValueError) as info:
        llm.generate([prompt], SamplingParams(max_tokens=30))
    msg = str(info.value)
    for number in ("40", "30", "70", str(MAX_POS)):
        assert number in msg, msg
    assert llm.engine.n_running == 0 and llm.engine.n_waiting == 0
    # prompt + max_tokens == context is allowed, and the linear cache gives HF's tokens.
    out = llm.generate([prompt], SamplingParams(max_tokens=MAX_POS - 40))[0]
    assert out.token_ids == hf_greedy(hf, prompt, MAX_POS - 40)[0]


# ------------------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("chunk", [1, 7, W, 64])
def test_chunked_prefill_same_logits_and_continuation(mistral, chunk):
    hf, llm = mistral
    model = llm.model
    g = torch.Generator().manual_seed(1234)  # the same prompt for every chunk size
    prompt = _prompt(45, g)
    prefill_logits = []

    def hook(module, args, kwargs, output):
        if kwargs.get("last_only"):
            prefill_logits.append(output[:, -1].clone())

    engine = Engine(model, None, max_batch=1, chunk_size=chunk)
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        (req,), _ = run(engine, [(prompt, SamplingParams(max_tokens=12))])
    finally:
        handle.remove()
    assert len(prefill_logits) == math.ceil(len(prompt) / chunk)  # really chunked
    first = prefill_logits[-1][0]
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0, -1]
        hf_full = hf(torch.tensor([prompt]), use_cache=False).logits[0, -1]
    diff_ours = (first - full).abs().max().item()
    diff_hf = (first - hf_full).abs().max().item()
    print(f"chunk {chunk}: max |engine - model(full)| = {diff_ours:.2e}, |engine - HF| = {diff_hf:.2e}")
    # fp32: atol 2e-5 plus 1e-6 relative to each logit (max measured ~9e-6 on logits of magnitude ~6,
    # and once 1.02e-5 with one-token chunks, the most summation orders apart)
    torch.testing.assert_close(first, full, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(first, hf_full, atol=2e-5, rtol=1e-6)
    assert req.output_ids == hf_greedy(hf, prompt, 12)[0]


# ------------------------------------------------------------------------------------- batching


LENGTHS = [3, 17, 40, 5, 29]


@pytest.fixture(scope="module")
def ragged(mistral):
    hf, llm = mistral
    prompts = [_prompt(n) for n in LENGTHS]
    params = SamplingParams(max_tokens=12)
    alone = [solo(llm.model, p, params).output_ids for p in prompts]
    return prompts, params, alone


def test_generate_ragged_batch_equals_each_alone(mistral, ragged):
    hf, llm = mistral
    prompts, params, alone = ragged
    assert llm.engine.max_batch < len(prompts)  # rows are reused
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.prompt_token_ids for o in outs] == prompts
    # and "alone" is right, not just self-consistent
    assert alone[1] == hf_greedy(hf, prompts[1], 12)[0]


def test_prefill_shares_forwards_between_requests_at_one_offset(mistral):
    """Prompts at the same offset are prefilled in one [B, n] forward, also on rows that are not
    adjacent (an index tensor), across rolling-buffer wrap-around; outputs equal each request alone."""
    hf, llm = mistral
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompts = [_prompt(n, g) for n in (2 * W - 3, W - 5, 2 * W - 3, 2 * W - 3, 7)]
    params = SamplingParams(max_tokens=6)
    engine = Engine(llm.model, None, max_batch=4, chunk_size=8, prefill_budget=24)
    calls = []
    hook = engine.model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape, kwargs["rows"])), with_kwargs=True)
    try:
        reqs, _ = run(engine, [(p, params) for p in prompts])
    finally:
        hook.remove()
    prefill = [(shape, rows) for shape, rows in calls if shape[1] > 1]
    assert any(shape[0] > 1 and isinstance(rows, torch.Tensor) for shape, rows in prefill), prefill
    assert sum(shape[0] * shape[1] for shape, _ in prefill) == sum(map(len, prompts))
    assert len(prefill) < len(prompts) * 3  # fewer forwards than one per chunk per request
    assert [r.output_ids for r in reqs] == [solo(llm.model, p, params).output_ids for p in prompts]
    assert reqs[2].output_ids == hf_greedy(hf, prompts[2], 6)[0]


@pytest.mark.parametrize("pipeline", [False, True])
def test_multistep_decode_equals_single_step(mistral, ragged, pipeline):
    hf, llm = mistral
    prompts, params, alone = ragged
    engine = Engine(llm.model, None, max_batch=2, decode_steps=4, pipeline=pipeline)
    reqs = [engine.add(p, params) for p in prompts]
    steps, in_flight = [], []
    while not all(r.finished for r in reqs):
        steps.append(engine.step())
        in_flight.append(engine._inflight is not None)
        assert len(steps) < 1000
    assert [r.output_ids for r in reqs] == alone
    assert any(in_flight) == pipeline
    per_step = [max((sum(d.request is r for d in s) for r in reqs), default=0) for s in steps]
    assert max(per_step) == 4, "multi-step decode never ran"
    assert engine.n_running == 0 and not engine.has_work()
    # Each delta is one token, and only the request's last delta says it finished.
    for r in reqs:
        mine = [d for s in steps for d in s if d.request is r]
        assert [t for d in mine for t in d.token_ids] == r.output_ids
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + [r.finish_reason]


def test_compiled_engine_after_warmup_equals_eager(mistral, ragged):
    """torch.compile'd decode (Inductor on CPU; CUDA graphs on GPU) after `warmup`, with pipelining."""
    hf, llm = mistral
    prompts, params, alone = ragged
    engine = Engine(llm.model, None, max_batch=2, decode_steps=4, compile=True, pipeline=True)
    engine.warmup()
    assert not engine.has_work() and engine.n_running == 0
    reqs, _ = run(engine, [(p, params) for p in prompts])
    assert [r.output_ids for r in reqs] == alone


def test_pipelined_decode_survives_abort_and_row_reuse(mistral):
    """An abort while a group of steps is in flight: the others continue, the freed row is reset for
    the next request, and nothing computed after the abort reaches the aborted request."""
    hf, llm = mistral
    params = SamplingParams(max_tokens=20)
    prompts = [_prompt(n) for n in (6, 11, 4, 9)]
    alone = [solo(llm.model, p, params).output_ids for p in prompts]
    engine = Engine(llm.model, None, max_batch=3, decode_steps=3, pipeline=True)
    a, b, c = (engine.add(p, params) for p in prompts[:3])
    while engine._inflight is None or len(b.output_ids) < 4:
        engine.step()
    engine.abort(b)
    n_b = len(b.output_ids)
    d = engine.add(prompts[3], params)
    while not all(r.finished for r in (a, c, d)):
        engine.step()
    assert len(b.output_ids) == n_b and b.output_ids == alone[1][:n_b] and b.finish_reason == "abort"
    assert [a.output_ids, c.output_ids, d.output_ids] == [alone[0], alone[2], alone[3]]
    assert engine.n_running == 0


@pytest.mark.parametrize("decode_steps,pipeline", [(1, False), (4, False), (4, True)])
def test_per_sequence_stop_token(mistral, ragged, decode_steps, pipeline):
    hf, llm = mistral
    prompts, params, alone = ragged
    choice = None
    for i, ref in enumerate(alone):
        others = {t for j, o in enumerate(alone) if j != i for t in o}
        for k, t in enumerate(ref[:-1]):
            if t not in others and t not in ref[:k]:
                choice = (i, k, t)
                break
        if choice:
            break
    assert choice is not None, "no token unique to one output: change the prompts"
    i, k, t = choice
    saved = llm.engine
    llm.engine = Engine(llm.model, None, max_batch=2, decode_steps=decode_steps, pipeline=pipeline)
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=params.max_tokens, stop_token_ids=[t]))
    finally:
        llm.engine = saved
    for j, (o, ref) in enumerate(zip(outs, alone)):
        if j == i:
            assert o.token_ids == ref[: k + 1] and o.finish_reason == "stop"
        else:
            assert o.token_ids == ref and o.finish_reason == "length"


# ------------------------------------------------------------------------------------- abort


def test_abort_frees_row_and_others_continue(mistral):
    hf, llm = mistral
    model = llm.model
    params = SamplingParams(max_tokens=20)
    prompts = [_prompt(n) for n in (6, 11, 4, 9)]
    alone = [solo(model, p, params).output_ids for p in prompts]
    engine = Engine(model, None, max_batch=3)
    a, b, c = (engine.add(p, params) for p in prompts[:3])
    while min(len(r.output_ids) for r in (a, b, c)) < 4:
        engine.step()
    assert engine.n_running == 3
    row = b.row
    engine.abort(b)
    assert engine.n_running == 2
    assert b.finish_reason == "abort" and b.finished
    assert b.output_ids == alone[1][: len(b.output_ids)]
    n_b = len(b.output_ids)
    # A waiting request can be aborted too; a new one takes the freed row at the next step.
    d = engine.add(prompts[3], params)
    e = engine.add(_prompt(5), params)
    engine.abort(e)
    assert engine.n_waiting == 1 and e.finish_reason == "abort" and e.output_ids == []
    before = [len(a.output_ids), len(c.output_ids)]
    engine.step()
    assert b.row is None and d.row == row and engine.rows[row] is d
    assert engine.n_running == 3 and engine.n_waiting == 0
    assert [len(a.output_ids), len(c.output_ids)] == [n + 1 for n in before], "the others kept decoding"
    while not all(r.finished for r in (a, c, d)):
        engine.step()
    assert d.output_ids == alone[3]  # the reused row was reset
    assert a.output_ids == alone[0] and c.output_ids == alone[2]
    assert len(b.output_ids) == n_b and e.output_ids == []
    assert engine.n_running == 0 and engine.n_waiting == 0


# ------------------------------------------------------------------------------------- sampling


def test_seeded_sampling_through_generate(mistral):
    hf, llm = mistral
    prompts = [_prompt(7), _prompt(20)]

    def gen(seed, ps=prompts):
        p = SamplingParams(temperature=1.5, top_p=0.95, max_tokens=16, seed=seed)
        return [o.token_ids for o in llm.generate(ps, p)]

    first = gen(123)
    assert gen(123) == first
    outs = [gen(s)[0] for s in (1, 2, 3, 4)]
    assert len({tuple(o) for o in outs + [first[0]]}) >= 3, "different seeds gave the same samples"
    # A seeded sequence does not depend on what shares its batch.
    assert gen(123, prompts[:1]) == first[:1]
    # Sampling really samples: not the greedy continuation.
    greedy = llm.generate(prompts, SamplingParams(max_tokens=16))
    assert any(o != g.token_ids for o in outs for g in greedy[:1])


def test_logprobs_equal_full_recompute(mistral):
    hf, llm = mistral
    prompt = _prompt(20)
    n = 24
    out = llm.generate([prompt], SamplingParams(max_tokens=n, logprobs=3))[0]
    ref, ref_logp = hf_greedy(hf, prompt, n)
    assert out.token_ids == ref
    assert len(out.logprobs) == n
    worst = 0.0
    for lp, token, logp in zip(out.logprobs, ref, ref_logp):
        assert lp.token_id == token
        worst = max(worst, abs(lp.logprob - logp[token].item()))
        assert len(lp.top) == 3
        ids = [i for i, _ in lp.top]
        values = [v for _, v in lp.top]
        assert ids[0] == token  # greedy: the chosen token is the most likely
        assert values == sorted(values, reverse=True)
        assert ids == logp.topk(3).indices.tolist()
        for i, v in lp.top:
            worst = max(worst, abs(v - logp[i].item()))
    print(f"logprob max error vs HF full recompute: {worst:.2e}")
    assert worst < 1e-4


# ------------------------------------------------------------------------------------- interleaving


def test_long_prefill_does_not_stall_decoding(mistral):
    hf, llm = mistral
    model = llm.model
    budget = 4
    engine = Engine(model, None, max_batch=2, chunk_size=W, prefill_budget=budget)
    pa, pb = _prompt(5), _prompt(50)
    params_a, params_b = SamplingParams(max_tokens=40), SamplingParams(max_tokens=5)
    a = engine.add(pa, params_a)
    while not a.output_ids:
        engine.step()
    b = engine.add(pb, params_b)
    prefill_steps = 0
    while not b.output_ids:
        before_a, before_b = len(a.output_ids), b.n_prefilled
        deltas = engine.step()
        prefill_steps += 1
        assert len(a.output_ids) == before_a + 1, "the decoding stream stalled during a prefill"
        assert sum(d.request is a for d in deltas) == 1
        assert b.n_prefilled - before_b == min(budget, len(pb) - before_b)
    assert prefill_steps == math.ceil(len(pb) / budget)
    while not (a.finished and b.finished):
        engine.step()
    assert a.output_ids == solo(model, pa, params_a).output_ids
    assert b.output_ids == solo(model, pb, params_b).output_ids


def test_engine_config_reaches_the_engine_through_llm(mistral, tmp_path):
    """LLM takes every engine knob (as an EngineConfig or as keywords), and a multi-step, pipelined,
    budget-limited engine set up that way generates what the default one does."""
    from mistral7b.engine import EngineConfig

    hf, llm = mistral
    path = tmp_path / "m"
    hf.save_pretrained(path)
    config = EngineConfig(max_batch=3, chunk_size=8, prefill_budget=12, decode_steps=3, pipeline=True)
    tuned = LLM(str(path), device="cpu", engine_config=config)
    engine = tuned.engine
    assert (engine.max_batch, engine.chunk_size, engine.prefill_budget, engine.decode_steps, engine.pipeline) == (
        3, 8, 12, 3, True)
    assert LLM(str(path), device="cpu", max_batch=2, decode_steps=5).engine.decode_steps == 5
    with pytest.raises(TypeError, match="no_such_knob"):
        LLM(str(path), device="cpu", no_such_knob=1)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompts = [_prompt(n, g) for n in (5, 19, 11)]
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in tuned.generate(prompts, params)] == expected
