import random
import zlib

import pytest
import torch


def _seed(name: str) -> None:
    seed = zlib.crc32(name.encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(scope="module", autouse=True)
def seeded_by_module(request):
    """A module's fixtures, then each test (`seeded_by_test`), draw their random inputs from seeds of their
    own (hashes of their names): fresh per test and the same in every run, whichever worker runs the file
    and after which others (pytest-xdist splits files over two workers; every draw had depended on what
    ran before)."""
    _seed(request.module.__name__)


@pytest.fixture(autouse=True)
def seeded_by_test(request):
    _seed(request.node.nodeid)


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

        monkeypatch.setattr(SpecBackoff, "time_speculative", lambda self, seconds, width=None: None)
        monkeypatch.setattr(SpecBackoff, "time_plain", lambda self, seconds_per_step: None)
        monkeypatch.setattr(SpecBackoff, "time_lone", lambda self, seconds: None)


@pytest.fixture(scope="session")
def hf_default_dir(tmp_path_factory):
    """The default GGUF as transformers' own GGUF loader converts it (fp32 weights, its tokenizer), saved once
    a session: each of its users converted it again, about 30 s a time on a 2-core CPU (mostly the
    tokenizer's conversion). HF references load it from here in a second."""
    transformers = pytest.importorskip("transformers")
    from mistral7b.default_model import default_model_path

    path = default_model_path()
    out = tmp_path_factory.mktemp("hf-default-gguf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # transformers will not save a model it loaded from GGUF: the same weights in a model built from its config
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    return out
