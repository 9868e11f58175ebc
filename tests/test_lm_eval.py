"""lm-evaluation-harness against us, both ways: through the server (`local-completions`,
`local-chat-completions`) and as its Python model `mistral7b` (mistral7b.lm_eval_model), on the offline
tasks of examples/lm_eval, each equal to lm-eval's own `hf` backend on the same GGUF dequantized.

We run the default model dequantized too (`quantize=false`): its Q4_1 kernels round activations, which
moves summed loglikelihoods by 0.6% from HF's fp32 on tiny_mc (a different model, not a different harness).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("tenacity")  # lm-eval's API models need its [api] extra

from lm_eval.tasks import TaskManager  # noqa: E402

from mistral7b.llm import LLM  # noqa: E402
from mistral7b.server import EngineDriver, ServerThread, build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "examples" / "lm_eval"
LIMIT = 10  # questions per task (of 50): enough to compare, quick on a CPU
MODEL = "smollm2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lm-eval asks the hub about models it never uses here


def _evaluate(model: str, model_args: str, tasks: list[str], **kwargs) -> dict:
    from mistral7b.lm_eval_model import MistralLM  # noqa: F401  registers `mistral7b`

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                                   task_manager=TaskManager(include_path=str(TASKS)), limit=LIMIT,
                                   log_samples=True, **kwargs)


def _limited(result: dict, task: str) -> list:
    return [s["resps"] for s in result["samples"][task]]


@pytest.fixture(scope="module")
def hf(hf_default_dir):
    """lm-eval's `hf` backend on the default GGUF, dequantized by transformers to fp32 (`hf_default_dir`)."""
    return _evaluate("hf", f"pretrained={hf_default_dir},dtype=float32,device=cpu",
                     ["tiny_mc", "tiny_roll", "tiny_gen"])


@pytest.fixture(scope="module")
def llm():
    return LLM(quantize=False)


@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(build_app(EngineDriver(llm), MODEL), log_level="warning") as st:
        yield st


def _assert_loglikelihoods_match(ours: dict, hf: dict) -> None:
    """Per choice and summed, within 1e-3 relative; the accuracy exactly."""
    a, b = _limited(ours, "tiny_mc"), _limited(hf, "tiny_mc")
    assert len(a) == len(b) == LIMIT
    for x, y in zip(a, b):
        for (lp_x, greedy_x), (lp_y, greedy_y) in ((c[0], d[0]) for c, d in zip(x, y)):
            assert math.isclose(lp_x, lp_y, rel_tol=1e-3), (lp_x, lp_y)
    total_a = sum(c[0][0] for x in a for c in x)
    total_b = sum(c[0][0] for x in b for c in x)
    assert math.isclose(total_a, total_b, rel_tol=1e-3)
    assert ours["results"]["tiny_mc"]["acc,none"] == hf["results"]["tiny_mc"]["acc,none"]


def test_python_model_matches_hf(hf):
    ours = _evaluate("mistral7b", "quantize=false,batch_size=8", ["tiny_mc", "tiny_roll", "tiny_gen"])
    _assert_loglikelihoods_match(ours, hf)
    rolling = [r[0][0] for r in _limited(ours, "tiny_roll")]
    expected = [r[0][0] for r in _limited(hf, "tiny_roll")]
    assert all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(rolling, expected)), (rolling, expected)
    assert _limited(ours, "tiny_gen") == _limited(hf, "tiny_gen")  # greedy text, token for token


def test_local_completions_matches_hf(server, hf):
    """The server's tokenizer (`/tokenizer_info`, `/tokenize`): lm-eval's default `auto` backend picks it."""
    ours = _evaluate("local-completions", f"base_url={server.url}/v1/completions,model={MODEL},batch_size=4",
                     ["tiny_mc"])
    _assert_loglikelihoods_match(ours, hf)


def test_local_chat_completions_generates(server, llm):
    """generate_until through /v1/chat/completions: each answer is the greedy reply LLM.chat gives, and
    the Python model's with `--apply_chat_template`."""
    from mistral7b.sampling import SamplingParams

    ours = _evaluate("local-chat-completions", f"base_url={server.url}/v1/chat/completions,model={MODEL}",
                     ["tiny_gen"], apply_chat_template=True)
    samples = ours["samples"]["tiny_gen"]
    params = SamplingParams(temperature=0.0, max_tokens=12, stop=["\n"])
    for sample in samples:
        doc = sample["doc"]
        messages = [{"role": "user", "content": f"Question: {doc['question']}\nAnswer:"}]
        assert sample["resps"][0][0] == llm.chat(messages, params).text, sample["arguments"]
    assert "exact_match,none" in ours["results"]["tiny_gen"]
    python = _evaluate("mistral7b", "quantize=false", ["tiny_gen"], apply_chat_template=True)
    assert _limited(python, "tiny_gen") == _limited(ours, "tiny_gen")  # the same chat prompt, as text


def test_module_does_not_import_lm_eval_and_runs_lm_evals_cli():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys, mistral7b, mistral7b.lm_eval_model; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    out = subprocess.run([sys.executable, "-m", "mistral7b.lm_eval_model", "run", "--model", "mistral7b",
                          "--model_args", "quantize=false", "--tasks", "tiny_mc", "--include_path", str(TASKS),
                          "--limit", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny_mc" in out.stdout and "acc" in out.stdout


def test_rolling_is_exact_past_the_sliding_window(tmp_path):
    """A text five windows long, scored through the engine's rolling cache, equals one HF forward over it."""
    import torch
    from types import SimpleNamespace

    from checkpoints import hf_logits, hf_model, write_mistral
    from lm_eval.api.model import LM

    from mistral7b.lm_eval_model import MistralLM

    class Words:  # a tokenizer for a checkpoint without one: "5 17 3" is [5, 17, 3]
        bos_id, eos_id = 1, 2

        def encode(self, text, bos=False):
            return [int(w) for w in text.split()]

    hf = hf_model("mistral", seed=0, window=8)
    lm = MistralLM.__new__(MistralLM)
    LM.__init__(lm)
    lm.llm, lm.tokenizer, lm.add_bos_token = LLM(write_mistral(hf, tmp_path / "m")), Words(), False
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    (score,) = lm.loglikelihood_rolling([SimpleNamespace(args=(" ".join(map(str, ids)),))], disable_tqdm=True)
    tokens = torch.tensor([[1] + ids])
    expected = hf_logits(hf, tokens)[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None]).sum().item()
    assert math.isclose(score, expected, rel_tol=1e-5), (score, expected)
