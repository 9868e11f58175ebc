"""`LLM.close()` frees the engine, its KV cache and the weights; a closed LLM says so; `with` closes."""

from __future__ import annotations

import weakref

import pytest

from mistral7b import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-layer random Mistral checkpoint (no tokenizer: prompts are token ids)."""
    from transformers import MistralConfig, MistralForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=8,
                        max_position_embeddings=64, attn_implementation="eager")
    MistralForCausalLM(cfg).save_pretrained(path)
    return path


def _refs(llm: LLM) -> list[weakref.ref]:
    """Weak references to the model, every weight, the engine and every KV cache tensor."""
    engine = llm.engine
    tensors = [*llm.model.parameters(), *(t for layer in engine.cache.layers for t in (layer.k, layer.v))]
    return [weakref.ref(llm.model), weakref.ref(engine), *map(weakref.ref, tensors)]


def test_close_frees_model_engine_and_cache(checkpoint):
    llm = LLM(str(checkpoint), device="cpu", prefix_cache_gib=0.01)
    out = llm.generate([PROMPT, [4, 5]], SamplingParams(max_tokens=4))  # the cache and prefix cache get used
    request, deltas = llm.stream_request(PROMPT, SamplingParams(max_tokens=20))
    next(deltas, None)  # a stream left open holds no engine after close
    refs = _refs(llm)
    assert len(refs) > 4 and all(r() is not None for r in refs)
    llm.close()
    assert [r for r in refs if r() is not None] == []  # close() collected them, no gc.collect() needed here
    assert out[0].token_ids and len(out[0].token_ids) == 4  # outputs stay readable
    deltas.close()  # the open stream ends quietly


def test_closed_llm_raises_a_clear_error_and_closes_twice(checkpoint):
    llm = LLM(str(checkpoint), device="cpu")
    llm.close()
    llm.close()  # idempotent
    for use in (lambda: llm.generate(PROMPT), lambda: llm.generate("not even encoded"),
                lambda: llm.stream_request(PROMPT), lambda: next(llm.stream(PROMPT)), lambda: llm.config):
        with pytest.raises(RuntimeError, match="^this LLM is closed$"):
            use()


def test_with_block_closes(checkpoint):
    with LLM(str(checkpoint), device="cpu") as llm:
        assert len(llm.generate(PROMPT, SamplingParams(max_tokens=3))[0].token_ids) == 3
        model = weakref.ref(llm.model)
    assert model() is None
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(PROMPT)
    with pytest.raises(ZeroDivisionError), LLM(str(checkpoint), device="cpu") as failing:  # closes on an error too
        1 / 0
    with pytest.raises(RuntimeError, match="closed"):
        failing.engine
