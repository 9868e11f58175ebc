"""The Python API on the real default model (SmolLM2-135M-Instruct GGUF), against HF transformers'
greedy generation from the same file, and the engine's own text/stream/stop contracts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mistral7b import LLM, SamplingParams
from mistral7b.quant import cpu_kernels
from mistral7b.tokenizer import GUARDRAIL_PROMPT

# The exact text of the paper's section 5 (written out here, not imported).
PAPER_GUARDRAIL = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time"
STORY_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


@pytest.fixture(scope="module")
def story(llm):
    """Greedy reference continuation of a plain-text prompt."""
    out = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=STORY_TOKENS))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == STORY_TOKENS
    return out


def _stop_ids(llm):
    return set(llm.tokenizer.stop_token_ids)


# ------------------------------------------------------------------------------------- HF reference


@pytest.fixture(scope="module")
def hf_default(hf_default_dir):
    """HF transformers' model from the same GGUF, dequantized to float32 (by its GGUF loader)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_default_dir), dtype=torch.float32).eval()


def test_chat_answers_paris_and_matches_hf_greedy(hf_default, monkeypatch):
    """With float activations (MISTRAL7B_INT8_ACTIVATIONS=0) the weights are HF's exactly, so greedy chat is
    HF's token for token. The int8 activations, on by default, are an approximation (next test): their
    rounding moves logits by about a logit, enough to decide this prompt's first token, a near-tie ("The"
    0.08 ahead of "L" in HF's logits): CI passed with them on an AVX-512 VNNI CPU and answered "L'Étoile, ..."
    on an AVX2 one, whose kernels sum in another order and so round some activations the other way."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    llm = LLM(device="cpu")
    params = SamplingParams(temperature=0, max_tokens=30)
    out = llm.chat(FRANCE, params)
    assert "Paris" in out.text
    ids = llm.tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    assert out.prompt_token_ids == ids

    with torch.no_grad():
        gen = hf_default.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=30, do_sample=False)
    new = gen[0, len(ids):].tolist()
    im_end = llm.tokenizer.token_to_id("<|im_end|>")
    stops = {im_end, hf_default.generation_config.eos_token_id, llm.tokenizer.eos_id} - {None}
    cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
    ref = new[:cut]
    assert out.token_ids == ref
    assert out.finish_reason == ("stop" if ref[-1] in stops else "length")
    assert out.text == llm.tokenizer.decode([t for t in ref if t not in stops])


def test_int8_activations_stay_near_hf(llm, hf_default):
    """The default CPU path (int8 activations where the kernels build) on a chat prompt about a document,
    every position (300): logits within 8% of HF's float32 ones (3.9-4.1% mean measured) and the same next
    token at 95% of positions (97.3-97.7%; over FRANCE's 37 alone one near-tie more or less moved it from
    97.3% to 94.6%). Wrong kernels (a sign, a scale, a nibble order) miss both by far."""
    assert cpu_kernels.available()  # the default path is the one under test
    document = (Path(__file__).parent / "data" / "licenses.txt").read_text()[:1200]
    chat = [{"role": "user", "content": "Summarize this:\n" + document}]
    ids = llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        ours, ref = llm.model(tokens)[0].float(), hf_default(tokens).logits[0]
    rel = ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert rel < 0.08 and agree >= 0.95, (rel, agree)


# ------------------------------------------------------------------------------------- streaming


def test_stream_equals_generate_and_decode(llm, story):
    params = SamplingParams(temperature=0, max_tokens=STORY_TOKENS)
    deltas = list(llm.stream(STORY, params))
    assert len(deltas) > 1  # it streamed
    assert "".join(deltas) == story.text
    assert story.text == llm.tokenizer.decode([t for t in story.token_ids if t not in _stop_ids(llm)])
    # stream_request gives the same request state
    request, it = llm.stream_request(llm.encode_prompt(STORY), params)
    assert "".join(it) == story.text == request.text
    assert request.output_ids == story.token_ids and request.finish_reason == "length"
    assert llm.engine.n_running == 0 and llm.engine.n_waiting == 0


def test_stream_closed_early_aborts_the_request(llm):
    request, it = llm.stream_request(llm.encode_prompt(STORY), SamplingParams(temperature=0, max_tokens=200))
    next(it)
    it.close()
    assert request.finish_reason == "abort"
    llm.engine.step()  # the row is released at the next step boundary
    assert llm.engine.n_running == 0 and llm.engine.n_waiting == 0 and not llm.engine.has_work()


# ------------------------------------------------------------------------------------- stop strings


def _token_spans(llm, ids):
    """[start, end) character span of each token in the decoded text, from the stream decoder."""
    dec = llm.tokenizer.decoder()
    spans, pos = [], 0
    for t in ids:
        piece = dec.push(t)
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    assert dec.flush() == ""
    return spans


def test_stop_string_across_token_boundary(llm, story):
    text, ids = story.text, story.token_ids
    spans = _token_spans(llm, ids)
    assert "".join(text[a:b] for a, b in spans) == text
    choice = None
    for j in range(1, len(ids) - 2):  # start inside token j, end inside a later token k
        for k in (j + 1, j + 2):
            (sj, ej), (sk, ek) = spans[j], spans[k]
            if ej - sj >= 2 and ek - sk >= 2:
                a, b = sj + 1, sk + 1  # the stop string's last character is the first of token k
                stop = text[a:b]
                if len(stop) >= 3 and text.find(stop) == a:
                    choice = (stop, a, k)
                    break
        if choice:
            break
    assert choice is not None, f"no stop string spans a token boundary in {text!r}"
    stop, a, k = choice
    params = SamplingParams(temperature=0, max_tokens=STORY_TOKENS, stop=[stop])
    request, it = llm.stream_request(llm.encode_prompt(STORY), params)
    deltas = list(it)
    assert all(stop not in d for d in deltas)
    assert "".join(deltas) == request.text == text[:a]
    assert request.finish_reason == "stop"
    assert request.output_ids == ids[: k + 1]  # generation stopped at the token completing the stop string
    # generate() agrees; with a second, later stop string the earliest match wins
    later = text[spans[-2][0]:]
    assert text.find(later) > a
    out = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=STORY_TOKENS, stop=[later, stop]))[0]
    assert out.text == text[:a] and out.finish_reason == "stop" and out.token_ids == ids[: k + 1]


# ------------------------------------------------------------------------------------- safe prompt


def test_safe_prompt_prepends_guardrail_system_message(llm):
    assert GUARDRAIL_PROMPT == PAPER_GUARDRAIL
    ids = llm.chat_prompt(FRANCE, safe_prompt=True)
    expected = llm.tokenizer.apply_chat_template([{"role": "system", "content": PAPER_GUARDRAIL}, *FRANCE])
    assert ids == expected
    assert ids != llm.chat_prompt(FRANCE)
    assert PAPER_GUARDRAIL in llm.tokenizer.decode(ids)
    # An existing system message is joined after the guardrail, not duplicated.
    with_system = [{"role": "system", "content": "Answer in one word."}, *FRANCE]
    joined = [{"role": "system", "content": PAPER_GUARDRAIL + "\n\nAnswer in one word."}, *FRANCE]
    assert llm.chat_prompt(with_system, safe_prompt=True) == llm.tokenizer.apply_chat_template(joined)
    out = llm.chat(FRANCE, SamplingParams(max_tokens=2), safe_prompt=True)
    assert out.prompt_token_ids == ids and len(out.token_ids) <= 2


# ------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_and_leaves_engine_clean(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="temperature"):
        llm.generate([STORY], SamplingParams(temperature=-0.5))
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            llm.generate([STORY], SamplingParams(top_p=top_p))
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "wizard", "content": "hi"}], SamplingParams(max_tokens=2))
    # SmolLM2 has no window: prompt + max_tokens must fit its 8192 positions.
    assert llm.config.sliding_window is None and llm.config.max_seq_len == 8192
    token = llm.tokenizer.encode("hello", bos=False)[0]
    long_prompt = [token] * 8000
    with pytest.raises(ValueError) as info:
        llm.generate([STORY, long_prompt], SamplingParams(max_tokens=500))  # a good prompt first
    for number in ("8000", "500", "8500", "8192"):
        assert number in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="8192"):
        llm.stream_request(long_prompt, SamplingParams(max_tokens=500))
    with pytest.raises(ValueError, match="8192"):
        next(llm.stream(long_prompt, SamplingParams(max_tokens=500)))
    with pytest.raises(ValueError):
        llm.generate([[llm.config.vocab_size]], SamplingParams(max_tokens=2))  # token id out of range
    with pytest.raises(ValueError):
        llm.generate([[]], SamplingParams(max_tokens=2))  # empty prompt
    assert engine.n_running == 0 and engine.n_waiting == 0 and not engine.has_work()
    # Exactly filling the context is allowed (checked without running an 8k-token CPU prefill).
    engine.validate(long_prompt, SamplingParams(max_tokens=192))
    with pytest.raises(ValueError, match="8193"):
        engine.validate(long_prompt, SamplingParams(max_tokens=193))
    # A normal request runs right after.
    out = llm.generate(STORY, SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.token_ids) == 3 and out.text


def test_string_prompt_without_tokenizer(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=8,
                        max_position_embeddings=64, attn_implementation="eager")
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    tiny = LLM(str(tmp_path), device="cpu")
    assert tiny.tokenizer is None
    assert tiny.load_seconds > 0  # measured by the LLM itself, and read-only
    with pytest.raises(AttributeError):
        tiny.load_seconds = 0.0
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.generate("hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.generate(["hello", [1, 2]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="tokenizer"):
        next(tiny.stream("hello", SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.chat(FRANCE)
    assert tiny.engine.n_waiting == 0 and tiny.engine.n_running == 0
    outs = tiny.generate([[1, 2, 3], [4]], SamplingParams(max_tokens=5))
    assert [len(o.token_ids) for o in outs] == [5, 5] and all(o.text == "" for o in outs)


def test_lone_surrogate_prompt_is_a_value_error(llm):
    with pytest.raises(ValueError, match="surrogate"):
        llm.generate("abc\ud800", SamplingParams(max_tokens=1))


@pytest.mark.parametrize("options, named", [({"model": "x"}, "source"), ({"max_batchs": 4, "chunk": 8}, "max_batch")])
def test_unknown_option_is_named_before_loading(options, named, monkeypatch):
    # Loading must not start: a wrong option fails first, naming itself and the options that exist.
    monkeypatch.setattr("mistral7b.default_model.default_model_path", lambda: pytest.fail("loaded a model"))
    with pytest.raises(TypeError) as err:
        LLM(**options)
    message = str(err.value)
    assert all(repr(name) in message for name in options) and named in message
    assert "__init__" not in message
