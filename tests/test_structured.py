"""Structured outputs against independent references: every sampled output is parsed with `json`
and validated with the `jsonschema` package (or `re` for regexes); decoding goes through
sentencepiece / tokenizers; the bitmask kernel is checked against llguidance's numpy version."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import numpy as np
import pytest
import torch

import mistral_common
from mistral7b.sampling import SamplerBatch, SamplingParams, apply_bitmask, sample
from mistral7b.structured import (
    Constraint,
    GrammarCache,
    StructuredOutputError,
    allocate_bitmask,
    fill_bitmask,
    finish_reason,
    ll_tokenizer,
)
from mistral7b.tokenizer import Tokenizer

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_structured seed: {SEED}")
DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
SP_FILES = {"v1": os.path.join(DATA, "tokenizer.model.v1"),
            "v3": os.path.join(DATA, "mistral_instruct_tokenizer_240323.model.v3")}

CLOSED = {"additionalProperties": False}
word = {"type": "string", "pattern": "^[a-z]{1,5}$"}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], **CLOSED},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"], **CLOSED},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "tags": {"type": "array", "items": word, "maxItems": 2}},
        "required": ["id", "tags"], **CLOSED}}, "required": ["user"], **CLOSED},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], **CLOSED},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
     "required": ["ok", "note"], **CLOSED},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none", "many"]}]},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["a", "b"]},
                                                                 "v": {"type": "integer", "minimum": 0, "maximum": 99}},
                                "required": ["k", "v"], **CLOSED}, "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"kind": {"const": "point"}, "label": word}, "required": ["kind"], **CLOSED},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                                                   "maximum": 9}},
                                            "required": ["x"], **CLOSED}, "s": {"enum": ["on", "off"]}},
     "required": ["p", "s"], **CLOSED},
]
PER_SCHEMA = 20  # 10 schemas x 20 = 200 samples, one batch (benchmarks/structured_bench.py --validate: more)
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["alpha", "beta", "gamma delta"]


# ---- the real default model, one mixed batch ------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    from constrained_sampling import SmolLM
    from mistral7b.default_model import default_model_path

    return SmolLM(default_model_path())


@pytest.fixture(scope="module")
def mixed_batch(smollm):
    """200 schema rows, regex and choice rows, free rows and rows cut by max_tokens, as one batch."""
    torch.manual_seed(SEED)
    hot = dict(temperature=1.0, max_tokens=48)
    rows = [("schema", i, SamplingParams(json_schema=s, **hot)) for i, s in enumerate(SCHEMAS) for _ in range(PER_SCHEMA)]
    rows += [("regex", None, SamplingParams(regex=REGEX, **hot)) for _ in range(6)]
    rows += [("choice", None, SamplingParams(choice=CHOICES, **hot)) for _ in range(6)]
    rows += [("free", None, SamplingParams(temperature=1.0, max_tokens=8)) for _ in range(2)]
    rows += [("cut", 3, SamplingParams(json_schema=SCHEMAS[3], temperature=1.0, max_tokens=4)) for _ in range(4)]
    prompt = smollm.tokenizer.apply_chat_template([{"role": "user", "content": "Reply with a short JSON value."}])
    outputs = smollm.sample(prompt, [p for _, _, p in rows])
    return [(kind, i, out) for (kind, i, _), out in zip(rows, outputs)]


def test_every_schema_sample_parses_and_validates(mixed_batch):
    checked = 0
    for kind, i, out in mixed_batch:
        if kind != "schema":
            continue
        assert out.finish_reason == "stop" and out.constraint.is_accepting(), (SEED, i, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[i])
        checked += 1
    assert checked == len(SCHEMAS) * PER_SCHEMA


def test_regex_choice_and_free_rows(mixed_batch):
    for kind, _, out in mixed_batch:
        if kind == "regex":
            assert re.fullmatch(REGEX, out.text), (SEED, out.text)
        elif kind == "choice":
            assert out.text in CHOICES, (SEED, out.text)
        elif kind == "free":  # an unconstrained row in the same batch runs as usual
            assert out.constraint is None and out.finish_reason in ("stop", "length")


def test_max_tokens_cut_is_length_and_unfinished(mixed_batch):
    cut = [out for kind, _, out in mixed_batch if kind == "cut"]
    for out in cut:
        assert out.finish_reason == "length" and len(out.token_ids) == 4
        assert not out.constraint.is_accepting() and finish_reason(out.constraint, "length") == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(out.text)


# ---- tokenizer backends: random logits, the mask alone makes the text valid --------------------


@pytest.fixture(scope="module", params=["sp-v1", "sp-v3", "gguf"])
def backend(request):
    from mistral7b.default_model import default_model_path

    tok = Tokenizer.from_file(SP_FILES[request.param[3:]] if request.param.startswith("sp") else default_model_path())
    return tok, ll_tokenizer(tok, tok.vocab_size)


def random_logit_samples(tok, ll, params, rows, steps=60, decode=True):
    """Sample `rows` outputs from random logits under the constraint; decoded by the tokenizer itself
    (token ids if not `decode`)."""
    gen = torch.Generator().manual_seed(SEED)
    constraints = [Constraint.from_params(params, ll) for _ in range(rows)]
    sampler = SamplerBatch(rows, tok.vocab_size, torch.device("cpu"))
    for r in range(rows):
        sampler.assign(r, params, [])
    bitmask, out, done = allocate_bitmask(rows, tok.vocab_size), [[] for _ in range(rows)], [False] * rows
    for _ in range(steps):
        fill_bitmask(bitmask, [(c, r) for r, c in enumerate(constraints) if not done[r]])
        logits = torch.randn(rows, tok.vocab_size, generator=gen) * 3
        tokens = sample(logits, sampler, list(range(rows)), torch.arange(rows), bitmask=bitmask).tolist()
        for r in range(rows):
            if done[r]:
                continue
            assert constraints[r].consume(tokens[r])
            if tokens[r] not in tok.stop_token_ids:
                out[r].append(tokens[r])
            done[r] = tokens[r] in tok.stop_token_ids or constraints[r].is_stopped()
        if all(done):
            break
    assert all(done) and all(c.is_accepting() for c in constraints)
    return [tok.decode(ids) if decode else ids for ids in out]


def test_backends_decode_valid_json(backend):
    tok, ll = backend
    for schema in (SCHEMAS[3], SCHEMAS[0]):
        for text in random_logit_samples(tok, ll, SamplingParams(json_schema=schema, temperature=1.0), rows=4):
            jsonschema.validate(json.loads(text), schema)


def test_backends_regex_with_unicode(backend):
    tok, ll = backend
    pattern = r"(é|ß|中文|😀|[a-z ]){2,6}\."
    for text in random_logit_samples(tok, ll, SamplingParams(regex=pattern, temperature=1.0), rows=4):
        assert re.fullmatch(pattern, text.lstrip(" ") if tok._sp is not None else text), (SEED, text)


def test_eos_only_where_the_grammar_accepts(backend):
    tok, ll = backend
    value = json.dumps({"user": {"id": 7, "tags": ["ab"]}})
    constraint = Constraint.from_params(SamplingParams(json_schema=SCHEMAS[3]), ll)
    bitmask = allocate_bitmask(1, tok.vocab_size)
    eos = sorted(tok.stop_token_ids)
    bit = lambda i: bool((int(bitmask[0, i // 32]) >> (i % 32)) & 1)  # noqa: E731
    for token in ll.tokenize_str(value):  # no SentencePiece dummy-prefix space in front of "{"
        constraint.fill(bitmask, 0)
        assert not any(bit(e) for e in eos) and bit(token)
        assert constraint.consume(token)
    assert constraint.is_accepting()
    constraint.fill(bitmask, 0)
    assert all(bit(e) for e in eos)


# ---- pieces -------------------------------------------------------------------------------------


def test_apply_bitmask_matches_llguidance_numpy():
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(SEED)
    for vocab in (100, 32000, 32768, 49152):
        words = (vocab + 31) // 32
        mask = rng.integers(-2**31, 2**31, size=(3, words), dtype=np.int64).astype(np.int32)
        logits = rng.standard_normal((3, vocab)).astype(np.float32)
        expected = logits.copy()
        apply_token_bitmask_inplace(expected, mask)
        got = apply_bitmask(torch.from_numpy(logits), torch.from_numpy(mask))
        assert torch.equal(got, torch.from_numpy(expected))
    # A mask narrower than the logits (model vocab padded past the tokenizer's) forbids the extra ids.
    got = apply_bitmask(torch.zeros(1, 70), torch.full((1, 1), -1, dtype=torch.int32))
    assert torch.isfinite(got[0, :32]).all() and torch.isinf(got[0, 32:]).all()


def test_fill_bitmask_leaves_free_rows_open(backend):
    tok, ll = backend
    bitmask = allocate_bitmask(3, tok.vocab_size)
    bitmask.zero_()
    c = Constraint.from_params(SamplingParams(choice=["yes", "no"]), ll)
    fill_bitmask(bitmask, [(c, 1)])
    assert (bitmask[0] == -1).all() and (bitmask[2] == -1).all()
    allowed = [i for i in range(tok.vocab_size) if (int(bitmask[1, i // 32]) >> (i % 32)) & 1]
    assert 0 < len(allowed) < 50 and all("yes".startswith(s) or "no".startswith(s)
                                         for s in (tok.decode([i]).lstrip(" ") for i in allowed) if s)


def test_cache_hits_and_independent_matchers(backend):
    tok, ll = backend
    cache = GrammarCache(ll)
    params = SamplingParams(json_schema=SCHEMAS[1])
    a, b = (Constraint.from_params(params, ll, cache) for _ in range(2))
    assert (cache.stats.misses, cache.stats.hits) == (1, 1) and cache.stats.compile_seconds > 0
    for token in ll.tokenize_str('{"color": "red"}'):
        assert a.consume(token)
    assert a.is_accepting() and not b.is_accepting()  # b starts afresh
    Constraint.from_params(SamplingParams(json_schema=SCHEMAS[2]), ll, cache)
    assert cache.stats.misses == 2


def test_mask_threads_belong_to_each_cache(backend, monkeypatch):
    """The thread pool that fills large batches' masks is the cache's own, made on first use; a small batch
    (or a small host) fills in the calling thread; masks filled either way are equal."""
    tok, ll = backend
    cache = GrammarCache(ll)
    assert cache.executor(8) is None or (__import__("os").cpu_count() or 1) >= 8
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert cache.executor(7) is None and cache._executor is None
    pool = cache.executor(8)
    assert pool is not None and cache.executor(9) is pool and GrammarCache(ll).executor(8) is not pool
    constraints = [(Constraint.from_params(SamplingParams(choice=["yes", "no"]), ll, cache), r) for r in range(8)]
    threaded, plain = allocate_bitmask(8, tok.vocab_size), allocate_bitmask(8, tok.vocab_size)
    fill_bitmask(threaded, constraints, cache)
    fill_bitmask(plain, constraints)
    assert torch.equal(threaded, plain) and not (plain == -1).all()


def test_finish_reason_rules(backend):
    tok, ll = backend
    c = Constraint.from_params(SamplingParams(choice=["ab"]), ll)
    assert finish_reason(None, "stop") == "stop" and finish_reason(c, "length") == "length"
    assert finish_reason(c, "stop") is None  # a stop string inside an unfinished value does not end it
    for token in ll.tokenize_str("ab"):
        assert c.consume(token)
    assert c.is_stopped() and finish_reason(c, None) == "stop"


# ---- errors name the problem ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 3}}, r"invalid json_schema: .*minimum \(5\)"),
    ({"json_schema": {"$ref": "#/definitions/missing"}}, "invalid json_schema: .*missing"),
    ({"json_schema": {"type": "objekt"}}, "invalid json_schema: .*objekt"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema must be a JSON object"),
    ({"regex": "[a-z"}, "invalid regex: .*unclosed character class"),
    ({"grammar": "start: foo"}, 'invalid grammar: .*unknown name: "foo"'),
    ({"grammar": ""}, "grammar must be a non-empty"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"choice": ["a", 3]}, "choice must be a non-empty list"),
    ({"regex": "a", "choice": ["a"]}, "at most one of .*regex, choice"),
])
def test_invalid_constraints_raise_clear_errors(kwargs, message):
    with pytest.raises(StructuredOutputError, match="(?s)" + message):
        SamplingParams(**kwargs)
    assert issubclass(StructuredOutputError, ValueError)  # the server's ValueError handler answers 400


def test_valid_constraint_kinds_accepted():
    assert SamplingParams(json_schema='{"type": "object"}').constrained
    assert SamplingParams(grammar='root ::= "a" [0-9]+').constrained  # GBNF
    assert SamplingParams(grammar='start: "a" /[0-9]+/').constrained  # Lark
    assert not SamplingParams().constrained


def test_sentencepiece_fragments_tokenize_without_dummy_prefix():
    # llguidance tokenizes grammar-forced text fragments with the backend; SentencePiece's dummy-prefix
    # space must not creep in (" [" is one token, "▁[", not "▁" + "▁[").
    import sentencepiece

    for path in SP_FILES.values():
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
        ll = ll_tokenizer(Tokenizer.from_file(path))
        for text in [" [", ' "', "a b", "  x", "{\"k\": 1}", "é中😀", "\n\nz", "x "]:
            ids = ll.tokenize_str(text)
            assert ll.decode_bytes(ids) == text.encode(), text
            if text.startswith(" "):  # here the dummy prefix and the text's own space are the same "▁"
                assert ids == sp.encode(text[1:]), text
