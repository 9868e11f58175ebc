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
