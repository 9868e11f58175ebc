import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread mostly spins against other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def eager_dynamo(monkeypatch):
    """torch.compile through dynamo with the eager backend (fast, and where graphs and the recompile limit
    live); dynamo reset first, since it remembers which sizes changed by a function's source, so earlier
    tests' steps would make kv_len and the width symbolic from the first call. Yields dynamo's counters."""
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit  # compile_decode may raise it: restored after
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, backend=None, **kw: compile_(fn, backend="eager", **kw))
    yield torch._dynamo.utils.counters["stats"]
    torch._dynamo.config.recompile_limit = limit


@pytest.fixture(autouse=True)
def untimed_spec_backoff(request, monkeypatch):
    """Speculative backoff decides from measured step times; a loaded test machine would make those tests'
    draft counts vary run to run. Untimed, the break-even is the prior and decisions follow acceptance
    alone (deterministic). Tests marked `spec_timings` keep the timings."""
    if request.node.get_closest_marker("spec_timings") is None:
        from mistral7b.engine.spec_backoff import SpecBackoff

        monkeypatch.setattr(SpecBackoff, "time_speculative", lambda self, seconds: None)
        monkeypatch.setattr(SpecBackoff, "time_plain", lambda self, seconds_per_step: None)
        monkeypatch.setattr(SpecBackoff, "time_lone", lambda self, seconds: None)
