"""The GPU batch-invariant mode's plumbing, on the CPU: which modules `batch_invariant.apply` switches and
undoes, when an engine applies it (EngineConfig.batch_invariant on CUDA only), and the CLI flag reaching
EngineConfig. The kernels themselves: tests/batch_invariant_check.py, under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistral7b import batch_invariant
from mistral7b.batch_invariant import InvariantLinear, InvariantRMSNorm
from mistral7b.bench import TINY, quantized, random_model
from mistral7b.model import RMSNorm
from mistral7b.quant import QuantConfig, QuantModule

CUDA = torch.device("cuda")


def kinds(model) -> dict[type, int]:
    out: dict[type, int] = {}
    for m in model.modules():
        out[type(m)] = out.get(type(m), 0) + 1
    return out


def test_on_cuda_every_linear_and_norm_switches_and_switches_back():
    model = random_model(TINY, "cpu")  # the switch touches classes and settings only: a CPU model shows it
    before, state = kinds(model), {k: v.clone() for k, v in model.state_dict().items()}
    batch_invariant.configure(model, CUDA, True)
    after = kinds(model)
    assert nn.Linear not in after and RMSNorm not in after and model.batch_invariant
    assert after[InvariantLinear] == before[nn.Linear] and after[InvariantRMSNorm] == before[RMSNorm]
    assert model.state_dict().keys() == state.keys()
    batch_invariant.configure(model, CUDA, False)
    assert kinds(model) == before and not model.batch_invariant
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_quantized_modules_take_the_invariant_launch():
    model = quantized(random_model(TINY, "cpu"), QuantConfig("int8"), "cpu")
    batch_invariant.configure(model, CUDA, True)
    settings = {m.rows_kernel for m in model.modules() if isinstance(m, QuantModule)}
    assert settings == {"invariant"}
    batch_invariant.configure(model, CUDA, False)
    assert "invariant" not in {m.rows_kernel for m in model.modules() if isinstance(m, QuantModule)}


def test_cpu_engines_and_off_leave_the_model_alone():
    model = random_model(TINY, "cpu")
    before = kinds(model)
    batch_invariant.configure(model, torch.device("cpu"), True)  # the CPU's kernels are invariant already
    batch_invariant.configure(model, CUDA, False)  # never switched: nothing to undo
    assert kinds(model) == before and not model.batch_invariant


def test_tensor_parallel_is_refused_with_one_line():
    model = random_model(TINY, "cpu")
    model.tensor_parallel_size = 2
    with pytest.raises(ValueError, match="tensor parallelism"):
        batch_invariant.configure(model, CUDA, True)


@pytest.mark.parametrize("flag, want", [([], None), (["--batch-invariant"], True), (["--no-batch-invariant"], False)])
def test_the_flag_reaches_the_engine_config(monkeypatch, flag, want):
    from mistral7b import cli, llm
    from mistral7b.cli.common import load_llm

    seen = {}
    monkeypatch.setattr(llm, "LLM", lambda *a, engine_config=None, **k: seen.setdefault("config", engine_config))
    load_llm(cli.build_parser().parse_args(["generate", "hi", "--device", "cpu", *flag]))
    assert seen["config"].batch_invariant is want
    for command in (["serve"], ["bench", "--preset", "tiny"]):
        assert cli.build_parser().parse_args([*command, *flag]).batch_invariant is want


def test_bench_refuses_it_with_tensor_parallelism():
    from mistral7b import cli
    from mistral7b.cli.bench import checked
    from mistral7b.cli.common import CLIError

    args = cli.build_parser().parse_args(["bench", "--batch-invariant", "--tensor-parallel-size", "2"])
    with pytest.raises(CLIError, match="tensor parallelism"):
        checked(args)


def test_an_engine_hands_its_resolved_setting_to_configure(monkeypatch):
    from mistral7b.engine import Engine, EngineConfig

    calls = []
    monkeypatch.setattr(batch_invariant, "configure", lambda model, device, on: calls.append((device.type, on)))
    Engine(random_model(TINY, "cpu"), None, EngineConfig(max_batch=1))
    Engine(random_model(TINY, "cpu"), None, EngineConfig(max_batch=1, batch_invariant=False))
    assert calls == [("cpu", True), ("cpu", False)]
