"""A minimal constrained decoding loop over the real default model, for test_structured and
test_tool_calls: the model, KVCache and the batched sampler used directly, with a structured.Constraint
per row filling the shared bitmask before each step and consuming the token after it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral7b import KVCache, load_model
from mistral7b.sampling import SamplerBatch, SamplingParams, sample
from mistral7b.structured import Constraint, allocate_bitmask, fill_bitmask, ll_tokenizer
from mistral7b.tokenizer import Tokenizer



@dataclass
class Sampled:
    text: str
    token_ids: list[int]
    finish_reason: str
    constraint: Constraint


class SmolLM:
    """The default model with one prefilled prompt cached, copied into every row of a batch."""

    def __init__(self, path):
        self.tokenizer = Tokenizer.from_file(path)
        self.model = load_model(path, torch.device("cpu"), torch.float32)
        self.vocab = self.model.config.vocab_size
        self.ll = ll_tokenizer(self.tokenizer, self.vocab)
        self._prompts = {}

    def _prefill(self, prompt_ids: list[int], max_seq: int):
        key = (tuple(prompt_ids), max_seq)
        if key not in self._prompts:
            cache = KVCache(self.model.config, 1, "cpu", torch.float32, max_seq)
            n = len(prompt_ids)
            with torch.inference_mode():
                logits = self.model(torch.tensor([prompt_ids]), torch.arange(n)[None], cache, slice(0, 1), n,
                                    last_only=True)[:, -1]
            self._prompts[key] = (cache, logits)
        return self._prompts[key]

    @torch.inference_mode()
    def sample(self, prompt_ids: list[int], row_params: list[SamplingParams]) -> list[Sampled]:
        """One sample of the prompt per entry of `row_params`, all rows decoded as one batch (rows
        without a constraint get an all-ones bitmask row)."""
        rows = len(row_params)
        max_seq = len(prompt_ids) + max(p.max_tokens for p in row_params) + 1
        base, first_logits = self._prefill(prompt_ids, max_seq)
        cache = KVCache(self.model.config, rows, "cpu", torch.float32, max_seq)
        for src, dst in zip(base.layers, cache.layers):
            dst.k[:], dst.v[:], dst.pos[:] = src.k[0], src.v[0], src.pos[0]
        sampler = SamplerBatch(rows, self.vocab, torch.device("cpu"))
        for r, params in enumerate(row_params):
            sampler.assign(r, params, prompt_ids)
        constraints = [Constraint.from_params(params, self.ll) for params in row_params]
        stops = self.tokenizer.stop_token_ids
        outputs, reasons = [[] for _ in range(rows)], [None] * rows
        bitmask, index = allocate_bitmask(rows, self.vocab), torch.arange(rows)
        logits, position = first_logits.expand(rows, -1), len(prompt_ids)
        greedy = all(p.greedy for p in row_params)
        for _ in range(max(p.max_tokens for p in row_params)):
            live = [r for r in range(rows) if reasons[r] is None]
            fill_bitmask(bitmask, [(constraints[r], r) for r in live if constraints[r] is not None])
            tokens = sample(logits, sampler, list(range(rows)), index, greedy, bitmask=bitmask).tolist()
            for r in live:
                if constraints[r] is not None:
                    assert constraints[r].consume(tokens[r]), constraints[r].error  # the mask allowed it
                if tokens[r] in stops:
                    reasons[r] = "stop"
                    continue
                outputs[r].append(tokens[r])
                if constraints[r] is not None and constraints[r].is_stopped():
                    reasons[r] = "stop"
                elif len(outputs[r]) >= row_params[r].max_tokens:
                    reasons[r] = "length"
            if all(reasons):
                break
            logits = self.model(torch.tensor(tokens)[:, None], torch.full((rows, 1), position), cache,
                                slice(0, rows), position + 1)[:, -1]
            position += 1
        return [Sampled(self.tokenizer.decode(out), out, reason, c)
                for out, reason, c in zip(outputs, reasons, constraints)]
